"""The task: the one interface between autoprune and the user's problem.

A task says how a batch becomes the model's inputs and the target (`split`), how the model's output becomes
what is scored (`output`), the loss used by fine-tuning, recovery and gradient criteria (`loss`), and the
metric (higher is better, streamed over batches: `metric_state` / `update` / `compute`). Every stage that runs
the model (evaluation, BN recalibration, sensitivity, search, fine-tune schedules, reconstruction, costs,
latency, export) goes through it, so a user brings any model and any data:

* batches may be tensors, `(input, target)` tuples or dicts (`{"input_ids": ..., "attention_mask": ...,
  "labels": ...}`); inputs of any dtype (token ids stay integers);
* the model may return a tensor, a tuple, a dict or a `transformers` `ModelOutput` (`.logits`,
  `.last_hidden_state`, `.pooler_output`);
* built-ins: `classification` (cross-entropy, top-1 accuracy), `regression` (MSE, metric -MSE) and
  `distillation` (label-free: the unpruned model is the teacher; KL on logits or MSE/cosine on embeddings,
  metric agreement or cosine similarity to the teacher); a custom task subclasses `Task`.

Written by hand because none of the libraries autoprune builds on has this interface: Torch-Pruning takes an
example input, Optuna and Ray a number; the shape follows ModelOpt's `score_func` + `data_loader`, AIMET's
`eval_callback` and NNI's `Evaluator`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoprune.errors import AutopruneError

LABEL_KEYS = ("labels", "label", "targets", "target", "y")
Inputs = Any  # a tensor, a tuple/list of tensors (positional arguments) or a dict (keyword arguments)


# --------------------------------------------------------------------------- structure helpers
def label_keys(obj: Any) -> list[str]:
    """The `LABEL_KEYS` a dict batch (or inputs) holds, in that order; none for anything else."""
    return [k for k in LABEL_KEYS if k in obj] if isinstance(obj, Mapping) else []


def to_device(obj: Any, device: str | torch.device) -> Any:
    """Move every tensor inside `obj` (tensor, tuple, list, dict) to `device`; other values are kept."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """`model(**inputs)` for a dict, `model(*inputs)` for a tuple/list, else `model(inputs)`."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside `obj`, in order (dict values, tuple items, ModelOutput fields)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def batch_len(inputs: Inputs) -> int:
    """Number of samples in a batch of inputs (the first dimension of its first tensor)."""
    ts = tensors_of(inputs)
    if not ts or ts[0].dim() == 0:
        raise AutopruneError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}")
    return int(ts[0].shape[0])


def per_sample(obj: Any) -> bool:
    """A list with one entry per sample (a collate function's list of dicts or strings: a detector's `labels`, one
    dict of boxes and classes an image), not a structure of batched tensors (positional inputs)."""
    return isinstance(obj, list) and bool(obj) and all(isinstance(v, (Mapping, str)) for v in obj)


def slice_batch(obj: Any, start: int, stop: int) -> Any:
    """Samples `start:stop` of every tensor with a batch dimension, and of every per-sample list, inside `obj`."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() > 0 else obj
    if isinstance(obj, Mapping):
        return {k: slice_batch(v, start, stop) for k, v in obj.items()}
    if per_sample(obj):
        return obj[start:stop]
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_batch(v, start, stop) for v in obj)
    return obj


def resize_batch(inputs: Inputs, n: int) -> Any:
    """A batch of exactly `n` samples: the first `n`, or the samples repeated cyclically when there are fewer
    (latency at a batch size larger than the example)."""
    have = batch_len(inputs)
    if n <= have:
        return slice_batch(inputs, 0, n)
    reps = math.ceil(n / have)

    def rep(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.repeat(reps, *([1] * (obj.dim() - 1)))[:n] if obj.dim() > 0 else obj
        if isinstance(obj, Mapping):
            return {k: rep(v) for k, v in obj.items()}
        if per_sample(obj):
            return (obj * reps)[:n]
        if isinstance(obj, (tuple, list)):
            return type(obj)(rep(v) for v in obj)
        return obj

    return rep(inputs)


def describe(obj: Any) -> str:
    """A short description of a batch's structure for error messages: shapes and dtypes."""
    if isinstance(obj, torch.Tensor):
        return f"tensor{list(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in obj) + ")"
    return type(obj).__name__


def output_signature(out: Any) -> tuple:
    """Shapes of every tensor the model returns: what pruning must leave unchanged."""
    return tuple(tuple(t.shape) for t in tensors_of(out))


def _field(out: Any, name: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(name)
    return getattr(out, name, None)


def pick_output(out: Any, which: str = "auto") -> torch.Tensor:
    """The tensor to score from a model output: `which` names a field (`logits`, `last_hidden_state`,
    `pooler_output`, a dict key) or `auto` (a tensor as is; else `logits`, else `last_hidden_state`, else the
    first tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if which != "auto":
        v = _field(out, which)
        if v is None and isinstance(out, (tuple, list)) and which.isdigit() and int(which) < len(out):
            v = out[int(which)]
        if not isinstance(v, torch.Tensor):
            raise AutopruneError(f"task.output {which!r}: the model's output ({describe(out)}) has no tensor field {which!r}")
        return v
    for name in ("logits", "last_hidden_state"):
        v = _field(out, name)
        if isinstance(v, torch.Tensor):
            return v
    ts = tensors_of(out)
    if not ts:
        raise AutopruneError(f"the model returned {type(out).__name__}, which holds no tensor to score")
    return ts[0]


# --------------------------------------------------------------------------- the task
class Task:
    """How autoprune runs and scores the user's model. Subclass it for a custom task.

    Override what differs from the defaults: `split` (batch -> (inputs, target)), `output` (model output ->
    scored tensor), `loss` and `batch_metric` (or the streaming trio `metric_state`/`update`/`compute` for a
    metric that is not a mean over samples). `teacher` is the output of the unpruned model on the same batch
    when `needs_teacher` is true (distillation), else None.

        >>> import torch
        >>> from autoprune.model.task import Task
        >>> class NegL1(Task):                      # regression scored by minus the mean absolute error
        ...     def loss(self, output, target, teacher=None):
        ...         return (output - target).abs().mean()
        ...     def batch_metric(self, output, target, teacher=None):
        ...         return -float((output - target).abs().sum()), len(output)
        >>> t = NegL1()
        >>> s = t.metric_state(); t.update(s, torch.zeros(4, 1), torch.ones(4, 1)); t.compute(s)
        -1.0
    """

    name = "custom"
    needs_labels = True  # the metric reads targets from the batches
    needs_teacher = False  # loss/metric compare with the unpruned model's output
    metric_name = "metric"
    distills = True  # recovery may add distillation from the unpruned model's output (`distill_loss`)

    def __init__(self, output: str = "auto") -> None:
        self.output_field = output

    # ---- batches and outputs
    def split(self, batch: Any) -> tuple[Inputs, Any]:
        """A batch from the data -> (model inputs, target or None).

        Tuples/lists of two are `(input, target)`; longer tuples are `(*inputs, target)`; a dict gives every key
        but the label keys (`labels`, `label`, `targets`, `target`, `y`) to the model; a bare tensor has no target.
        """
        if isinstance(batch, Mapping):
            keys = label_keys(batch)
            target = batch[keys[0]] if keys else None
            return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, target
        if isinstance(batch, (tuple, list)):
            if len(batch) == 2:
                return batch[0], batch[1]
            if len(batch) > 2:
                return tuple(batch[:-1]), batch[-1]
            return batch[0], None
        return batch, None

    def output(self, out: Any, inputs: Inputs = None) -> torch.Tensor:
        """The model's output -> the tensor the loss and the metric read."""
        return pick_output(out, self.output_field)

    def inference_inputs(self, inputs: Inputs) -> Inputs:
        """What the model is traced, counted and timed on, from a batch's inputs: the inputs themselves, unless
        they carry what only scoring needs (`ModelLoss`: the labels the model computes its loss from)."""
        return inputs

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        return self.output(call_model(model, inputs), inputs)

    # ---- loss and metric
    def loss(self, output: torch.Tensor, target: Any, teacher: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"task {self.name!r} has no loss: implement Task.loss to fine-tune with it")

    def batch_metric(self, output: torch.Tensor, target: Any, teacher: torch.Tensor | None = None) -> tuple[float, int]:
        """(sum of the per-sample metric, number of samples) for one batch; the metric is sum / count."""
        raise NotImplementedError(f"task {self.name!r} has no metric: implement Task.batch_metric")

    def metric_state(self) -> dict[str, float]:
        return {"sum": 0.0, "count": 0}

    def update(self, state: dict, output: torch.Tensor, target: Any, teacher: torch.Tensor | None = None) -> None:
        s, n = self.batch_metric(output, target, teacher)
        state["sum"] += float(s)
        state["count"] += int(n)

    def compute(self, state: dict) -> float:
        return state["sum"] / state["count"] if state["count"] else float("nan")

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "metric": self.metric_name, "output": self.output_field}


class Classification(Task):
    """Cross-entropy on logits (any leading dims, classes in the last), metric top-1 accuracy in [0, 1]."""

    name = "classification"
    metric_name = "accuracy"

    def loss(self, output, target, teacher=None):
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1).long())

    def batch_metric(self, output, target, teacher=None):
        pred = output.argmax(-1)
        if tuple(target.shape) != tuple(pred.shape) or target.is_floating_point():
            raise ValueError(f"classification needs integer class targets of shape {list(pred.shape)} (the output "
                             f"without its last, class dimension), got {describe(target)}")
        return float((pred == target.to(pred.device)).sum()), int(target.numel())


def scored_by_accuracy(task: Task) -> bool:
    """A classifier scored by top-1 accuracy: its outputs' argmax against integer classes, one right answer a
    sample (what `search.score: loss`'s evidence and the re-rank hint are about)."""
    return isinstance(task, Classification) and task.metric_name == "accuracy"


class Regression(Task):
    """MSE loss; the metric is minus the mean squared error (higher is better)."""

    name = "regression"
    metric_name = "neg_mse"

    def loss(self, output, target, teacher=None):
        return F.mse_loss(output.float(), target.float().reshape(output.shape))

    def batch_metric(self, output, target, teacher=None):
        err = (output.float() - target.float().to(output.device).reshape(output.shape)) ** 2
        n = int(output.shape[0])
        return -float(err.reshape(n, -1).mean(1).sum()), n


class Distillation(Task):
    """Label-free: the unpruned model is the teacher.

    `output: pooled` mean-pools a `last_hidden_state` over the `attention_mask` (sentence embeddings). Loss
    `kl` (on logits, with `temperature`), `mse` or `cosine` (on embeddings); metric `cosine` (mean cosine
    similarity to the teacher's output, in [-1, 1]) or `agreement` (fraction of argmax equal to the teacher's).
    Defaults follow the output: logits -> kl + agreement, anything else -> cosine + cosine.
    """

    name = "distillation"
    needs_labels = False
    needs_teacher = True

    def __init__(self, output: str = "auto", loss: str | None = None, metric: str | None = None, temperature: float = 1.0) -> None:
        super().__init__(output)
        logits = output in ("logits",)
        self.loss_kind = loss or ("kl" if logits else "cosine")
        self.metric_kind = metric or ("agreement" if logits else "cosine")
        if self.loss_kind not in ("kl", "mse", "cosine"):
            raise AutopruneError(f"task.loss {self.loss_kind!r}: distillation takes kl, mse or cosine")
        if self.metric_kind not in ("cosine", "agreement"):
            raise AutopruneError(f"task.metric {self.metric_kind!r}: distillation is label-free; it takes cosine or agreement "
                                 "(accuracy needs labels: use task: {kind: classification})")
        self.temperature = temperature
        self.metric_name = self.metric_kind

    def output(self, out, inputs=None):
        if self.output_field == "pooled":
            hidden = pick_output(out, "last_hidden_state") if not isinstance(out, torch.Tensor) else out
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            if mask is None or hidden.dim() != 3:
                return hidden.mean(1) if hidden.dim() == 3 else hidden
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return pick_output(out, self.output_field)

    def loss(self, output, target, teacher=None):
        if teacher is None:
            raise AutopruneError("distillation needs the teacher's output")
        teacher = teacher.to(output.device)
        if self.loss_kind == "kl":
            t = self.temperature
            return F.kl_div(F.log_softmax(output / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                            reduction="batchmean") * t * t
        if self.loss_kind == "mse":
            return F.mse_loss(output.float(), teacher.float())
        return (1 - F.cosine_similarity(output.float().flatten(1), teacher.float().flatten(1), dim=1)).mean()

    def batch_metric(self, output, target, teacher=None):
        teacher = teacher.to(output.device)
        n = int(output.shape[0])
        if self.metric_kind == "agreement":
            a, b = output.argmax(-1), teacher.argmax(-1)
            return float((a == b).float().reshape(n, -1).mean(1).sum()), n
        return float(F.cosine_similarity(output.float().reshape(n, -1), teacher.float().reshape(n, -1), dim=1).sum()), n

    def describe(self):
        return {**super().describe(), "loss": self.loss_kind, "temperature": self.temperature}


class LanguageModeling(Classification):
    """Next-token prediction, self-supervised: the target at position t is the token at t + 1, read from the batch's
    `input_ids` (a causal LM's logits, [batch, seq, vocab]). Positions whose `attention_mask` is 0 (padding) are not
    scored; a batch's `labels`, when it has them, are the targets instead (transformers' convention: unshifted,
    -100 not scored), and are not handed to the model. Loss: the mean next-token cross-entropy; metric `neg_nll`
    (minus it, nats per token: perplexity is exp(-metric)) or `token_accuracy` (top-1 next token), each a mean over
    the scored tokens of the split. Recovery's distillation is KL on the logits at every position (a classifier's)."""

    name = "language_modeling"
    needs_labels = False  # the targets are the inputs, shifted

    def __init__(self, output: str = "auto", metric: str | None = None) -> None:
        super().__init__(output)
        self.metric_name = metric or "neg_nll"
        if self.metric_name not in ("neg_nll", "token_accuracy"):
            raise AutopruneError(f"task.metric {self.metric_name!r}: language_modeling is scored by neg_nll (minus the "
                                 "next-token cross-entropy) or token_accuracy")

    def split(self, batch: Any) -> tuple[Inputs, Any]:
        if isinstance(batch, torch.Tensor) and not batch.is_floating_point() and batch.dim() == 2:
            return batch, batch  # a bare [batch, seq] of token ids, fed to the model as its first argument
        if not (isinstance(batch, Mapping) and "input_ids" in batch):
            raise ValueError(f"language_modeling needs batches of token ids: a dict with input_ids (and "
                             f"attention_mask, labels) or a [batch, seq] integer tensor, got {describe(batch)}")
        inputs, labels = super().split(batch)
        if labels is None:
            labels, mask = batch["input_ids"], batch.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                labels = labels.masked_fill(mask.to(labels.device) == 0, -100)
        return inputs, labels

    def _next_tokens(self, output: torch.Tensor, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of positions 0..T-2, flattened; the tokens at 1..T-1, flattened)."""
        if output.dim() != 3 or not isinstance(target, torch.Tensor) or tuple(target.shape) != tuple(output.shape[:2]):
            raise ValueError(f"language_modeling needs logits [batch, seq, vocab] and tokens [batch, seq], got "
                             f"{describe(output)} and {describe(target)}")
        target = target.to(output.device)
        if int(target.max()) >= output.shape[-1]:
            raise ValueError(f"language_modeling: token id {int(target.max())} is past the output's last dimension "
                             f"({output.shape[-1]}): score a language-model head's logits (a model without one: "
                             "task: {kind: distillation})")
        return output[:, :-1].reshape(-1, output.shape[-1]), target[:, 1:].reshape(-1).long()

    def loss(self, output, target, teacher=None):
        logits, tokens = self._next_tokens(output, target)
        return F.cross_entropy(logits.float(), tokens, ignore_index=-100)

    def batch_metric(self, output, target, teacher=None):
        logits, tokens = self._next_tokens(output, target)
        scored = tokens != -100
        if self.metric_name == "token_accuracy":
            return float((logits.argmax(-1) == tokens)[scored].sum()), int(scored.sum())
        return -float(F.cross_entropy(logits.float(), tokens, ignore_index=-100, reduction="sum")), int(scored.sum())


class ModelLoss(Task):
    """The model's own loss: the whole batch, its `labels` included, goes to the model, which returns a `loss`
    (transformers' convention: a detector given a list of {class_labels, boxes} per image, a segmentation model,
    a seq2seq or masked LM given labels). Fine-tuning minimises it; the metric is `neg_loss`, minus it, averaged
    over samples. The model is traced, counted and timed without the labels (`inference_inputs`), so costs and
    latency are those of inference. Recovery adds no distillation (the outputs are loss values)."""

    name = "model_loss"
    needs_labels = False  # the labels are the model's inputs, not the task's targets
    metric_name = "neg_loss"
    distills = False

    def split(self, batch: Any) -> tuple[Inputs, Any]:
        if not isinstance(batch, Mapping):
            raise ValueError(f"model_loss hands the batch to the model by name: it needs dict batches (with the "
                             f"labels the model computes its loss from), got {describe(batch)}")
        return dict(batch), None

    def inference_inputs(self, inputs: Inputs) -> Inputs:
        return {k: v for k, v in inputs.items() if k not in LABEL_KEYS} if isinstance(inputs, Mapping) else inputs

    def output(self, out: Any, inputs: Inputs = None) -> torch.Tensor:
        loss = _field(out, "loss")
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            have = label_keys(inputs)
            raise ValueError(f"model_loss needs the model to return a scalar `loss`; it returned {describe(out)} "
                             + (f"given {have[0]!r}" if have else "and the batch has no labels (a 'labels' key)"))
        return loss.reshape(1).expand(batch_len(self.inference_inputs(inputs)) if inputs is not None else 1)

    def loss(self, output, target, teacher=None):
        return output.mean()

    def batch_metric(self, output, target, teacher=None):
        return -float(output.sum()), int(output.numel())


class LegacyMetric(Classification):
    """Classification scored by a user function `metric(outputs, targets) -> float` on the concatenated outputs
    (`evaluation.metric: pkg.mod:fn`); bounded by `evaluation.max_val_samples`, since it is not streamed."""

    def __init__(self, fn, name: str, output: str = "auto") -> None:
        super().__init__(output)
        self.fn = fn
        self.metric_name = name

    def metric_state(self):
        return {"outputs": [], "targets": []}

    def update(self, state, output, target, teacher=None):
        state["outputs"].append(output.detach().float().cpu())
        state["targets"].append(target.detach().cpu())

    def compute(self, state):
        if not state["outputs"]:
            return float("nan")
        return float(self.fn(torch.cat(state["outputs"]), torch.cat(state["targets"])))


BUILTIN = {"classification": Classification, "regression": Regression, "distillation": Distillation,
           "language_modeling": LanguageModeling, "model_loss": ModelLoss}


def make_task(spec_task: Any = None, metric: str = "accuracy") -> Task:
    """The task a spec asks for: `task: {kind, output, loss, metric, temperature}` or `{factory, kwargs}`.

    `evaluation.metric` (legacy) may name a function `metric(outputs, targets) -> float` for classification."""
    from autoprune.model.factories import import_object

    kind = getattr(spec_task, "kind", None) or "classification"
    factory = getattr(spec_task, "factory", None)
    output = getattr(spec_task, "output", None) or "auto"
    if factory:
        fn = import_object(factory, "task factory")
        try:
            task = fn(**(getattr(spec_task, "kwargs", None) or {}))
        except Exception as e:
            raise AutopruneError(f"task factory {factory!r} failed: {type(e).__name__}: {e}") from None
        if not isinstance(task, Task):
            raise AutopruneError(f"task factory {factory!r} returned {type(task).__name__}, not an autoprune.model.task.Task")
        return task
    task_metric = getattr(spec_task, "metric", None)
    if kind == "distillation":
        if metric not in ("accuracy", "top1") and metric:
            raise AutopruneError(f"evaluation.metric {metric!r}: the distillation task is label-free; set task.metric to cosine or agreement")
        return Distillation(output, getattr(spec_task, "loss", None), task_metric, getattr(spec_task, "temperature", 1.0))
    if getattr(spec_task, "loss", None):
        raise AutopruneError(f"task.loss is for distillation; task {kind!r} has its own loss (subclass Task for another)")
    if kind == "language_modeling":
        return LanguageModeling(output, task_metric)
    if kind == "model_loss":
        if task_metric not in (None, "neg_loss"):
            raise AutopruneError(f"task.metric {task_metric!r}: model_loss is scored by neg_loss, minus the model's own "
                                 "loss (subclass Task for another metric)")
        return ModelLoss(output)
    if kind == "regression":
        if task_metric not in (None, "neg_mse"):
            raise AutopruneError(f"task.metric {task_metric!r}: regression is scored by neg_mse (subclass Task for another)")
        return Regression(output)
    if task_metric not in (None, "accuracy", "top1"):
        raise AutopruneError(f"task.metric {task_metric!r}: classification is scored by accuracy (or evaluation.metric: pkg.mod:fn)")
    if metric in ("accuracy", "top1", None):
        return Classification(output)
    return LegacyMetric(import_object(metric, "metric"), metric, output)
