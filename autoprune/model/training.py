"""Training and fine-tuning loops (plain torch; small enough that a framework would add nothing)."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from autoprune._progress import progress
from autoprune.model.task import Classification, Distillation, Task, call_model, to_device

log = logging.getLogger(__name__)
_KD_SKIPPED: set[str] = set()  # tasks warned about once: their outputs cannot be distilled


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a tensor moved there reports it: plain "cuda" is the current CUDA device ("cuda:0"), so that
    a model already there compares equal (before, `evaluation.device: cuda` never did, and every score copied
    the model). Other devices without an index compare by type."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return d


def on_device(model: nn.Module, device: str) -> nn.Module:
    """`model` if it already lives on `device`, else a copy moved there (the unpruned model stays where it is:
    the pruner copies it and the costs are counted on it)."""
    p = next(model.parameters(), None)
    if p is None or same_device(p.device, resolve_device(device)):
        return model
    import copy

    return copy.deepcopy(model).to(device)


def same_device(have: torch.device, want: torch.device) -> bool:
    """A tensor on `have` is on `want` (a `resolve_device` result; one without an index matches any index)."""
    return have == want or (want.index is None and have.type == want.type)


def _shape(t: Any) -> str:
    return f"tensor{list(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else type(t).__name__


def _bn_l1(model: nn.Module) -> torch.Tensor:
    terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def distill_loss(task: Task, student: Any, teacher: Any, temperature: float = 4.0) -> torch.Tensor | None:
    """The knowledge-distillation term added by `train_model(distill=...)`, or None when it does not apply.

    * a classification task (its output is logits, classes in the last dimension): Hinton's
      `T² · KL(softmax(teacher/T) ‖ softmax(student/T))`, averaged over the samples (every position of a sequence
      output counts as one sample);
    * any other task whose output is a floating tensor of the teacher's shape (regression, a custom task):
      MSE between the two outputs (no softmax: the output need not be logits);
    * anything else (shapes differ, integer outputs): None, and the caller skips the term.
    """
    if not task.distills or not (isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)):
        return None
    if student.shape != teacher.shape or not student.is_floating_point() or not teacher.is_floating_point():
        return None
    if isinstance(task, Classification) and student.dim() >= 1:  # one row of logits per sample (or position)
        kd = Distillation(loss="kl", temperature=temperature)
        student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    else:
        kd = Distillation(loss="mse")
    return kd.loss(student.float(), None, teacher.float())


def train_model(
    model: nn.Module,
    train_set: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    seed: int = 0,
    sparsity_l1: float = 0.0,
    max_steps: int | None = None,
    device: str = "cpu",
    desc: str = "train",
    step_hook: Callable[[int, int], None] | None = None,
    show_progress: bool = True,
    task: Task | None = None,
    teacher: nn.Module | None = None,
    distill: float = 0.0,
    distill_temperature: float = 4.0,
) -> list[float]:
    """Adam with cosine decay on the task's loss; returns the mean loss per epoch. Deterministic for a fixed seed.

    `train_set` is a Dataset (batched and shuffled here) or the user's own DataLoader (used as it is).
    `max_steps` caps the number of optimiser steps (used by short fine-tunes); `step_hook(step, total)`
    runs after every step. `sparsity_l1` adds an L1 penalty on BN scales (Network Slimming). `task` defaults
    to classification (cross-entropy); a task that `needs_teacher` (distillation) compares with `teacher`'s
    output on the same batch.

    `distill > 0` with a `teacher` (the unpruned model) adds `distill * distill_loss(...)` to the task's loss
    (knowledge distillation in recovery fine-tunes: Hinton KD at `distill_temperature` on a classification task's
    logits, MSE on the outputs of other tasks; skipped with one warning when the outputs cannot be compared).
    A distillation task compares with the teacher already and ignores `distill`. The teacher runs in eval mode,
    without gradients, and only when its output is used.
    """
    from autoprune.model.data import make_loader

    task = task or Classification()
    if task.needs_teacher and teacher is None:
        raise ValueError(f"task {task.name!r} needs the teacher model")
    loader = make_loader(train_set, batch_size, shuffle=True, seed=seed, drop_last=True)
    steps_per_epoch = max(len(loader), 1)
    total = steps_per_epoch * epochs if max_steps is None else max_steps
    if total <= 0:
        return []
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    kd = distill > 0 and teacher is not None and not task.needs_teacher
    if task.needs_teacher or kd:
        teacher = on_device(teacher, device).eval()
    losses: list[float] = []
    step = 0
    bar = progress(total=total, desc=desc, disable=not show_progress)
    with torch.enable_grad():
        while step < total:
            run, n = 0.0, 0
            for batch in loader:
                x, y = task.split(to_device(batch, device))
                t_out = None
                if task.needs_teacher or kd:
                    with torch.no_grad():
                        t_out = task.forward(teacher, x)
                out = task.forward(model, x)
                loss = task.loss(out, y, t_out if task.needs_teacher else None)
                if kd:
                    term = distill_loss(task, out, t_out, distill_temperature)
                    if term is None:
                        if task.name not in _KD_SKIPPED:
                            _KD_SKIPPED.add(task.name)
                            log.warning("recovery distillation skipped: task %r's output (%s) cannot be compared with the "
                                        "teacher's (%s)", task.name, _shape(out), _shape(t_out))
                        kd = False
                    else:
                        loss = loss + distill * term
                if sparsity_l1 > 0:
                    loss = loss + sparsity_l1 * _bn_l1(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                run += float(loss.detach())
                n += 1
                bar.update(1)
                if step_hook is not None:
                    step_hook(step, total)
                if step >= total:
                    break
            losses.append(run / max(n, 1))
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512, device: str = "cpu") -> float:
    """Top-1 accuracy of `model` on `dataset`, in [0, 1]."""
    model.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        pred = call_model(model, to_device(x, device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(total, 1)
