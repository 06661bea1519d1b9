"""Model & data stage: import the user's factories, validate them, and train or load the weights.

A *target* is what every later stage works on: the trained model, its datasets and an example input.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from autoprune.model.data import first_batch
from autoprune.errors import AutopruneError
from autoprune.spec import Spec
from autoprune.model.task import Task, call_model, describe, label_keys, make_task
from autoprune.model.factories import import_object
from autoprune.model.training import train_model

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def build_model(factory: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Call a model factory and check that it returned an nn.Module."""
    fn = import_object(factory, "model factory")
    try:
        model = fn(**(kwargs or {}))
    except Exception as e:
        raise AutopruneError(f"model factory {factory!r} failed with kwargs {kwargs or {}}: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise AutopruneError(f"model factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def load_datasets(factory: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Call a dataset factory and check it returned train/val/test splits.

    A split is a Dataset (indexable; items may be tensors, tuples or dicts) or the user's own DataLoader
    (any re-iterable of batches). What an item holds is checked against the task and the model later
    (`check_forward`), on a real batch."""
    fn = import_object(factory, "data factory")
    try:
        data = fn(**(kwargs or {}))
    except Exception as e:
        raise AutopruneError(f"data factory {factory!r} failed with kwargs {kwargs or {}}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise AutopruneError(f"data factory {factory!r} must return a dict with keys {list(SPLITS)}, got {type(data).__name__}")
    missing = [s for s in SPLITS if s not in data]
    if missing:
        raise AutopruneError(f"data factory {factory!r} returned no {', '.join(repr(m) for m in missing)} split (needs {list(SPLITS)})")
    for s in SPLITS:
        ds = data[s]
        if isinstance(ds, DataLoader) or (not hasattr(ds, "__getitem__") and hasattr(ds, "__iter__")):
            try:
                next(iter(ds))
            except StopIteration:
                raise AutopruneError(f"data factory {factory!r}: split {s!r} is empty") from None
            except Exception as e:
                raise AutopruneError(f"data factory {factory!r}: split {s!r} cannot be iterated ({type(e).__name__}: {e})") from None
            continue
        try:
            n = len(ds)
        except Exception as e:
            raise AutopruneError(f"data factory {factory!r}: split {s!r} is not an indexable dataset or a DataLoader ({e})") from None
        if n == 0:
            raise AutopruneError(f"data factory {factory!r}: split {s!r} is empty")
        try:
            ds[0]
        except Exception as e:
            raise AutopruneError(f"data factory {factory!r}: split {s!r} is not an indexable dataset or a DataLoader ({e})") from None
    return {s: data[s] for s in SPLITS}


def split_batch(task: Task, batch: Any, what: str) -> tuple[Any, Any]:
    """`task.split(batch)`, its failure one error naming the task and the batch (`what` it is)."""
    try:
        return task.split(batch)
    except AutopruneError:
        raise
    except Exception as e:
        raise AutopruneError(f"task {task.name!r} cannot split {what} ({describe(batch)}) into inputs and target: "
                             f"{type(e).__name__}: {e}") from None


def check_forward(model: nn.Module, example: Any, where: str = "model", task: Task | None = None,
                  batch: Any = None) -> Any:
    """Run one forward pass on the example inputs, and the task on its output and the batch's target.

    Each way this can fail (the model cannot consume the batch, a dict key it does not take, a task that cannot
    read its output, a labelled task on data without labels, a metric that cannot read output and target) is
    one error naming the problem. With `batch` (a real batch of the data) the task is checked on it too."""
    shape_hint = f"an input of shape {list(example.shape)} (batch, *input_shape)" if isinstance(example, torch.Tensor) \
        else f"the data's first batch {describe(example)}"
    try:
        with torch.no_grad():
            out = call_model(model, example)
    except Exception as e:
        hint = "Check model.input_shape." if isinstance(example, torch.Tensor) else \
            "Check that the data's items (or task.split) give what the model's forward takes."
        raise AutopruneError(f"{where} forward failed on {shape_hint}: {type(e).__name__}: {e}. {hint}") from None
    if task is None:
        if not isinstance(out, torch.Tensor):
            raise AutopruneError(f"{where} must return a tensor, got {type(out).__name__}")
        return out
    # a task that scores what the example leaves out (model_loss: the labels) is checked on the batch alone
    scores_example = batch is None or type(task).inference_inputs is Task.inference_inputs
    try:
        scored = task.output(out, example) if scores_example else None
    except AutopruneError:
        raise
    except Exception as e:
        raise AutopruneError(f"task {task.name!r} cannot read the output of {where} ({describe(out)}): {type(e).__name__}: {e}") from None
    if scores_example and not isinstance(scored, torch.Tensor):
        raise AutopruneError(f"task {task.name!r}: output() must give a tensor, got {type(scored).__name__} from {describe(out)}")
    if batch is not None:
        inputs, target = split_batch(task, batch, "the data's first batch")
        try:
            with torch.no_grad():
                scored = task.output(call_model(model, inputs), inputs)
        except Exception as e:
            given = label_keys(inputs)
            hint = (f" (task {task.name!r} hands the model the batch's {given[0]!r} to compute its own loss from; a "
                    "model that computes none needs another task)") if given else ""
            raise AutopruneError(f"{where} forward failed on the data's first batch {describe(inputs)}: "
                                 f"{type(e).__name__}: {e}{hint}") from None
        if task.needs_labels and target is None:
            raise AutopruneError(
                f"task {task.name!r} needs labels, but the data's batches have none ({describe(batch)}); "
                "give (input, target) items or a 'labels' key, or use task: {kind: distillation} (label-free)")
        try:
            state = task.metric_state()
            task.update(state, scored, target, scored if task.needs_teacher else None)
            value = task.compute(state)
            if task.needs_labels or not task.needs_teacher:
                task.loss(scored, target, scored if task.needs_teacher else None)
        except NotImplementedError as e:
            raise AutopruneError(str(e)) from None
        except Exception as e:
            raise AutopruneError(
                f"task {task.name!r}: its metric/loss cannot read the model's output {describe(scored)} with target "
                f"{describe(target)}: {type(e).__name__}: {e}") from None
        if not isinstance(value, (int, float)):
            raise AutopruneError(f"task {task.name!r}: the metric must be a number, got {type(value).__name__}")
    return out


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a state dict safely (weights_only=True); mismatches become one clear error."""
    path = Path(path)
    if not path.exists():
        raise AutopruneError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AutopruneError(f"checkpoint {str(path)!r} cannot be loaded safely (weights_only=True): {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise AutopruneError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:3]
        raise AutopruneError(f"checkpoint {str(path)!r} does not match the model: {' '.join(first)}") from None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """A hash of the model's weights (keys every cache that depends on them)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Target:
    """The trained model and its data, ready for pruning."""

    model: nn.Module
    datasets: dict[str, Any]
    input_shape: tuple[int, ...] | None
    example_input: Any  # the inputs of one real sample (batch of 1): tensor, tuple or dict
    checkpoint: Path | None
    spec: Spec
    trained_now: bool = False
    task: Task | None = None

    @property
    def cache_dir(self) -> Path:
        return cache_dir_for(self.spec)


def cache_dir_for(spec: Spec) -> Path:
    """Caches shared by every run under the same output root (checkpoints, sensitivity)."""
    return Path(spec.output) / "_cache"


def model_fingerprint(spec: Spec) -> dict[str, Any]:
    return {
        "model": spec.model.factory,
        "kwargs": spec.model.kwargs,
        "data": spec.data.factory,
        "data_kwargs": spec.data.kwargs,
        # only a non-default task enters the hash, so checkpoints cached before tasks existed stay valid
        **({"task": spec.task.model_dump()} if spec.task.model_dump(exclude_defaults=True) else {}),
        "train": spec.train.model_dump(),
        "batch_size": spec.data.batch_size,
        "checkpoint": spec.model.checkpoint,
    }


def check_output_dir(spec: Spec) -> Path:
    """The run directory must be creatable and writable: fail before training or searching, not after."""
    run_dir = spec.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise AutopruneError(
            f"run directory {str(run_dir)!r} is not writable ({type(e).__name__}: {e.strerror or e}); "
            "set output: to a writable directory"
        ) from None
    return run_dir


def load_target(spec: Spec, *, show_progress: bool = True) -> Target:
    """Build the model, data and task of `spec`; check them on a real batch; load the checkpoint, or train the
    model (cached by settings hash), or, with `train.epochs: 0`, use the factory's weights as they are."""
    check_output_dir(spec)
    task = make_task(spec.task, spec.evaluation.metric)
    datasets = load_datasets(spec.data.factory, spec.data.kwargs)
    model = build_model(spec.model.factory, spec.model.kwargs)
    try:
        batch = first_batch(datasets["train"], 2)
        one = first_batch(datasets["train"], 1)
    except Exception as e:
        raise AutopruneError(f"data factory {spec.data.factory!r}: cannot form a batch of the train split "
                             f"({type(e).__name__}: {e}); items must be tensors, tuples or dicts of tensors") from None
    example = task.inference_inputs(split_batch(task, one, "the data's batches")[0])
    if spec.model.input_shape is not None:
        if not isinstance(example, torch.Tensor):
            raise AutopruneError(f"model.input_shape is {list(spec.model.input_shape)} but the data's inputs are "
                                 f"{describe(example)}; leave input_shape out (the example input comes from the data)")
        if tuple(example.shape[1:]) != tuple(spec.model.input_shape):
            raise AutopruneError(
                f"model.input_shape is {list(spec.model.input_shape)} but the data's inputs have shape {list(example.shape[1:])}"
            )
    where = f"model {spec.model.factory!r}"
    check_forward(model, example, where, task, batch)
    trained_now = False
    if spec.model.checkpoint:
        ckpt: Path | None = Path(spec.model.checkpoint)
        load_checkpoint(model, ckpt)
    elif spec.train.epochs == 0:
        ckpt = None  # the factory returns a trained model (e.g. pretrained weights)
    elif task.needs_teacher:
        raise AutopruneError(f"task {task.name!r} learns from the unpruned model, so that model must be trained: "
                             "give model.checkpoint, or train.epochs: 0 when the factory returns trained weights")
    else:
        ckpt = cache_dir_for(spec) / "checkpoints" / f"{_digest(model_fingerprint(spec))}.pt"
        if ckpt.exists():
            load_checkpoint(model, ckpt)
        else:
            torch.manual_seed(spec.train.seed)
            model = build_model(spec.model.factory, spec.model.kwargs)
            train_model(
                model,
                datasets["train"],
                epochs=spec.train.epochs,
                lr=spec.train.lr,
                batch_size=spec.data.batch_size,
                weight_decay=spec.train.weight_decay,
                seed=spec.train.seed,
                sparsity_l1=spec.train.sparsity_l1,
                desc=f"train {spec.model.factory}",
                show_progress=show_progress,
                task=task,
                device=spec.evaluation.device,  # where the search evaluates: a GPU when there is one
            )
            model.cpu()  # the pruner traces and copies the unpruned model on the CPU
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(f".tmp{os.getpid()}")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, ckpt)
            trained_now = True
            log.info("trained %s -> %s", spec.model.factory, ckpt)
    model.eval()
    shape = tuple(example.shape[1:]) if isinstance(example, torch.Tensor) else None
    return Target(model, datasets, shape, example, ckpt, spec, trained_now, task)
