"""One candidate evaluation: plan -> pruned copy -> costs -> proxy metric, as a typed record.

Shared by every strategy and backend (Optuna in-process, Ray Tune actors, NetAdapt's greedy loop), so a
trial means the same thing wherever it ran.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import optuna

from autoprune.errors import TrialFailed
from autoprune.pruning.plan import PruningPlan
from autoprune.searching.space import SearchSpace


@dataclass
class TrialResult:
    """What one evaluation of a plan produced."""

    plan: PruningPlan
    metric: float
    macs: int
    params: int
    cost: float  # in the budget's unit (MACs, params or ms)
    budget_limit: float
    feasible: bool
    prune_s: float = 0.0
    eval_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    score: float | None = None  # what the search ranks the plan by, when not the metric (search.score: loss)

    @property
    def overshoot(self) -> float:
        return self.cost / self.budget_limit - 1.0

    def attrs(self, base_macs: int, base_params: int) -> dict[str, Any]:
        """User attributes stored on the Optuna trial (JSON-serialisable)."""
        return {
            "plan": self.plan.to_dict(),
            "metric": self.metric,
            "macs": int(self.macs),
            "params": int(self.params),
            "macs_ratio": self.macs / base_macs,
            "params_ratio": self.params / base_params,
            "cost": float(self.cost),
            "feasible": bool(self.feasible),
            "prune_s": round(self.prune_s, 4),
            "eval_s": round(self.eval_s, 4),
            **({"score": self.score} if self.score is not None else {}),
            **self.extra,
        }


def evaluate_plan(space: SearchSpace, evaluator, cost_model, plan: PruningPlan, score: str = "metric") -> TrialResult:
    """Prune a copy of the model with `plan`, count its costs and score it on val (`score`: "loss" also ranks it by
    minus the task's loss, measured in the same pass)."""
    t0 = time.perf_counter()
    model = space.pm.apply(plan, check=False)
    macs, params = cost_model.estimate(plan)
    cost = space.budget.estimate(plan)
    t1 = time.perf_counter()
    loss = None
    try:
        if score == "loss":
            metric, loss = evaluator.with_loss(model)
        else:
            metric = evaluator(model)
    except MemoryError as e:  # recorded as a failed trial; the study goes on
        raise TrialFailed(f"out of memory during evaluation: {e}") from e
    t2 = time.perf_counter()
    if not math.isfinite(metric):
        raise TrialFailed(f"metric is {metric}")
    if loss is not None and not math.isfinite(loss):
        raise TrialFailed(f"the task's loss is {loss}")
    extra = {"latency_ms": float(cost)} if space.budget.kind == "latency_ms" else {}  # predicted (latency stage)
    value = None  # what the search ranks by, when not the metric
    if loss is not None:
        extra["val_loss"] = float(loss)
        value = -float(loss)
    if score.startswith("balanced"):  # "balanced:W" (studies.search_score), W the weight
        extra["width_balance"] = balance = width_balance(model)
        value = float(metric) + float(score.partition(":")[2] or BALANCE_WEIGHT) * balance
    return TrialResult(plan, float(metric), int(macs), int(params), float(cost), space.budget.limit,
                       cost <= space.budget.limit * (1 + 1e-9), t1 - t0, t2 - t1, extra, score=value)


BALANCE_WEIGHT = 0.2  # the default of search.balance_weight: search.score balanced ranks by metric + W x width_balance


def width_balance(model) -> float:
    """Minus the coefficient of variation of the output widths of a pruned model's convolutions: 0 when every
    convolution keeps the same number of channels, more negative the more they differ; 0 for a model with fewer
    than two convolutions (a transformer, an MLP), whose widths of different kinds (heads, MLP channels) do not
    compare. Why: after the same fine-tune, plans with balanced widths recovered better than the proxy alone
    predicts on the ten-seed peer benchmark (LAMP's plans keep nearly equal widths and won the rows the search
    lost; `benchmarks/plan_features.py`), and ranking by the metric plus 0.2 x this was level or better on
    average there and on held-out models (benchmarks/README.md, "Balanced widths")."""
    import torch.nn as nn

    return balance([m.out_channels for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))])


def balance(widths) -> float:
    """Minus the coefficient of variation of a list of layer widths (0 for fewer than two): `width_balance`'s
    measure, also what `benchmarks/plan_features.py` ranks the committed plans by."""
    if len(widths) < 2:
        return 0.0
    arr = np.asarray(widths, dtype=float)
    return float(-arr.std() / arr.mean())


def objective_values(result: TrialResult, objectives: list[str], base: dict[str, float]) -> list[float]:
    """Objective values in spec order: the metric (or the score the search ranks by) first, then costs as
    fractions of the unpruned model."""
    out = []
    for o in objectives:
        if o in ("accuracy", "metric"):
            out.append(result.metric if result.score is None else result.score)
        elif o == "macs":
            out.append(result.macs / base["macs"])
        elif o == "params":
            out.append(result.params / base["params"])
        else:  # latency: the budget's own unit
            out.append(result.cost)
    return out


def directions(objectives: list[str]) -> list[str]:
    return ["maximize" if o in ("accuracy", "metric") else "minimize" for o in objectives]


class Objective:
    """The Optuna objective: suggest one ratio per searched group, project, evaluate, record."""

    def __init__(self, space: SearchSpace, evaluator, cost_model, *, objectives: list[str], budget_mode: str,
                 rungs: list[int] | None = None, reduction: int = 3, recovery_lr: float = 1e-3,
                 seed: int = 0, score: str = "metric") -> None:
        self.score = score  # "metric", "loss" or "balanced:W" (studies.search_score): what the trial's value is
        self.rungs = list(rungs or [])  # multi-fidelity: fine-tune steps after the proxy, one rung each
        self.reduction = reduction
        self.recovery_lr = recovery_lr
        self.seed = seed
        self.space = space
        self.evaluator = evaluator
        self.cost_model = cost_model
        self.objectives = objectives
        self.budget_mode = budget_mode
        self.base = {"macs": cost_model.base_macs, "params": cost_model.base_params}

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        return {n: trial.suggest_float(n, *self.space.param_range(n)) for n in self.space.dims}

    def warm_plan(self, trial: optuna.Trial) -> PruningPlan | None:
        """A warm start's own plan (enqueued with `WARM_PLAN`), when its estimated cost meets the budget.

        Why not its projection: the sampler's view of a warm start is clipped into the sensitivity bounds and
        then projected, which is another plan (LAMP's at 15 % MACs on ResNet-20 lost 13 pp of proxy that way)."""
        ratios = trial.user_attrs.get(WARM_PLAN)
        if not ratios:
            return None
        plan = self.space.pm.plan(ratios)
        return plan if self.space.budget.estimate(plan) <= self.space.budget.limit else None

    def plan_for(self, proposal: dict[str, float]) -> PruningPlan:
        if self.space.centre is not None:  # search.centre (projection mode only: see studies.resolve_centre)
            plan, _ = self.space.project_centred(proposal)
            return plan
        if self.budget_mode == "projection":
            plan, _ = self.space.project(proposal)
            return plan
        return self.space.pm.plan(self.space.clip(proposal))

    def __call__(self, trial: optuna.Trial, report: RungReport | None = None) -> float | list[float]:
        """Evaluate one trial. With rungs, `report` is told each rung's result (default: Optuna's own
        `trial.report` + `trial.should_prune`, the in-process backend; the Ray backend passes Tune's)."""
        proposal = self.suggest(trial)
        plan = self.warm_plan(trial) or self.plan_for(proposal)
        try:
            result = evaluate_plan(self.space, self.evaluator, self.cost_model, plan, self.score)
            if self.rungs:
                result = self._climb_rungs(trial, result, report)
        except optuna.TrialPruned:
            raise
        except Exception as e:
            trial.set_user_attr("plan", plan.to_dict())
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}")
            raise
        record(trial, result, self.base)
        values = objective_values(result, self.objectives, self.base)
        return values[0] if len(values) == 1 else values

    def _climb_rungs(self, trial: optuna.Trial, result: TrialResult, report: RungReport | None = None) -> TrialResult:
        """`climb_rungs` for this trial: by default Optuna's pruner decides (report the proxy at step 1, then
        the metric after rung k at step reduction**k). A trial stopped at a rung is recorded (plan, costs, the
        metric of each rung) and raised as pruned."""
        if report is None:
            def report(_result: TrialResult, metrics: list[float], step: int, last: bool) -> bool:
                trial.report(metrics[-1], step)
                return not last and trial.should_prune()  # no verdict after the last rung: the trial completes

        metrics, stopped = climb_rungs(self.space, self.evaluator, result, self.rungs, reduction=self.reduction,
                                       lr=self.recovery_lr, seed=self.seed + trial.number, report=report)
        trial.set_user_attr("rung_metrics", metrics)
        if stopped:
            record(trial, result, self.base)
            raise optuna.TrialPruned(f"stopped after rung {len(metrics) - 1} (metric {metrics[-1]:.4f})")
        return result


# report(result, rung_metrics, step, last) -> True to stop the trial here (ignored when last)
RungReport = Callable[[TrialResult, list[float], int, bool], bool]


def climb_rungs(space: SearchSpace, evaluator, result: TrialResult, rungs: list[int], *, reduction: int, lr: float,
                seed: int, report: RungReport) -> tuple[list[float], bool]:
    """Successive halving over recovery, whoever decides the promotions (Optuna's pruner, Tune's ASHA).

    Reports the proxy (`result.metric`) at step 1; then, while `report` says go on, fine-tunes the pruned model
    up to ``rungs[k-1]`` steps in all, scores it on val and reports at step ``reduction**k`` (the rung
    boundaries of a successive-halving scheduler with min resource 1). `result.metric` and `result.eval_s`
    follow the last rung reached. Returns (the metric of each rung reached, the proxy first; stopped early)."""
    from autoprune.model.training import train_model

    ev = evaluator
    metrics = [result.metric]
    if report(result, metrics, 1, False):
        return metrics, True
    model, done = None, 0
    for k, steps in enumerate(rungs, 1):
        if model is None:
            model = ev.prepare(space.pm.apply(result.plan, check=False), result.plan, space.pm)
        t0 = time.perf_counter()
        train_model(model, ev.datasets["train"], epochs=1, lr=lr, batch_size=ev.batch_size,
                    seed=seed, max_steps=steps - done, show_progress=False, desc="recover",
                    task=ev.task, teacher=ev.teacher, device=ev.device,
                    distill=ev.recovery_distill)  # evaluation.recovery_distill: distillation from the unpruned model
        done = steps
        metric = ev.score(model, "val")
        if not math.isfinite(metric):
            raise TrialFailed(f"metric after {steps} recovery steps is {metric}")
        metrics.append(float(metric))
        result.eval_s += time.perf_counter() - t0
        result.metric = float(metric)
        last = k == len(rungs)
        if report(result, metrics, reduction ** k, last) and not last:
            return metrics, True
    return metrics, False


RECORD_KEY = "record"
WARM_PLAN = "warm_plan"  # user attribute of an enqueued warm start: the plan's ratios, evaluated as they are


def record(trial: optuna.Trial, result: TrialResult, base: dict[str, float]) -> None:
    """Store the trial's result as ONE user attribute: every `set_user_attr` is a separate storage write (a
    locked journal append or an SQL transaction), and one per field cost ~20 % of a 280 ms trial."""
    set_budget_constraint(trial, result.overshoot)  # first: the journal appends it with the record, in one write
    trial.set_user_attr(RECORD_KEY, result.attrs(base["macs"], base["params"]))


def set_budget_constraint(trial: Any, overshoot: float) -> None:
    """`trial.set_constraint("budget", overshoot)`, without the read that `optuna.Trial.set_constraint` makes
    first (to warn when a constraint is set twice; `record` sets it once).

    Why: on the journal storage (`studies.TrialBatchedJournalStorage`) a read first appends the trial's
    parameters, so the read cost one more locked append and a read-back of the file each trial; written
    directly, the constraint goes out in the same append as the parameters and the record. The key is Optuna's
    own (`_CONSTRAINTS_KEY`, read back by its samplers; a test asserts `trial.constraints` sees it); any other
    trial (the Ray backend's) or Optuna without that name takes `set_constraint`."""
    key = _optuna_constraints_key()
    if type(trial) is optuna.Trial and key and math.isfinite(overshoot):
        trial.storage.set_trial_system_attr(trial._trial_id, f"{key}:budget", float(overshoot))
    else:
        trial.set_constraint("budget", overshoot)


def _optuna_constraints_key() -> str | None:
    try:
        from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
    except ImportError:
        return None
    return _CONSTRAINTS_KEY if isinstance(_CONSTRAINTS_KEY, str) else None


def trial_attrs(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial's user attributes with its result record unpacked (`plan`, `metric`, `macs_ratio`, `feasible`, ...)."""
    a = trial.user_attrs
    rec = a.get(RECORD_KEY)
    if not isinstance(rec, dict):
        return a
    return {**rec, **{k: v for k, v in a.items() if k != RECORD_KEY}}


def result_dict(result: TrialResult) -> dict[str, Any]:
    d = asdict(result)
    d["plan"] = result.plan.to_dict()
    return d
