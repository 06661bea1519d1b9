"""Wires the pipeline stages for one spec: target -> groups -> costs -> evaluation -> sensitivity.

Each stage is built lazily and once; the search, the CLI, the service and the notebooks all start here.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import cached_property
from pathlib import Path

from autoprune.costs.counting import CostModel, CostReport, cost_report
from autoprune.sensitivity.evaluate import Evaluator
from autoprune.pruning.groups import PrunableModel
from autoprune.sensitivity.sweep import SensitivityResult, run_sensitivity, sensitivity_cached, sweep_evaluations
from autoprune.spec import Spec, load_spec
from autoprune.model.loading import Target, cache_dir_for, load_target


class Session:
    """Everything derived from one spec, built on first use."""

    def __init__(self, spec: Spec | str | Path | dict, *, show_progress: bool = True) -> None:
        self.spec = spec if isinstance(spec, Spec) else load_spec(spec)
        self.show_progress = show_progress

    @property
    def run_dir(self) -> Path:
        return self.spec.run_dir

    @property
    def cache_dir(self) -> Path:
        return cache_dir_for(self.spec)

    @cached_property
    def target(self) -> Target:
        return load_target(self.spec, show_progress=self.show_progress)

    @cached_property
    def evaluator(self) -> Evaluator:
        ev = self.spec.evaluation
        return Evaluator(
            self.target.datasets,
            batch_size=self.spec.data.batch_size,
            calibration_batches=ev.calibration_batches,
            finetune_steps=ev.finetune_steps,
            finetune_lr=ev.finetune_lr or self.spec.train.lr / 10,
            metric=ev.metric,
            max_val_samples=ev.max_val_samples,
            seed=self.spec.search.seed,
            device=ev.device,
            reconstruct=ev.reconstruct,
            task=self.target.task,
            # the unpruned model: a distillation task's reference, and the teacher of recovery fine-tunes when
            # evaluation.recovery_distill > 0 (the proxy never runs it for a task that does not need it)
            teacher=self.target.model if ev.recovery_distill > 0 or getattr(self.target.task, "needs_teacher", False) else None,
            recovery_distill=ev.recovery_distill,
        )  # its `pruner` is set by the `pruner` stage (which needs the evaluator's calibration batches first)

    @cached_property
    def pruner(self) -> PrunableModel:
        p = self.spec.pruning
        pm = PrunableModel(
            self.target.model,
            self.target.example_input,
            ignore=p.ignore,
            criterion=p.criterion,
            round_to=p.round_to,
            max_ratio=p.max_ratio,
            mode=p.mode,
            attention_heads=p.attention_heads,
            calibration=self.evaluator.calibration[:4],
            seed=self.spec.search.seed,
        )
        pm.task = self.target.task  # gradient criteria (taylor, obd) use the task's loss
        self.evaluator.pruner = pm  # candidates are reconstructed against this model (evaluation.reconstruct)
        return pm

    @cached_property
    def base_costs(self) -> CostReport:
        return cost_report(self.target.model, self.target.example_input)

    @cached_property
    def cost_model(self) -> CostModel:
        return CostModel(self.pruner, self.base_costs.macs, self.base_costs.params)

    @cached_property
    def baseline_metric(self) -> float:
        """The unpruned model's metric on val, as trained (no recalibration)."""
        return self.evaluator.score(self.target.model, "val")

    def _sweep_args(self) -> dict:
        s = self.spec.sensitivity
        return dict(ratios=s.ratios, stop_drop=s.stop_drop, cache_dir=self.cache_dir / "sensitivity",
                    skip_within=self.spec.search.tolerance if s.skip_insensitive else None)

    def sensitivity_cached(self) -> bool:
        """Whether the sensitivity sweep is on disk already (then it costs no evaluation)."""
        if getattr(self, "_sensitivity", None) is not None:
            return True
        return sensitivity_cached(self.pruner, self.evaluator, **self._sweep_args())

    def sweep_estimate(self) -> tuple[int, float]:
        """(the most evaluations the sweep can take, seconds of one evaluation): the unpruned model evaluated once,
        timed; the sweep then reuses that evaluation as its baseline."""
        if getattr(self, "_baseline_eval", None) is None:
            pm = self.pruner
            t = time.perf_counter()
            metric = float(self.evaluator(pm.apply(pm.plan({}))))
            self._baseline_eval = (metric, time.perf_counter() - t)
        return sweep_evaluations(self.pruner, self.spec.sensitivity.ratios), self._baseline_eval[1]

    def sensitivity(self, map_fn=None) -> SensitivityResult:
        """Sensitivity of every group (cached by weights and settings); a copy lands in the run directory."""
        if getattr(self, "_sensitivity", None) is not None:
            return self._sensitivity
        measured = getattr(self, "_baseline_eval", None)
        res = run_sensitivity(
            self.pruner,
            self.evaluator,
            self.cost_model,
            show_progress=self.show_progress,
            map_fn=map_fn,
            baseline=measured[0] if measured else None,
            **self._sweep_args(),
        )
        if measured and res.evaluations:  # the sweep's baseline was `sweep_estimate`'s evaluation: count it
            res = replace(res, evaluations=res.evaluations + 1)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        res.table.to_csv(self.run_dir / "sensitivity.csv", index=False)
        res.table.to_parquet(self.run_dir / "sensitivity.parquet", index=False)
        self._sensitivity = res
        return res
