"""Fast candidate evaluation: optional least-squares reconstruction of the layers consuming pruned channels,
adaptive BatchNorm recalibration (EagleEye), optional short fine-tune, then the metric on `val`.
Deterministic for a fixed seed: the calibration batches are drawn once."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from autoprune.model.data import make_loader
from autoprune.errors import AutopruneError
from autoprune.pruning.layers import ROOT_TYPES, out_width
from autoprune.pruning.plan import PruningPlan
from autoprune.model.task import (Classification, Task, batch_len, call_model, make_task, slice_batch, tensors_of,
                                  to_device)
from autoprune.model.training import on_device, resolve_device, same_device, train_model

if TYPE_CHECKING:
    from autoprune.pruning.groups import PrunableModel

log = logging.getLogger(__name__)
def stack_batches(dataset: Dataset, batch_size: int, n_batches: int | None, seed: int, shuffle: bool = True,
                  task: Task | None = None) -> list[tuple]:
    """Draw `n_batches` batches once, as `(inputs, target)` pairs split by `task`, so that every evaluation
    sees exactly the same data. Only for the few calibration batches: evaluation iterates `Evaluator.iter_batches`."""
    task = task or Classification()
    out = []
    for i, batch in enumerate(make_loader(dataset, batch_size, shuffle=shuffle, seed=seed)):
        if n_batches is not None and i >= n_batches:
            break
        out.append(task.split(batch))
    return out


_BN = nn.modules.batchnorm._BatchNorm


def _plain_modes(mods: list[nn.Module]) -> bool:
    """No module overrides `nn.Module.train` (what lets `_set_modes` stand in for `model.train(mode)`)."""
    return all(type(m).train is nn.Module.train for m in mods)


def _set_modes(mods: list[nn.Module], mode: bool) -> None:
    """`m.training = mode` for each module, as `nn.Module.train` sets it.

    Why by hand: BN recalibration switches modes three times per evaluation; `model.train()` walks the tree
    each time, and `nn.Module.__setattr__` type-checks every value (together ~0.2 ms of a 55 ms ResNet-20
    trial, issue 16's overhead bar). `training` is a plain instance attribute."""
    for m in mods:
        m.__dict__["training"] = mode


def _to_eval(model: nn.Module, mods: list[nn.Module], plain: bool | None = None) -> nn.Module:
    """`model.eval()`, through `_set_modes` when no module overrides `train` (`plain`: `_plain_modes(mods)`, when
    the caller knows it)."""
    if plain if plain is not None else _plain_modes(mods):
        _set_modes(mods, False)
        return model
    return model.eval()


def recalibrate_bn(model: nn.Module, batches: list[tuple], device: str = "cpu",
                   modules: list[nn.Module] | None = None) -> nn.Module:
    """Reset BatchNorm statistics and re-estimate them as an exact average over `batches` (`modules`: the
    model's `list(model.modules())`, when the caller has it)."""
    mods = list(model.modules()) if modules is None else modules
    bns = [m for m in mods if isinstance(m, _BN)]
    if not bns or not batches:
        return model
    saved = []
    for m in bns:
        m.reset_running_stats()
        saved.append(m.momentum)
        m.__dict__["momentum"] = None  # cumulative average (a plain attribute: nn.Module.__setattr__'s checks skipped)
    plain = _plain_modes(mods)
    if plain:  # only BN in train mode: what model.train() then training=False on the rest leaves, in one pass
        _set_modes(mods, False)
        _set_modes(bns, True)
    else:
        model.train()
        for m in mods:  # only BN in train mode: dropout stays off
            if not isinstance(m, _BN):
                m.training = False
    with torch.no_grad():
        for x, _ in batches:
            call_model(model, to_device(x, device))
    for m, mom in zip(bns, saved):
        m.__dict__["momentum"] = mom
    return _to_eval(model, mods, plain)


class Evaluator:
    """Scores a candidate model on `val` (or another split) after BN recalibration.

    With `reconstruct=True` a candidate made by `pruner.apply(plan)` first gets its layers that consume pruned
    channels refit by least squares on the calibration batches (`reconstruct.reconstruct_plan`), then BN
    recalibration. The plan is the one passed explicitly (`evaluate_plan`, `__call__(..., plan=)`) or the one
    `PrunableModel.apply` tagged the model with, so `evaluator(pm.apply(plan))` reconstructs too; `pruner` is the
    PrunableModel the plans refer to (a Session sets it when it builds its pruner).
    """

    def __init__(
        self,
        datasets: dict[str, Dataset],
        *,
        batch_size: int = 128,
        calibration_batches: int = 20,
        finetune_steps: int = 0,
        finetune_lr: float = 1e-3,
        metric: str = "accuracy",
        max_val_samples: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        reconstruct: bool = False,
        pruner: PrunableModel | None = None,
        task: Task | None = None,
        teacher: nn.Module | None = None,
        eval_batch_size: int = 512,
        recovery_distill: float = 0.0,
    ) -> None:
        self.datasets = datasets
        self.batch_size = batch_size
        self.calibration_batches = calibration_batches
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr
        self.task = task or make_task(None, metric)
        self.metric_name = self.task.metric_name if task is not None else metric
        self._teacher = teacher  # the unpruned model: a distillation task's reference, and recovery's teacher
        # weight of distillation from `teacher` in recovery fine-tunes (multi-fidelity rungs: `train_model(...,
        # teacher=ev.teacher, distill=ev.recovery_distill)`); never used by the proxy (`prepare`, `score`)
        self.recovery_distill = float(recovery_distill)
        if self.task.needs_teacher and teacher is None:
            raise AutopruneError(f"task {self.task.name!r} needs the unpruned model as teacher: Evaluator(teacher=...)")
        self.seed = seed
        self.device = device
        self.eval_batch_size = eval_batch_size
        self.calibration = stack_batches(datasets["train"], batch_size, calibration_batches, seed, task=self.task)
        self._teacher_out: dict[str, list[torch.Tensor]] = {}
        self.max_val_samples = max_val_samples
        self.reconstruct = reconstruct
        self.pruner = pruner
        self._batch_cache: dict[str, tuple] = {}  # split -> (its dataset, (limit, batch size), its batches)
        self._recon_batches: tuple | None = None  # (device, the calibration list, its batches moved there)
        self._base_outputs = None  # reconstruct.BaseOutputs: the unpruned layers' outputs, kept between candidates

    def __getstate__(self) -> dict:
        # the kept batches are a copy of the datasets, which travel anyway (Ray ships the objective): rebuilt there
        return {**self.__dict__, "_batch_cache": {}, "_recon_batches": None, "_base_outputs": None}

    @property
    def teacher(self) -> nn.Module | None:
        """The unpruned model on the evaluator's device (moved there once, on first use: every recovery fine-tune
        reuses that copy instead of copying the unpruned model again)."""
        if self._teacher is not None:
            self._teacher = on_device(self._teacher, self.device)
        return self._teacher

    @teacher.setter
    def teacher(self, model: nn.Module | None) -> None:
        self._teacher = model

    # a split given as a Dataset is held in memory as collated batches, after its first pass, up to this many
    # numbers (inputs and targets together); a larger split, or a user's DataLoader, is streamed every time
    BATCH_CACHE_NUMEL = 20_000_000

    def iter_batches(self, split: str):
        """`(inputs, target)` of `split` in a fixed order; `val` stops after `max_val_samples` samples.

        A split that is a Dataset (not a DataLoader) and holds at most `BATCH_CACHE_NUMEL` numbers is collated
        once and its batches kept: the same batches in the same order as streaming them, without collating every
        sample again at each evaluation (1.7 ms of a ResNet-20 trial's 60-70 ms on digits' 360 val images).
        Anything larger, and a user's own DataLoader (it may shuffle or stream), is streamed each time."""
        data = self.datasets[split]
        limit = self.max_val_samples if split == "val" else None
        key = (limit, self.eval_batch_size)
        cached = self._batch_cache.get(split)
        if cached is not None and cached[0] is data and cached[1] == key:
            yield from cached[2]
            return
        if isinstance(data, DataLoader) or not hasattr(data, "__getitem__"):
            yield from self._stream(split, limit)
            return
        kept: list[tuple] | None = []
        numel = 0
        for x, y in self._stream(split, limit):
            if kept is not None:
                numel += sum(t.numel() for t in tensors_of((x, y)))
                if numel <= self.BATCH_CACHE_NUMEL:
                    kept.append((x, y))
                else:
                    kept = None
            yield x, y
        if kept is not None:  # only a complete pass is kept (a caller may stop early)
            self._batch_cache[split] = (data, key, kept)

    def _stream(self, split: str, limit: int | None):
        """Stream `(inputs, target)` of `split` from the user's data, batch by batch."""
        seen = 0
        for batch in make_loader(self.datasets[split], self.eval_batch_size, shuffle=False):
            x, y = self.task.split(batch)
            if limit is not None:
                n = batch_len(x)
                if seen + n > limit:
                    x, y = slice_batch(x, 0, limit - seen), slice_batch(y, 0, limit - seen)
                seen += n
            yield x, y
            if limit is not None and seen >= limit:
                break

    def batches(self, split: str) -> list[tuple]:
        """All batches of `split` as a list (small splits and tests only; evaluation iterates `iter_batches`)."""
        return list(self.iter_batches(split))

    # teacher outputs are kept (on the CPU) up to this many numbers per split, else recomputed every time
    TEACHER_CACHE_NUMEL = 50_000_000
    # the unpruned model's layer outputs that reconstruction fits to, kept up to this many numbers (on the device)
    BASE_OUTPUTS_NUMEL = 50_000_000

    def _teacher_outputs(self, split: str, i: int, x) -> torch.Tensor:
        cache = self._teacher_out.setdefault(split, [])
        if i < len(cache):
            return cache[i]
        assert self._teacher is not None
        out = self.task.forward(self.teacher.eval(), x).detach()
        if i == len(cache) and sum(t.numel() for t in cache) + out.numel() <= self.TEACHER_CACHE_NUMEL:
            cache.append(out.cpu())
        return out

    def score(self, model: nn.Module, split: str = "val") -> float:
        """The task's metric of `model` as it is (no recalibration) on `split`, streamed batch by batch."""
        return self._pass(model, split, loss=False)[0]

    def score_and_loss(self, model: nn.Module, split: str = "val") -> tuple[float, float]:
        """(the task's metric, the task's loss averaged over samples) of `model` as it is on `split`, from one
        pass over the batches (the loss is what `search.score: loss` ranks plans by)."""
        return self._pass(model, split, loss=True)

    @torch.no_grad()
    def _pass(self, model: nn.Module, split: str, *, loss: bool) -> tuple[float, float]:
        model = on_device(model, self.device)  # a model elsewhere (the unpruned one) is scored on a copy
        _to_eval(model, list(model.modules()))
        state = self.task.metric_state()
        total, n = 0.0, 0
        for i, (x, y) in enumerate(self.iter_batches(split)):
            x = to_device(x, self.device)
            out = self.task.forward(model, x)
            teacher = self._teacher_outputs(split, i, x) if self.task.needs_teacher else None
            self.task.update(state, out, y, teacher)
            if loss:
                b = batch_len(x)
                total += float(self.task.loss(out, to_device(y, self.device), teacher)) * b
                n += b
        return float(self.task.compute(state)), total / max(n, 1)

    def _plan_of(self, model: nn.Module, pruner: PrunableModel | None) -> PruningPlan | None:
        """The plan `pruner.apply` tagged `model` with, when the model's widths match it (else None)."""
        tag = getattr(model, "_autoprune_plan", None)
        if tag is None or pruner is None:
            return None
        plan = PruningPlan.from_dict(tag)
        if plan.mode != "structured":
            return plan
        try:  # a model pruned by another PrunableModel (e.g. a gradual schedule's) carries a plan on other widths
            kept = pruner.kept(plan)
            mods = dict(model.named_modules())
            for name, k in kept.items():
                m = mods.get(name)
                width = out_width(m) if isinstance(m, ROOT_TYPES) else None
                if width is not None and width != k:
                    return None
        except Exception:
            return None
        return plan

    def reconstruct_model(self, model: nn.Module, plan: PruningPlan | None = None,
                          pruner: PrunableModel | None = None) -> nn.Module:
        """Least-squares refit (in place) of `model = pruner.apply(plan)` on the calibration batches."""
        pruner = pruner or self.pruner
        if pruner is None:
            raise AutopruneError("evaluation.reconstruct needs the PrunableModel: Evaluator(pruner=...) or evaluate_plan(pruner, plan)")
        plan = plan or self._plan_of(model, pruner)
        if plan is None:
            log.debug("reconstruction skipped: the model carries no plan of this pruner")
            return model
        from autoprune.pruning.reconstruct import BaseOutputs, reconstruct_plan

        kept = self._recon_batches
        if kept is None or kept[0] != self.device or kept[1] is not self.calibration:  # moved once, kept
            kept = self._recon_batches = (self.device, self.calibration,
                                          [(to_device(x, self.device), y) for x, y in self.calibration])
        if self._base_outputs is None:
            self._base_outputs = BaseOutputs(self.BASE_OUTPUTS_NUMEL)
        reconstruct_plan(pruner, plan, model, kept[2], base_outputs=self._base_outputs)
        return model

    def prepare(self, model: nn.Module, plan: PruningPlan | None = None, pruner: PrunableModel | None = None) -> nn.Module:
        """Reconstruction (when enabled), BN recalibration, then the optional short fine-tune (in place)."""
        dev = resolve_device(self.device)
        mods = list(model.modules())  # one walk for the device check and the recalibration
        devices = {t.device for m in mods for slots in (m._parameters, m._buffers) for t in slots.values() if t is not None}
        if not all(same_device(d, dev) for d in devices):
            model.to(self.device)  # (`.to` walks every module even when nothing moves: 0.3 ms of a ResNet-20 trial)
        if self.reconstruct:
            self.reconstruct_model(model, plan, pruner)
        recalibrate_bn(model, self.calibration, self.device,
                       modules=None if self.reconstruct else mods)  # (a refit that swapped a module: walked again)
        if self.finetune_steps > 0:
            train_model(
                model,
                self.datasets["train"],
                epochs=1,
                lr=self.finetune_lr,
                batch_size=self.batch_size,
                seed=self.seed,
                max_steps=self.finetune_steps,
                device=self.device,
                show_progress=False,
                task=self.task,
                teacher=self.teacher if self.task.needs_teacher else None,  # the proxy's fine-tune: no distillation
            )
            recalibrate_bn(model, self.calibration, self.device)
        return model

    def __call__(self, model: nn.Module, split: str = "val", *, plan: PruningPlan | None = None,
                 pruner: PrunableModel | None = None) -> float:
        """Reconstruct (when enabled), recalibrate (and fine-tune) `model` in place, then score it on `split`."""
        value = self.score(self.prepare(model, plan, pruner), split)
        if not math.isfinite(value):
            raise AutopruneError(f"metric {self.metric_name!r} returned {value}")
        return value

    def with_loss(self, model: nn.Module, split: str = "val", *, plan: PruningPlan | None = None,
                  pruner: PrunableModel | None = None) -> tuple[float, float]:
        """`__call__`'s metric and the task's loss, after the same preparation, from one pass over `split`."""
        value, loss = self.score_and_loss(self.prepare(model, plan, pruner), split)
        if not (math.isfinite(value) and math.isfinite(loss)):
            raise AutopruneError(f"metric {self.metric_name!r} returned {value}, the task's loss {loss}")
        return value, loss

    def evaluate_plan(self, pruner: PrunableModel, plan: PruningPlan, split: str = "val") -> float:
        """Score a candidate plan: `pruner.apply(plan)`, then the same steps as `__call__`."""
        return self(pruner.apply(plan, check=False), split, plan=plan, pruner=pruner)
