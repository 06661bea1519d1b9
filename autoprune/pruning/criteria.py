"""Channel importance criteria, all through Torch-Pruning's importance classes.

A criterion scores every channel of a group (one score per root channel; low = pruned first).
Scores depend only on the unpruned model, so they are computed once and reused for every plan.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from autoprune.model.task import call_model

CRITERION_HELP: dict[str, str] = {
    "l1": "L1 norm of each channel's weights across the group (magnitude)",
    "l2": "L2 norm of each channel's weights across the group (magnitude, default)",
    "bn_scale": "absolute BatchNorm scale (Network Slimming); pair with train.sparsity_l1",
    "taylor": "first-order Taylor |w * dL/dw| on calibration batches",
    "random": "random scores (a control), seeded",
    "obd": "second-order OBD: w^2 * diagonal Hessian (mean squared per-sample gradients), summed over the group",
    "apoz": "activation-based: 1 - average percentage of zeros after the activation on calibration batches",
    "fpgm": "filter pruning via geometric median (FPGM): filters nearest the others' median pruned first",
}


def make_importance(name: str) -> tp.importance.Importance:
    """The Torch-Pruning importance object for a criterion name."""
    imp = tp.importance
    if name == "l1":
        return imp.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return imp.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        return imp.BNScaleImportance()
    if name == "taylor":
        return imp.GroupTaylorImportance()
    if name == "random":
        return imp.RandomImportance()
    if name == "obd":
        return imp.GroupHessianImportance()
    if name == "fpgm":
        return _FPGM()
    if name == "lamp":
        return imp.LAMPImportance(p=2)
    if name == "global_l2":
        return imp.GroupMagnitudeImportance(p=2, normalizer="mean")
    raise ValueError(f"unknown criterion {name!r}; choose one of {sorted(CRITERION_HELP)}")


class _FPGM(tp.importance.FPGMImportance):
    """FPGM without the grouped convolutions' input side.

    Torch-Pruning 1.6's FPGMImportance repeats a 2-D score matrix for a grouped (not depthwise) conv's input
    channels and crashes (`local_imp.repeat(layer.groups)`); such a group is scored here from its other layers
    (the producing conv's filters, the consumers that are not grouped), which is what FPGM ranks by anyway."""

    def __call__(self, group, **kwargs):
        def grouped_input(item) -> bool:
            layer, fn = item.dep.layer, item.dep.pruning_fn
            return (fn == tp.pruner.function.prune_conv_in_channels and isinstance(layer, nn.Conv2d | nn.Conv1d)
                    and layer.groups not in (1, layer.in_channels))

        if any(grouped_input(item) for item in group._group):
            group = copy.copy(group)
            group._group = [item for item in group._group if not grouped_input(item)]
        return super().__call__(group, **kwargs)


def needs_gradients(name: str) -> bool:
    return name in ("taylor", "obd")


def prepare_gradients(
    name: str, model: nn.Module, imp: tp.importance.Importance, batches: list[tuple], task=None, teacher: nn.Module | None = None,
) -> None:
    """Accumulate the gradients a gradient-based criterion needs on calibration batches of (inputs, target),
    with the task's loss (cross-entropy by default; distillation compares with `teacher`)."""
    from autoprune.model.task import Classification, batch_len, slice_batch

    task = task or Classification()

    def loss_fn(x, y):
        t_out = None
        if task.needs_teacher:
            if teacher is None:
                raise ValueError(f"criterion {name!r} with task {task.name!r} needs the teacher model")
            with torch.no_grad():
                t_out = task.forward(teacher, x)
        return task.loss(task.forward(model, x), y, t_out)

    model.eval()
    model.zero_grad()
    with torch.enable_grad():
        for x, y in batches:
            if name == "obd":
                # diagonal Hessian estimate (empirical Fisher): mean of squared per-sample gradients.
                # Accumulated here rather than with imp.accumulate_grad: in Torch-Pruning 1.6.1 that method
                # tests `name in` a dict keyed by parameters, so it keeps only the LAST sample's gradient.
                accu, count = imp._accu_grad, imp._counter  # type: ignore[attr-defined]
                for i in range(min(batch_len(x), 16)):
                    model.zero_grad()
                    loss_fn(slice_batch(x, i, i + 1), slice_batch(y, i, i + 1)).backward()
                    for p in model.parameters():
                        if p.grad is not None:
                            g2 = p.grad.detach().pow(2)
                            accu[p] = accu[p] + g2 if p in accu else g2.clone()
                            count[p] = count.get(p, 0) + 1
            else:
                loss_fn(x, y).backward()


def apoz_scores(model: nn.Module, layers: dict[str, nn.Module], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average percentage of zeros after each root layer's activation; returns 1 - APoZ per channel.

    Torch-Pruning has no APoZ importance (its ActivationImportance is a magnitude of activations),
    so the statistic is measured here with forward hooks on the calibration batches.
    """
    stats: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = []

    def hook(name: str) -> Callable:
        def fn(_m, _inp, out):
            a = torch.relu(out.detach())
            dims = [d for d in range(a.dim()) if d != 1] if a.dim() > 2 else [0]
            stats[name].append((a > 0).float().mean(dim=dims))

        return fn

    for n, m in layers.items():
        hooks.append(m.register_forward_hook(hook(n)))
    try:
        with torch.no_grad():
            model.eval()
            for x, _ in batches:
                call_model(model, x)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.stack(v).mean(0) if v else torch.zeros(0) for n, v in stats.items()}
