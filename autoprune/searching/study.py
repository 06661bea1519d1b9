"""Run a search: storage, study, sampler, warm starts, resumption, and every strategy as Optuna trials.

A search is one Optuna study named ``<spec name>:<strategy>`` in the run's storage (a journal file by
default). Re-running the same command resumes it: finished trials are kept, trials left RUNNING by a
killed process are marked failed, and the loop continues until ``n_trials`` trials have completed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import TrialState

from autoprune.errors import AutopruneError
from autoprune.pruning.plan import PruningPlan
from autoprune._progress import progress
from autoprune.searching import strategies
from autoprune.searching.objective import WARM_PLAN, Objective, TrialFailed, directions, evaluate_plan, objective_values, record, trial_attrs
from autoprune.searching.space import SearchSpace
from autoprune.searching.studies import (
    SearchRun, TrialSeededSampler, best_metric, fsync_now, fast_tpe_math, search_score, study_centre, study_score, timeout_note, build_space, auto_swept, choose_priors, keep_priors, create_or_load, fail_stale_trials, n_complete, n_done, open_storage, resolve_budget_mode, storage_url, study_name,
)

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

ITERATIVE = ("optuna", "random", "netadapt")


def run_search(
    spec_or_session: Any,
    *,
    strategy: str | None = None,
    n_trials: int | None = None,
    storage: str | None = None,
    show_progress: bool = True,
) -> SearchRun:
    """Run (or resume) one strategy's search for a session (`autoprune.app.session.Session`: the spec's stages
    wired together); returns the study for the results stage."""
    session = spec_or_session
    spec = session.spec
    strategy = strategy or spec.search.strategy
    n_trials = n_trials or spec.search.n_trials
    if spec.search.backend == "ray" and strategy in ("optuna", "random"):
        from autoprune.searching.ray_backend import run_ray_search

        return run_ray_search(session, strategy=strategy, n_trials=n_trials, storage=storage, show_progress=show_progress)

    t0 = time.perf_counter()
    storage_obj = open_storage(storage_url(spec, storage))  # fail on bad storage before sensitivity analysis
    name = study_name(spec, strategy)
    priors, priors_note, timing_evals = choose_priors(session, strategy, storage_obj, name, t0)
    space, sens_evals = build_space(session, strategy, priors)
    sens_evals += timing_evals
    mode = resolve_budget_mode(spec)
    objectives = list(spec.search.objectives) if strategy in ("optuna", "random") else ["accuracy"]
    study, created = create_or_load(storage_obj, name, directions(objectives), spec, strategy, mode)
    fail_stale_trials(study)
    # seeded with seed + the number of this process's first trial: a resumed run does not replay itself and
    # parallel workers (distinct trial numbers) do not sample identical points
    sampler_name = "random" if strategy == "random" else spec.search.sampler
    study.sampler = TrialSeededSampler(sampler_name, spec.search.seed, len(objectives) > 1)
    rungs = list(spec.search.recovery_rungs) if strategy in ("optuna", "random") and len(objectives) == 1 else []
    if rungs:  # multi-fidelity: successive halving over the recovery rungs (Optuna's own pruner)
        study.pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=spec.search.rung_reduction,
                                                              min_early_stopping_rate=0)
    keep_priors(study, created, priors, priors_note)
    if created and strategy == "optuna":
        _enqueue_warm_starts(study, space, session, priors)
    score = study_score(study, created, search_score(spec, strategy), auto=spec.search.score == "auto")
    study_centre(study, created, space)

    notes = list(space.notes) + ([priors_note] if priors_note else [])
    prep_s = time.perf_counter() - t0  # storage, the sensitivity sweep (unless cached), the study
    if strategy in ("optuna", "random"):
        objective = Objective(space, session.evaluator, session.cost_model, objectives=objectives,
                              budget_mode=mode, rungs=rungs,
                              reduction=spec.search.rung_reduction,
                              recovery_lr=spec.recovery_lr, seed=spec.search.seed, score=score)
        deadline = t0 + spec.search.timeout_s if spec.search.timeout_s else None
        _optimize(study, objective, n_trials, show_progress, count_pruned=bool(rungs), deadline=deadline)
        note = timeout_note(spec.search.timeout_s, n_done(study, bool(rungs)), n_trials, prep_s,
                            sweep_skips=spec.sensitivity.skip_insensitive,
                            auto_swept=auto_swept(spec, priors))
        notes += [note] if note else []
    elif strategy == "netadapt":
        _run_netadapt(study, space, session, n_trials, show_progress)
    else:
        plan, note = _one_plan_heuristic(space, strategy)
        notes += [note] if note else []
        _record_plans(study, space, session, [plan], show_progress=False)
    fsync_now()  # the journal's last trials, on disk before the search returns (see TrialDurableJournal)
    return SearchRun(session, study, space, strategy, mode, time.perf_counter() - t0, sens_evals, notes, priors)

LATENCY_MARGIN = 0.98  # a one-plan heuristic under a latency budget aims to measure at most this x the limit ...
LATENCY_MARGIN_MIN = 0.90  # ... or less by the measurement's own upper spread, down to this
LATENCY_CLOSE = 0.03  # a plan that measures within this of its margin is close enough: no step back up
LATENCY_RETRIES = 6


def latency_margin(stats: Any) -> float:
    """The fraction of the limit a heuristic's plan must measure within: 1 - the measurement's upper spread
    ((p90 - median) / median), between LATENCY_MARGIN_MIN and LATENCY_MARGIN. On a quiet device the spread is
    ~1 % and the margin 2 %; on a loaded one a median moves as much as its runs spread, so the margin follows."""
    p90, med = getattr(stats, "p90_ms", None), getattr(stats, "median_ms", None)
    if not p90 or not med:
        return LATENCY_MARGIN
    return min(LATENCY_MARGIN, max(LATENCY_MARGIN_MIN, 1 - (p90 - med) / med))


def _one_plan_heuristic(space: SearchSpace, strategy: str) -> tuple[PruningPlan, str | None]:
    """The uniform, global or LAMP plan. Under a latency budget it is measured on the device and made again,
    aiming lower, while it measures over its margin (`latency_margin`); if a lower aim then lands far under the
    margin, the aim is bisected back up between it and the lowest aim that measured over. The plan returned is
    the highest-aimed one that measured within its margin.

    Why: these heuristics bisect onto the *predicted* limit, so their one plan lands on it, and a measurement
    moves 1-3 % between runs (more on a loaded machine): the re-measure that every reported plan must pass
    (results stage) failed about half the time, and the strategy reported no plan at all. A search has many
    trials to fall back on; a heuristic has one, so it keeps a measured margin. Stepping down by one high
    first reading alone had left plans ~7 % under the limit; a fixed 2 % margin with the step back up had put
    one at the edge under load, where the re-measure rejected it: hence a margin that follows the spread."""
    def make(aim: float) -> PruningPlan:
        sp = space if aim == space.budget.limit else replace(space, budget=replace(space.budget, limit=aim))
        return strategies.uniform_plan(sp) if strategy == "uniform" else strategies.ranked_plan(
            sp, "global_l2" if strategy == "global" else "lamp")

    budget = space.budget
    plan = make(budget.limit)
    if budget.kind != "latency_ms":
        return plan, None
    limit = budget.limit
    aim, over = limit, None  # over: the lowest aim whose plan measured over its margin
    best = None  # (plan, aim, measured, margin) of the highest aim that measured within its margin
    tried: dict[str, tuple[float, float]] = {}
    for _ in range(LATENCY_RETRIES):
        key = plan.to_json(indent=None)
        if key in tried:  # a new aim gave a plan measured already: the grid cannot get closer
            break
        try:
            model = space.pm.apply(plan, check=False)
            stats = budget.measure_stats(model) if budget.measure_stats else None
            measured = float(stats.median_ms) if stats is not None else float(budget.measure(model))
        except Exception as e:  # noqa: BLE001 - the results stage re-measures and reports what failed
            return plan, f"{strategy}: could not measure its plan ({type(e).__name__}: {e})"
        margin = latency_margin(stats)
        tried[key] = (measured, margin)
        if measured <= margin * limit:
            if best is None or aim > best[1]:
                best = (plan, aim, measured, margin)
            if over is None or measured >= (margin - LATENCY_CLOSE) * limit:
                break
            aim = (aim + over) / 2  # landed far under: step back up
        else:
            over = aim if over is None else min(over, aim)
            # no plan within the margin yet: aim lower by the measured overshoot (>= 1 % a step: uniform's grid is
            # coarse); else bisect between the best plan's aim and this one
            aim = aim * min(margin * limit / measured, 0.99) if best is None else (best[1] + aim) / 2
        plan = make(aim)
        while best is None and plan.to_json(indent=None) in tried and aim > 0.5 * limit:
            aim *= 0.99  # stepping down on a coarse grid (uniform's): to the next plan that differs
            plan = make(aim)
    if best is None:
        measured, margin = tried.get(plan.to_json(indent=None), (measured, margin))
        return plan, (f"{strategy}: no plan measured within {margin:.0%} of the latency limit in {len(tried)} "
                      f"measurements (last: {measured / limit:.1%}); the results stage re-measures it")
    plan, aim, measured, margin = best
    return plan, (f"{strategy}: aimed at {aim / limit:.1%} of the latency limit (predicted) so that its plan "
                  f"measures within {margin:.0%} of it: {measured / limit:.1%}")


def _enqueue_warm_starts(study: optuna.Study, space: SearchSpace, session, priors: str) -> None:
    """The heuristics' plans (`strategies.warm_start_plans`), enqueued once at creation. The sampler sees them
    as `SearchSpace.point` makes them (ratios clipped into the bounds; in a centred space, the closest proposal); the objective evaluates the plan itself (`WARM_PLAN`), not its projection."""
    sens = session.sensitivity().table if priors == "sensitivity" else None
    for label, plan in strategies.warm_start_plans(space, sens):
        study.enqueue_trial(space.point(plan), user_attrs={"warm_start": label, WARM_PLAN: plan.ratios},
                            skip_if_exists=True)

def _optimize(study: optuna.Study, objective: Objective, n_trials: int, show_progress: bool, *,
              count_pruned: bool = False, deadline: float | None = None) -> None:
    """Run trials until `n_trials` have completed (multi-fidelity: completed or stopped at a rung), or until
    `deadline` (`time.perf_counter()` time; `search.timeout_s`) has passed, after at least one trial."""
    done = n_done(study, count_pruned)
    if done >= n_trials:
        return
    bar = progress(total=n_trials, initial=done, desc=f"search {study.study_name}", disable=not show_progress)

    def go_on() -> bool:
        n = n_done(study, count_pruned)
        if show_progress:
            bar.n = min(n, n_trials)
            best = best_metric(study)
            if best is not None:
                bar.set_postfix(best=f"{best:.4f}")
            bar.refresh()
        return n < n_trials and (deadline is None or time.perf_counter() < deadline)

    # at most 3x attempts per process, so that a model whose every trial fails cannot loop forever. One
    # `optimize` call a trial rather than one call with a callback: Optuna hands each callback a deep copy of the
    # finished trial (0.25 ms a ResNet-20 trial, its record included), which this loop never reads
    with frozen_heap(), fast_tpe_math():
        for _ in range(3 * n_trials):
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
            if not go_on():
                break
    bar.close()
    if n_complete(study) == 0:
        reasons = {t.user_attrs.get("fail_reason", "unknown") for t in study.trials if t.state == TrialState.FAIL}
        raise AutopruneError(f"every trial failed; reasons: {sorted(reasons)[:3]}")

_HEAP_LOCK = threading.Lock()
_HEAP_USERS = 0
_HEAP_SAVED: list[tuple[int, int, int]] = []
GC_YOUNG_THRESHOLD = 10_000  # net new container objects between young-generation collections (Python's: 700)


@contextlib.contextmanager
def frozen_heap():
    """Keep the objects that exist before a search out of Python's cyclic garbage collector while it runs, and
    collect the young generation less often.

    Why: a trial allocates thousands of small objects (the model copy, Optuna's records), so the collector runs
    often, and now and then a full collection walks the whole heap (torch, transformers, pandas, the model):
    ~200 ms once every ~60 ResNet-20 trials, 3-5 % of the search. `gc.freeze` moves what already exists to a
    generation the collector skips; objects made during the search are collected as usual, and `gc.unfreeze`
    hands the rest back when the search ends. A trial's objects are freed by reference counting (a pruned copy
    has no cycles), so at Python's threshold of 700 the collector ran ~4 times a ResNet-20 trial for nothing
    (0.25 ms of it); at GC_YOUNG_THRESHOLD it runs about once in 60 trials. Counted, so that searches in
    threads (the service) restore Python's settings only when the last one ends."""
    global _HEAP_USERS
    with _HEAP_LOCK:
        if _HEAP_USERS == 0:
            _HEAP_SAVED[:] = [gc.get_threshold()]
            old = _HEAP_SAVED[0]
            gc.set_threshold(max(old[0], GC_YOUNG_THRESHOLD), *old[1:])
            gc.freeze()  # (no collection first: that alone is the ~200 ms this avoids; garbage frozen now is freed later)
        _HEAP_USERS += 1
    try:
        yield
    finally:
        with _HEAP_LOCK:
            _HEAP_USERS -= 1
            if _HEAP_USERS == 0:
                gc.unfreeze()
                gc.set_threshold(*_HEAP_SAVED[0])


def _record_plans(study: optuna.Study, space: SearchSpace, session, plans: list[PruningPlan], *, show_progress: bool,
                  cache: dict[str, float] | None = None) -> list[float]:
    """Evaluate fixed plans as trials (ask/tell), reusing any plan the study already evaluated."""
    cache = cache if cache is not None else _evaluated(study)
    base = {"macs": session.cost_model.base_macs, "params": session.cost_model.base_params}
    out = []
    for plan in plans:
        key = plan.to_json(indent=None)
        if key in cache:
            out.append(cache[key])
            continue
        trial = study.ask()  # claimed for this process by TrialSeededSampler as it is created
        try:
            result = evaluate_plan(space, session.evaluator, session.cost_model, plan)
        except Exception as e:
            trial.set_user_attr("plan", plan.to_dict())
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}")
            study.tell(trial, state=TrialState.FAIL)
            raise TrialFailed(f"evaluating {plan.summary()} failed: {e}") from e
        record(trial, result, base)
        study.tell(trial, objective_values(result, ["accuracy"], base)[0])
        cache[key] = result.metric
        out.append(result.metric)
    return out

def _evaluated(study: optuna.Study) -> dict[str, float]:
    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = trial_attrs(t)
        if "plan" in a:
            out[PruningPlan.from_dict(a["plan"]).to_json(indent=None)] = t.values[0]
    return out

def _run_netadapt(study: optuna.Study, space: SearchSpace, session, n_trials: int, show_progress: bool) -> None:
    cache = _evaluated(study)
    bar = progress(total=n_trials, desc=f"search {study.study_name}", disable=not show_progress)

    def evaluate(plan: PruningPlan) -> float:
        v = _record_plans(study, space, session, [plan], show_progress=False, cache=cache)[0]
        bar.update(1)
        return v

    strategies.netadapt(space, evaluate, n_trials, session.spec.search.netadapt_step)
    bar.close()
