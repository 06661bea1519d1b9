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
from torch.utils.data import Dataset

from autoprune.errors import AutopruneError
from autoprune.spec import Spec
from autoprune.training import accuracy, train_model

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def import_object(path: str, what: str = "factory") -> Callable[..., Any]:
    """Resolve 'package.module:attr' to the object, or raise an error that says which part failed."""
    if ":" not in path:
        raise AutopruneError(f"{what} {path!r} is not of the form 'package.module:callable'")
    mod_name, attr = path.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, but also errors raised while importing the user's module
        raise AutopruneError(f"{what} {path!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e})") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AutopruneError(f"{what} {path!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise AutopruneError(f"{what} {path!r} is not callable")
    return obj


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


def load_datasets(factory: str, kwargs: dict[str, Any] | None = None) -> dict[str, Dataset]:
    """Call a dataset factory and check it returned train/val/test datasets of (input, target) pairs."""
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
        try:
            n = len(ds)
            item = ds[0]
        except Exception as e:
            raise AutopruneError(f"data factory {factory!r}: split {s!r} is not an indexable dataset ({e})") from None
        if n == 0:
            raise AutopruneError(f"data factory {factory!r}: split {s!r} is empty")
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise AutopruneError(f"data factory {factory!r}: split {s!r} items must be (input, target) pairs")
    return {s: data[s] for s in SPLITS}


def check_forward(model: nn.Module, example: torch.Tensor, where: str = "model") -> torch.Tensor:
    """Run one forward pass; a failure becomes an error naming the input shape."""
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as e:
        raise AutopruneError(
            f"{where} forward failed on an input of shape {list(example.shape)} (batch, *input_shape): "
            f"{type(e).__name__}: {e}. Check model.input_shape."
        ) from None
    if not isinstance(out, torch.Tensor):
        raise AutopruneError(f"{where} must return a tensor, got {type(out).__name__}")
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
    datasets: dict[str, Dataset]
    input_shape: tuple[int, ...]
    example_input: torch.Tensor  # batch of 1
    checkpoint: Path | None
    spec: Spec
    trained_now: bool = False

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
    """Build the model and data of `spec`; load its checkpoint or train it (cached by settings hash)."""
    check_output_dir(spec)
    datasets = load_datasets(spec.data.factory, spec.data.kwargs)
    model = build_model(spec.model.factory, spec.model.kwargs)
    example = torch.zeros(1, *spec.model.input_shape)
    sample = datasets["train"][0][0]
    if isinstance(sample, torch.Tensor) and tuple(sample.shape) != tuple(spec.model.input_shape):
        raise AutopruneError(
            f"model.input_shape is {list(spec.model.input_shape)} but the data's inputs have shape {list(sample.shape)}"
        )
    check_forward(model, example, f"model {spec.model.factory!r}")
    trained_now = False
    if spec.model.checkpoint:
        ckpt = Path(spec.model.checkpoint)
        load_checkpoint(model, ckpt)
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
            )
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(f".tmp{os.getpid()}")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, ckpt)
            trained_now = True
            log.info("trained %s: val accuracy %.4f -> %s", spec.model.factory, accuracy(model, datasets["val"]), ckpt)
    model.eval()
    return Target(model, datasets, tuple(spec.model.input_shape), example, ckpt, spec, trained_now)
