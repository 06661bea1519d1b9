"""The typed Python API: what the CLI, the service and the notebooks call.

    >>> from autoprune import api
    >>> result = api.search("search_spaces/mnist1d-cnn-macs50.yaml", n_trials=20)
    >>> result["best"]["macs_ratio"] <= 0.5
    True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from autoprune import settings
from autoprune.errors import AutopruneError
from autoprune.pruning.schedules import Schedule, finetune as _finetune, widths
from autoprune.exporting.files import export_model
from autoprune.pruning.plan import PruningPlan
from autoprune.results.tables import RECOVERY_FILE, load, result_path, summarize
from autoprune.searching.study import run_search
from autoprune.app.session import Session
from autoprune.spec import Spec, load_spec


def session(spec: Spec | str | Path | dict, overrides: dict[str, Any] | None = None, *, show_progress: bool = True) -> Session:
    settings.configure()  # the Python front door: AUTOPRUNE_* read once per session
    return Session(load_spec(spec, overrides) if not isinstance(spec, Spec) else spec, show_progress=show_progress)


def search(
    spec: Spec | str | Path | dict | Session,
    *,
    strategy: str | None = None,
    n_trials: int | None = None,
    storage: str | None = None,
    overrides: dict[str, Any] | None = None,
    show_progress: bool = True,
    test: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a search and return its result (also written to the run directory)."""
    s = spec if isinstance(spec, Session) else session(spec, overrides, show_progress=show_progress)
    run = run_search(s, strategy=strategy, n_trials=n_trials, storage=storage, show_progress=show_progress)
    return summarize(run, test=test)


def plan_of(run_dir: str | Path, *, strategy: str = "optuna", trial: int | None = None) -> PruningPlan:
    """The best plan of a run (or a given trial's plan)."""
    res = load(run_dir)
    if trial is None:
        r = res.results.get(strategy)
        if r is None:
            raise AutopruneError(f"no result for strategy {strategy!r} in {run_dir}; have {sorted(res.results)}")
        if not r.get("best"):
            raise AutopruneError(f"strategy {strategy!r} in {run_dir} has no plan that meets the budget")
        return PruningPlan.from_dict(r["best"]["plan"])
    rows = res.trials[(res.trials.strategy == strategy) & (res.trials.number == trial)]
    if rows.empty or rows.iloc[0].plan is None:
        raise AutopruneError(f"trial {trial} of strategy {strategy!r} not found in {run_dir}")
    return PruningPlan.from_dict(json.loads(rows.iloc[0].plan))


def export(
    spec: Spec | str | Path | dict | Session,
    *,
    out: str | Path | None = None,
    plan: PruningPlan | None = None,
    strategy: str = "optuna",
    trial: int | None = None,
    onnx: bool = True,
    show_progress: bool = True,
) -> Path:
    """Apply the best (or a given) plan, recalibrate BN, and write the smaller model to `out` (`spec`: a spec, or a
    session already open, whose model, data and graph are reused)."""
    s = spec if isinstance(spec, Session) else session(spec, show_progress=show_progress)
    plan = plan or plan_of(s.run_dir, strategy=strategy, trial=trial)
    s.pruner.validate(plan)
    model = s.pruner.apply(plan)
    metric_val = s.evaluator(model, "val")
    metrics = {"val": metric_val, "test": s.evaluator.score(model, "test")}
    out = Path(out) if out else s.run_dir / "export"
    export_model(model, out, plan=plan, model_spec=s.spec.model.model_dump(), pruning=s.spec.pruning.model_dump(),
                 base_costs=s.base_costs, metrics=metrics, onnx=onnx, example=s.target.example_input,
                 task=s.spec.task.model_dump())
    return out


def finetune(
    run: str | Path | Session,
    *,
    schedule: str = "oneshot",
    steps: int | None = None,
    lr: float | None = None,
    strategy: str = "optuna",
    out: str | Path | None = None,
    frequency: int = 25,
    reconstruct: bool = False,
    initial: float = 0.0,
    power: float = 3.0,
    begin_step: int = 0,
    end_step: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune a run's best plan with a schedule, export it, and return metrics and costs. The loss is the task's
    plus `evaluation.recovery_distill` times the distillation term from the unpruned model (0: the task's alone).
    `run`: a run directory, its spec, or a session already open (its model, data and graph are reused)."""
    s = run if isinstance(run, Session) else session(run, show_progress=show_progress)
    plan = plan_of(s.run_dir, strategy=strategy)
    steps = 300 if steps is None else steps
    lr = lr if lr is not None else s.spec.recovery_lr  # search.recovery_lr, else train.lr / 10
    sched = Schedule(schedule, steps=steps, frequency=frequency, initial=initial, power=power,
                     begin_step=begin_step, end_step=end_step)
    model = _finetune(s.pruner, plan, s.target.datasets, schedule=sched, lr=lr, batch_size=s.spec.data.batch_size,
                     seed=s.spec.search.seed, show_progress=show_progress,
                     reconstruct_batches=s.evaluator.calibration if reconstruct else None,
                     distill=s.spec.evaluation.recovery_distill,  # 0 (default): the task's loss alone
                     device=s.spec.evaluation.device)
    expected = widths(s.pruner.apply(plan, check=False))
    if widths(model) != expected:
        raise AutopruneError("fine-tuned model does not match the plan's architecture (internal error)")
    metrics = {"val": s.evaluator.score(model, "val"), "test": s.evaluator.score(model, "test")}
    out = Path(out) if out else s.run_dir / "finetuned"
    manifest = export_model(model, out, plan=plan, model_spec=s.spec.model.model_dump(),
                            pruning=s.spec.pruning.model_dump(), base_costs=s.base_costs, metrics=metrics, onnx=False,
                            example=s.target.example_input, task=s.spec.task.model_dump())
    record = {"strategy": strategy, "schedule": schedule, "steps": steps, "lr": lr, "metrics": metrics,
              "plan": plan.to_dict()}
    (out / RECOVERY_FILE).write_text(json.dumps(record, indent=2))  # what `autoprune report` reads back
    return {**{k: record[k] for k in ("schedule", "steps", "lr", "metrics")}, "costs": manifest["costs"], "out": str(out)}


def recover(
    spec: Spec | str | Path | dict | Session,
    *,
    strategies: Sequence[str] = ("optuna", "uniform", "global", "lamp"),
    steps: int = 300,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Fine-tune each strategy's best plan the same `steps` (one-shot, lr search.recovery_lr, else train.lr / 10)
    and compare them after it: one row per strategy (val and test before and after). Each recovered model goes to
    RUN/recovered/STRATEGY, where `autoprune report` finds it. Why: the default search ranks plans by how they
    should recover (the metric plus the width balance), not by the metric before recovery, so a comparison before
    recovery can rank its plan under a heuristic's that recovers worse (README: the peer benchmark)."""
    s = spec if isinstance(spec, Session) else session(spec, show_progress=show_progress)
    res = load(s.run_dir)
    rows = []
    for st in strategies:
        if not (res.results.get(st) or {}).get("best"):
            raise AutopruneError(f"no plan of strategy {st!r} to recover in {s.run_dir}; run `autoprune search` "
                                 f"with --strategy {st} (or --baselines) first")
        # one session for every strategy: the model, data, graph and evaluator are built once, not per strategy
        r = finetune(s, strategy=st, steps=steps, out=s.run_dir / "recovered" / st, show_progress=show_progress)
        b = res.results[st]["best"]
        rows.append({"strategy": st, "val_before": b.get("metric_val"), "test_before": b.get("metric_test"),
                     "steps": steps, "val": r["metrics"]["val"], "test": r["metrics"]["test"],
                     "macs_ratio": b.get("macs_ratio")})
    return pd.DataFrame(rows)


__all__ = ["session", "search", "export", "finetune", "recover", "plan_of", "load", "result_path", "Session"]
