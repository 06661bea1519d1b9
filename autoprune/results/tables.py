"""Results stage: tables of trials, the re-measured best plan, the Pareto front, and result files.

`summarize(run)` turns a finished (or interrupted) search into ``result-<strategy>.json`` in the run
directory (``result.json`` for the main ``optuna`` strategy); `load(run_dir)` reads a run back as pandas
DataFrames for reports, plots and notebooks, also while a study is still running.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from autoprune.errors import AutopruneError
from autoprune.pruning.plan import PruningPlan
from autoprune.model.task import scored_by_accuracy
from autoprune.searching.objective import trial_attrs
from autoprune.searching.space import pareto_mask
from autoprune.searching.studies import SearchRun, open_storage, storage_url
from autoprune.spec import SPEC_FILE

TRIAL_COLUMNS = ["strategy", "number", "state", "metric", "score", "macs", "params", "macs_ratio", "params_ratio", "cost",
                 "latency_ms", "feasible", "warm_start", "fail_reason", "duration_s", "prune_s", "eval_s", "plan",
                 "datetime_start", "datetime_complete", "width_balance"]


def result_path(run_dir: str | Path, strategy: str) -> Path:
    return Path(run_dir) / ("result.json" if strategy == "optuna" else f"result-{strategy}.json")


def trials_frame(study: optuna.Study, strategy: str | None = None) -> pd.DataFrame:
    """One row per trial with its plan, costs, metric and state (works while the study runs)."""
    strategy = strategy or study.user_attrs.get("strategy") or study.study_name.rpartition(":")[2]
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = trial_attrs(t)
        dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({
            "strategy": strategy,
            "number": t.number,
            "state": t.state.name,
            # the metric a trial recorded; its value is what the search ranked it by (the metric, or minus the
            # task's loss under search.score: loss)
            "metric": a.get("metric", t.values[0] if t.values else None),
            "score": t.values[0] if t.values else a.get("score", a.get("metric")),
            "macs": a.get("macs"),
            "params": a.get("params"),
            "macs_ratio": a.get("macs_ratio"),
            "params_ratio": a.get("params_ratio"),
            "cost": a.get("cost"),
            "latency_ms": a.get("latency_ms"),
            "feasible": bool(a.get("feasible", False)) and t.state == TrialState.COMPLETE,
            "warm_start": a.get("warm_start"),
            "fail_reason": a.get("fail_reason"),
            "duration_s": dur,
            "prune_s": a.get("prune_s"),
            "eval_s": a.get("eval_s"),
            "plan": json.dumps(a.get("plan")) if a.get("plan") else None,
            "datetime_start": t.datetime_start,
            "datetime_complete": t.datetime_complete,
            "width_balance": a.get("width_balance"),  # search.score: balanced
        })
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def pareto_flags(df: pd.DataFrame, cost_col: str = "macs_ratio") -> pd.Series:
    """True for feasible completed trials that no other feasible trial dominates (metric up, cost down)."""
    flags = pd.Series(False, index=df.index)
    ok = df[(df.state == "COMPLETE") & df.feasible & df[cost_col].notna()]
    if ok.empty:
        return flags
    mask = pareto_mask(list(zip(ok.metric.astype(float), ok[cost_col].astype(float))))
    flags.loc[ok.index] = mask
    return flags


def _record(row: pd.Series, plan: PruningPlan) -> dict[str, Any]:
    return {
        "trial": int(row.number),
        "metric_val": float(row.metric),
        "metric": float(row.metric),
        "score": float(row.score),  # what the search ranked it by (search.score): the metric, metric + width balance, or minus the loss
        "macs": int(row.macs),
        "params": int(row.params),
        "macs_ratio": float(row.macs_ratio),
        "params_ratio": float(row.params_ratio),
        "cost": float(row.cost),
        "plan": plan.to_dict(),
        "summary": plan.summary(),
    }


def _pareto_records(front: pd.DataFrame, session, budget, measured: dict[int, float]) -> list[dict[str, Any]]:
    """The Pareto front's records; under a latency budget each point is re-measured on the device
    (`latency_ms`, and `meets_budget` by that measurement, not by the prediction). `measured` holds the trials
    the best-plan selection already re-measured; they are not timed again."""
    out = []
    for _, r in front.iterrows():
        plan = PruningPlan.from_dict(json.loads(r.plan))
        rec = _record(r, plan)
        if budget.kind == "latency_ms":
            try:
                rec["latency_ms"] = measured.get(int(r.number))
                if rec["latency_ms"] is None:
                    rec["latency_ms"] = float(budget.measure(session.pruner.apply(plan)))
                rec["meets_budget"] = rec["latency_ms"] <= budget.limit * (1 + 1e-9)
            except Exception as e:  # a dead agent: the point stays, unconfirmed
                rec["latency_ms"], rec["meets_budget"] = None, None
                rec["remeasure_error"] = f"{type(e).__name__}: {e}"
        out.append(rec)
    return out


def _rerank(ok: pd.DataFrame, session, k: int, steps: int,
            deadline: float | None = None) -> tuple[pd.DataFrame, list[dict[str, Any]], int]:
    """Order the k best trials by the proxy, plus every warm start (uniform, global, LAMP, sensitivity-greedy),
    by val after a `steps`-step fine-tune; the other trials follow in proxy order.

    Why: the BN-recalibrated proxy ranks plans by how well they work *before* recovery; the benchmark measured
    its rank correlation with the fine-tuned metric at -0.6..0.7, and a heuristic plan with a lower proxy can
    recover better (LAMP on MobileNetV2). A short fine-tune of a handful of finalists is a cheap second fidelity.
    With a `deadline` (`time.perf_counter()` time: what `search.timeout_s` left), no candidate starts after it.
    Returns (the reordered trials, the re-ranked candidates, how many candidates there were)."""
    import copy

    ev = copy.copy(session.evaluator)  # same calibration and val batches, same seed
    ev.finetune_steps = steps
    distinct = ok.drop_duplicates("plan")
    cands = pd.concat([distinct.head(k), distinct[distinct.warm_start.notna()]]).drop_duplicates("number")
    out = []
    for _, row in cands.iterrows():
        if deadline is not None and time.perf_counter() >= deadline:
            break
        score = ev.evaluate_plan(session.pruner, PruningPlan.from_dict(json.loads(row.plan)))
        out.append({"trial": int(row.number), "metric_val": float(row.metric), "metric_rerank": float(score),
                    "warm_start": row.warm_start if isinstance(row.warm_start, str) else None})
    out.sort(key=lambda r: -r["metric_rerank"])
    order = [r["trial"] for r in out]
    first = ok[ok.number.isin(order)].set_index("number").loc[order].reset_index()
    return pd.concat([first, ok[~ok.number.isin(order)]], ignore_index=True), out, len(cands)


def summarize(run: SearchRun, *, test: bool = True, write: bool = True) -> dict[str, Any]:
    """Pick the best trial whose re-measured cost meets the budget, score it on test, write the result file."""
    session, budget = run.session, run.space.budget
    df = trials_frame(run.study, run.strategy)
    latency = budget.kind == "latency_ms"
    df["pareto"] = pareto_flags(df, "cost" if latency else "macs_ratio")  # cost = predicted ms for latency
    ok = df[(df.state == "COMPLETE") & df.feasible].sort_values(["score", "cost"], ascending=[False, True])
    reranked: list[dict[str, Any]] = []
    notes = list(run.notes)
    k, timeout = session.spec.search.rerank_top_k, session.spec.search.timeout_s
    if k and run.strategy == "optuna" and not ok.empty:
        # search.timeout_s covers the whole search: the re-rank gets what the trials left of it
        deadline = time.perf_counter() + max(timeout - run.wall_s, 0.0) if timeout else None
        ok, reranked, n_cands = _rerank(ok, session, k, session.spec.search.rerank_steps, deadline)
        if len(reranked) < n_cands:
            notes.append(f"search.timeout_s ({timeout:g} s): the re-rank fine-tuned {len(reranked)} of its "
                         f"{n_cands} finalists before the limit; the others keep their proxy order")
    best = None
    rejected = []
    measured_by_trial: dict[int, float] = {}
    for _, row in ok.iterrows():
        plan = PruningPlan.from_dict(json.loads(row.plan))
        model = session.pruner.apply(plan)
        try:
            measured = float(budget.measure(model))
        except Exception as e:  # e.g. the latency agent died: this plan cannot be confirmed, try the next
            rejected.append({"trial": int(row.number), "error": f"{type(e).__name__}: {e}"})
            continue
        measured_by_trial[int(row.number)] = measured
        if measured > budget.limit * (1 + 1e-9):  # the estimate was wrong: never report it as meeting the budget
            rejected.append({"trial": int(row.number), "measured": measured})
            continue
        best = _record(row, plan)
        best["measured_cost"] = measured
        if reranked:
            best["metric_rerank"] = {r["trial"]: r["metric_rerank"] for r in reranked}.get(best["trial"])
        if latency:
            best["latency_ms"] = measured
        if test:
            best["metric_test"] = float(session.evaluator(model, "test"))
        break
    bounds_binding = _bounds_binding(run, df, best)
    base = session.base_costs
    result = {
        "name": session.spec.name,
        "strategy": run.strategy,
        "sampler": session.spec.search.sampler if run.strategy == "optuna" else None,
        "priors": run.priors,
        "budget_mode": run.budget_mode,
        "budget": {"kind": budget.kind, "fraction": budget.fraction, "limit": budget.limit, "base": budget.base},
        "metric_name": session.evaluator.metric_name,  # what metric_val and metric_test are (accuracy, neg_nll, ...)
        "baseline": {"metric_val": float(session.baseline_metric), "metric": float(session.baseline_metric), "macs": base.macs, "params": base.params},
        "best": best,
        "rejected_by_remeasure": rejected,
        "rerank": reranked,
        "pareto": _pareto_records(df[df.pareto], session, budget, measured_by_trial),
        "n_trials_complete": int((df.state == "COMPLETE").sum()),
        "n_trials_failed": int((df.state == "FAIL").sum()),
        "n_trials_pruned": int((df.state == "PRUNED").sum()),  # multi-fidelity: stopped at a rung
        "failures": [{"trial": int(r.number), "reason": r.fail_reason} for _, r in df[df.state == "FAIL"].iterrows()],
        "evaluations": int(df.state.isin(["COMPLETE", "PRUNED"]).sum()) + run.sensitivity_evaluations,
        "sensitivity_evaluations": run.sensitivity_evaluations,
        "search_bounds": run.space.bounds,
        "search_centre": run.space.centre_name,  # search.centre as used: "none" (a ratio per group) or "lamp"
        "bounds_binding": bounds_binding,
        "notes": notes,
        "wall_s": round(run.wall_s, 2),
        "storage": storage_url(session.spec) if not session.spec.search.storage else "(configured storage)",
    }
    if note := _bounds_note(bounds_binding):
        result["notes"] = result["notes"] + [note]
    if best is None:
        result["notes"] = result["notes"] + ["no completed trial met the budget"]
    elif hint := _rerank_hint(best, float(session.baseline_metric), run.strategy, bool(k),
                              accuracy=scored_by_accuracy(session.evaluator.task),
                              score=run.study.user_attrs.get("score", "metric")):
        result["notes"] = result["notes"] + [hint]
    if write:
        # the groups with their MACs shares, so that plots read them without rebuilding the model
        groups = session.pruner.table().drop(columns=["members"])
        groups["macs_share"] = groups.group.map(session.cost_model.macs_shares())
        groups.to_csv(session.run_dir / "groups.csv", index=False)
        # the spec the search ran with (its --set overrides applied): `export RUN`, `finetune RUN` read it
        (session.run_dir / SPEC_FILE).write_text(session.spec.model_dump_json(indent=2))
        path = result_path(session.run_dir, run.strategy)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2, default=_json_default))
        os.replace(tmp, path)
    return result


def _bounds_binding(run: SearchRun, df: pd.DataFrame, best: dict[str, Any] | None) -> dict[str, Any]:
    """Where the sensitivity bounds bind (`SearchSpace.bound_contacts`): the groups the best plan prunes up to
    its bound, and every warm start (a heuristic's own plan) that prunes some group past it, with its metric.
    Empty unless the search had bounds below pruning.max_ratio (search.priors: sensitivity)."""
    space = run.space
    if best is None or not space.bounded:
        return {}
    warm = {}
    for _, row in df[df.warm_start.notna() & (df.state == "COMPLETE") & df.plan.notna()].iterrows():
        past = {n: c for n, c in space.bound_contacts(PruningPlan.from_dict(json.loads(row.plan))).items() if c["past"]}
        if past:
            warm[str(row.warm_start)] = {"trial": int(row.number), "metric": float(row.metric), "groups": past}
    return {"best": space.bound_contacts(PruningPlan.from_dict(best["plan"])), "warm_starts": warm}


def _bounds_note(binding: dict[str, Any]) -> str | None:
    """A note when the sensitivity bounds bind: the best plan prunes groups up to their bound, or a heuristic's
    warm start prunes some past it (a shape no trial could propose). Why: the bounds come from a coarse grid
    (each group pruned alone at 0.25 / 0.5 / 0.75 by default), so a group that loses more than the tolerance at
    0.75 is held at 0.5; on three of the eight rows of the ten-seed peer benchmark LAMP's plan cut such a group
    past its bound and recovered better than the search's best (benchmarks/README.md, "Why the search does not reach LAMP's
    plans"). Nothing told a user that this is what shaped the search."""
    at, warm = binding.get("best") or {}, binding.get("warm_starts") or {}
    if not at and not warm:
        return None

    def fmt(groups: dict[str, dict], key: str) -> str:
        items = [f"{n} {c[key]:.2f}" + (f" > {c['bound']:.2f}" if key == "ratio" else "") for n, c in groups.items()]
        return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
    parts = [f"the best plan prunes {len(at)} group(s) up to their sensitivity bound ({fmt(at, 'bound')})"] if at else []
    parts += [f"the {label} warm start (trial {w['trial']}, metric {w['metric']:.4f}) prunes past the bounds "
              f"({fmt(w['groups'], 'ratio')})" for label, w in warm.items()]
    return ("; ".join(parts) + ". A group's bound is the largest swept ratio at which, pruned alone, it lost no more "
            "than search.tolerance before recovery, and no trial prunes past it; a plan past the bounds can still "
            "recover better after fine-tuning (LAMP's did on three of the README's eight benchmark rows). "
            "search.priors: none searches past them; sensitivity.ratios with points between a bound and the next "
            "swept ratio makes them finer")


DAMAGED = 0.2  # the best plan is this far (relative) under the unpruned model's metric before any recovery


def _rerank_hint(best: dict[str, Any], baseline: float, strategy: str, reranking: bool, *, accuracy: bool = True,
                 score: str = "metric") -> str | None:
    """A note when the best plan is heavily damaged before recovery and no re-rank ran: there the proxy (the
    metric before recovery) ranks plans by how they recover worst. On the peer benchmark, ResNet-20 at 15 % MACs
    (the best plan 33 % under the unpruned accuracy), a 200-step re-rank of the finalists lifted the recovered
    accuracy from 96.8 to 97.9 %, above every peer, and ranking by the loss (search.score: loss, no extra cost)
    to 97.4 %; at 30 % and 50 % (2-3 % under) the re-rank changed nothing. The evidence is a classifier's: a
    task scored otherwise (a distillation's similarity is far from 1 after pruning anyway) gets no note."""
    if strategy != "optuna" or reranking or baseline <= 0 or not accuracy:
        return None
    drop = (baseline - float(best["metric"])) / baseline
    if drop <= DAMAGED:
        return None
    loss = ("" if score == "loss" else
            "; search.score: loss costs nothing extra and ranked them better there (+0.65 pp; but -0.7 pp on "
            "MobileNetV2 at 30 % MACs, a milder budget)")
    return (f"the best plan scores {drop:.0%} under the unpruned model before recovery; that far down the proxy can "
            "rank plans poorly by how they recover (on ResNet-20 at 15 % MACs a re-rank picked plans that recovered "
            "1.1 pp better): consider search.rerank_top_k: 3 with rerank_steps: 200, which fine-tunes ~7 finalists "
            f"that many steps each before picking the best{loss} (see the README's benchmark)")


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


# ------------------------------------------------------------------ reading a run back
RECOVERY_FILE = "recovery.json"  # written by api.finetune beside the fine-tuned model: steps, lr, plan, metrics

@dataclass
class RunResults:
    """A run directory read back: result files and every study's trials as DataFrames."""

    run_dir: Path
    results: dict[str, dict] = field(default_factory=dict)  # strategy -> result json
    trials: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TRIAL_COLUMNS))
    sensitivity: pd.DataFrame | None = None
    spec: dict | None = None
    groups: pd.DataFrame | None = None  # groups.csv: the prunable groups and their MACs shares

    @property
    def result(self) -> dict | None:
        """The main search's result (optuna), else the first one found."""
        return self.results.get("optuna") or next(iter(self.results.values()), None)

    def summary(self) -> pd.DataFrame:
        """One row per strategy: its best plan's metrics and costs; with `recovered_val`/`recovered_test` (and
        `recovered_steps`) when its best plan was fine-tuned by `api.recover` (RUN/recovered/STRATEGY: the same
        steps for each strategy), so that strategies compare after recovery too."""
        rows = []
        for s, r in self.results.items():
            b = r.get("best") or {}
            rec = self.recovered(s)
            rows.append({
                "strategy": s,
                "metric_val": b.get("metric_val"),
                "metric_test": b.get("metric_test"),
                **({"recovered_steps": rec["steps"], "recovered_val": rec["metrics"]["val"],
                    "recovered_test": rec["metrics"]["test"]} if rec else {}),
                "macs_ratio": b.get("macs_ratio"),
                "params_ratio": b.get("params_ratio"),
                "latency_ms": b.get("latency_ms"),
                "trial": b.get("trial"),
                "evaluations": r.get("evaluations"),
                "failed": r.get("n_trials_failed"),
                "wall_s": r.get("wall_s"),
            })
        return pd.DataFrame(rows)

    def recovered(self, strategy: str) -> dict | None:
        """The record `api.recover` left for `strategy` (RUN/recovered/STRATEGY/recovery.json), if its plan is still
        the strategy's best (a search resumed since may have found another: then its recovery no longer applies)."""
        path = self.run_dir / "recovered" / strategy / RECOVERY_FILE
        best = (self.results.get(strategy) or {}).get("best")
        if not best or not path.exists():
            return None
        rec = json.loads(path.read_text())
        return rec if rec.get("plan", {}).get("ratios") == best["plan"]["ratios"] else None


def load(run: str | Path, *, storage: str | None = None) -> RunResults:
    """Read a run directory (result files, studies in its storage, cached sensitivity) as DataFrames."""
    run_dir = Path(run)
    if run_dir.is_file():  # a spec path: its run directory
        from autoprune.spec import load_spec

        run_dir = load_spec(run_dir).run_dir
    if not run_dir.is_dir():
        raise AutopruneError(f"run directory {str(run_dir)!r} does not exist; run `autoprune search SPEC` first")
    out = RunResults(run_dir)
    for p in sorted(run_dir.glob("result*.json")):
        data = json.loads(p.read_text())
        out.results[data["strategy"]] = data
    url = storage
    if url is None:
        url = str(run_dir / "study.journal") if (run_dir / "study.journal").exists() else None
    frames = []
    if url:
        st = open_storage(url)
        for s in optuna.get_all_study_summaries(st, include_best_trial=False):
            study = optuna.load_study(study_name=s.study_name, storage=st)
            if out.spec is None:
                out.spec = study.user_attrs.get("spec")
            df = trials_frame(study)
            df["pareto"] = pareto_flags(df)
            frames.append(df)
    if frames:
        out.trials = pd.concat([f for f in frames if not f.empty] or frames, ignore_index=True)
    if (run_dir / "sensitivity.csv").exists():
        out.sensitivity = pd.read_csv(run_dir / "sensitivity.csv")
    if (run_dir / "groups.csv").exists():
        out.groups = pd.read_csv(run_dir / "groups.csv")
    return out
