"""Recovery after the plan is chosen: prune one-shot or gradually (polynomial / AGP) while fine-tuning.

Schedules follow TF-MOT's ``PolynomialDecay`` (each group's ratio goes from ``initial`` to its final value
between ``begin_step`` and ``end_step`` with a given ``power``, pruning every ``frequency`` steps) and Zhu &
Gupta's AGP (the cubic case, from zero). Structured mode removes channels at every pruning step with
Torch-Pruning (scores recomputed on the current weights); unstructured mode re-applies magnitude masks.
The final model always has exactly the plan's architecture (same kept channels as ``PrunableModel.apply``).
Written here because Torch-Pruning has no cost-budgeted schedule driver and TF-MOT is TensorFlow-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autoprune.errors import AutopruneError
from autoprune.pruning.clone import clone_module
from autoprune.pruning.groups import PrunableModel
from autoprune.pruning.plan import PruningPlan

SCHEDULES = ("oneshot", "polynomial", "agp")


@dataclass(frozen=True)
class Schedule:
    """When and how much to prune during fine-tuning (fractions of the plan's final ratios)."""

    kind: str = "oneshot"
    steps: int = 300
    begin_step: int = 0
    end_step: int | None = None  # default: 2/3 of the steps, leaving the rest to recover
    frequency: int = 25
    initial: float = 0.0  # fraction of the final ratio at begin_step
    power: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise AutopruneError(f"schedule {self.kind!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.steps < 0 or self.frequency <= 0:
            raise AutopruneError("schedule needs steps >= 0 and frequency > 0")

    @property
    def end(self) -> int:
        return self.end_step if self.end_step is not None else max(self.begin_step, (2 * self.steps) // 3)

    def fraction(self, step: int) -> float:
        """Fraction of each group's final ratio to have pruned at `step`."""
        if self.kind == "oneshot" or step >= self.end:
            return 1.0
        if step < self.begin_step:
            return 0.0
        span = max(self.end - self.begin_step, 1)
        t = (step - self.begin_step) / span
        initial = 0.0 if self.kind == "agp" else self.initial
        power = 3.0 if self.kind == "agp" else self.power
        return 1.0 + (initial - 1.0) * (1.0 - t) ** power

    def pruning_steps(self) -> list[int]:
        """Steps at which pruning happens (always including the one that reaches the final plan)."""
        if self.kind == "oneshot":
            return [0]
        pts = list(range(self.begin_step, self.end, self.frequency)) + [self.end]
        return sorted(set(min(p, self.steps) for p in pts))


def prune_to(pm_base: PrunableModel, model: nn.Module, plan: PruningPlan, fraction: float) -> nn.Module:
    """Prune `model` (a pruned-or-not copy of pm_base's model) down to `fraction` of `plan`'s cut per group.

    Kept counts are taken against the *original* widths so that fraction 1.0 lands exactly on the plan.
    """
    target_plan = pm_base.plan({n: r * fraction for n, r in plan.ratios.items()}, criterion=plan.criterion)
    if fraction >= 1.0:
        target_plan = plan
    if plan.mode == "unstructured":
        work = PrunableModel(model, pm_base.example, ignore=pm_base.ignored, mode="unstructured",
                             max_ratio=0.999, check_groups=False)
        return work.apply(PruningPlan(target_plan.ratios, "unstructured", plan.criterion, plan.round_to))
    if fraction >= 1.0 and _unchanged(model, pm_base.base):
        # one-shot from the unpruned weights: cut exactly the channels the search scored for this plan
        return pm_base.apply(plan, check=True)
    target = pm_base.kept(target_plan)
    cur = PrunableModel(model, pm_base.example, ignore=pm_base.ignored, criterion=plan.criterion,
                        round_to=1, max_ratio=0.999, calibration=pm_base.calibration, seed=pm_base.seed,
                        check_groups=False,
                        # the base's choice for each grouped-query attention, not this copy's (its fewer heads
                        # could make "auto" choose the other way): query heads where the base's were, else
                        # key/value heads
                        attention_heads="key_value",
                        query_heads=pm_base.query_head_groups)
    cur.adopt_multiples(pm_base)  # attention heads go whole here too
    cur.task, cur.teacher = getattr(pm_base, "task", None), getattr(pm_base, "teacher", None)
    ratios = {}
    for g in cur.groups:
        if g.prunable and g.name in target and target[g.name] < g.channels:
            ratios[g.name] = (g.channels - target[g.name]) / g.channels  # exact: channels_kept floors C*r
    if not ratios:
        return model
    return cur.apply(cur.plan(ratios), check=True)


def _unchanged(model: nn.Module, base: nn.Module) -> bool:
    """Same architecture and the same weights as `base` (nothing pruned or trained yet)."""
    a, b = model.state_dict(), base.state_dict()
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def widths(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def finetune(
    pm: PrunableModel,
    plan: PruningPlan,
    datasets: dict,
    *,
    schedule: Schedule,
    lr: float,
    batch_size: int = 128,
    seed: int = 0,
    show_progress: bool = False,
    reconstruct_batches: list | None = None,
    task=None,
    distill: float = 0.0,
    device: str = "cpu",
) -> nn.Module:
    """Prune `pm.base` to `plan` following `schedule` while fine-tuning on the task's loss (by default `pm.task`,
    else classification; a distillation task learns from the unpruned `pm.base`); returns the final model.
    `distill > 0` adds that weight of knowledge distillation from the unpruned `pm.base` to the loss
    (`train_model(distill=...)`, `evaluation.recovery_distill`). Training runs on `device` (the spec's
    `evaluation.device`); pruning steps and the returned model are on the CPU, where `pm` traced the model."""
    from autoprune.model.training import train_model

    task = task or getattr(pm, "task", None)
    teacher = pm.base if distill > 0 or (task is not None and task.needs_teacher) else None
    pm.validate(plan)
    model = clone_module(pm.base)
    points = schedule.pruning_steps()
    done = 0
    for i, p in enumerate(points):
        if p > done:  # train up to the next pruning point
            train_model(model, datasets["train"], epochs=1, lr=lr, batch_size=batch_size, seed=seed + i,
                        max_steps=p - done, show_progress=show_progress, desc="finetune", task=task, teacher=teacher,
                        distill=distill, device=device)
            done = p
        model = prune_to(pm, model.cpu(), plan, schedule.fraction(p))  # traced with pm's example, on the CPU
        if schedule.kind == "oneshot" and reconstruct_batches and plan.mode == "structured":
            from autoprune.pruning.reconstruct import reconstruct_plan

            reconstruct_plan(pm, plan, model, reconstruct_batches)
    if schedule.steps > done:
        train_model(model, datasets["train"], epochs=1, lr=lr, batch_size=batch_size, seed=seed + len(points),
                    max_steps=schedule.steps - done, show_progress=show_progress, desc="finetune", task=task,
                    teacher=teacher, distill=distill, device=device)
    model = model.cpu()
    if plan.mode == "unstructured":  # masks are not kept during training: re-apply the final sparsity
        model = prune_to(pm, model, plan, 1.0)
    return model.eval()
