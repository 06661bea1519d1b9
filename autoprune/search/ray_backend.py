"""The Ray Tune backend: the same search as `study.run_search`, with trials as Ray actors.

Optuna's sampler runs inside Tune through `OptunaSearch`, on the same storage and study name
(``NAME:STRATEGY``) as the in-process backend, so `results`, `export`, plots and optuna-dashboard read a Ray
run exactly like a local one, and a study can even be resumed with the other backend.

What Tune's `OptunaSearch` does not do, and this module adds:

- Constraints and user attributes. Tune hands the searcher the objective values only, so the budget
  constraint would never reach the sampler and the plan/costs would be missing from the storage. Each actor
  runs `objective.Objective` against a recording trial (`_RecordingTrial`) and returns what it recorded; the
  `_ConstrainedOptunaSearch` subclass replays it onto the real Optuna trial in `on_trial_complete`, before
  the trial is told.
- Failed evaluations are recorded as FAIL with their reason (Tune would mark a trial without a metric PRUNED).
- "Until n_trials completed" with resumption, like the local loop: Tune runs the missing trials, and
  failures are retried up to 3x n_trials attempts.
- Warm starts go in as ``points_to_evaluate``, once, when the study is created.

`ray_map` fans any `map_fn(fn, items)` call out as Ray tasks; `run_ray_search` uses it for sensitivity
analysis (one task per group).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import optuna
import ray
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from autoprune.errors import AutopruneError
from autoprune.progress import progress
from autoprune.search.objective import Objective, directions
from autoprune.search.study import (
    SearchRun,
    _best_value,
    _create_or_load,
    _n_complete,
    build_space,
    fail_stale_trials,
    make_sampler,
    open_storage,
    resolve_budget_mode,
    storage_url,
    study_name,
    worker_id,
)

log = logging.getLogger(__name__)

ATTRS_KEY = "autoprune_attrs"  # JSON string: Tune flattens nested result dicts before the searcher sees them
CONSTRAINTS_KEY = "autoprune_constraints"
FAILED_KEY = "autoprune_failed"


# ------------------------------------------------------------------ ray runtime
def init_ray(spec=None, *, address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process.

    Locally: no dashboard, token auth off (a single user's machine), `num_cpus` from the spec
    (max_concurrent_trials x cpus_per_trial). With `search.ray_address` ('auto' or ray://host:port) it
    joins that cluster instead and uses its resources and auth settings.
    """
    if ray.is_initialized():
        return
    search = spec.search if spec is not None else None
    address = address or (search.ray_address if search else None)
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False,
                              "logging_level": logging.WARNING}
    if address:
        kwargs["address"] = address
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if num_cpus is None and search is not None:
            num_cpus = max(1, math.ceil(search.max_concurrent_trials * search.cpus_per_trial))
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    # Tune's default loggers write CSV/JSON/TensorBoard files for every trial: the study already has them
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "100")
    # with the per-trial loggers off, the ResultGrid that Tuner.fit returns warns for every trial
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    try:
        ray.init(**kwargs)
    except Exception as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray runtime"
        raise AutopruneError(f"cannot start {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                             "check search.ray_address (use 'auto' on a cluster node, or leave it unset)") from None


@ray.remote
def _apply(fn: Callable, item: Any) -> Any:
    return fn(item)


def ray_map(fn: Callable, items: Iterable, *, num_cpus: float = 1, num_gpus: float = 0) -> list:
    """`map_fn(fn, items)` as one Ray task per item, results in order (the closure is shipped once)."""
    items = list(items)
    if len(items) <= 1 or not ray.is_initialized():
        return [fn(i) for i in items]
    try:
        fn_ref = ray.put(fn)
    except Exception as e:  # e.g. a closure over a live terminal progress bar: run it here instead
        log.warning("cannot ship %s to Ray (%s); running it in this process", getattr(fn, "__name__", fn), e)
        return [fn(i) for i in items]
    task = _apply.options(num_cpus=num_cpus, num_gpus=num_gpus)
    return ray.get([task.remote(fn_ref, i) for i in items])


def ray_map_for(spec) -> Callable:
    """A `map_fn` for `Session.sensitivity` with the spec's per-trial resources (one task per group)."""
    s = spec.search
    return lambda fn, items: ray_map(fn, items, num_cpus=s.cpus_per_trial, num_gpus=s.gpus_per_trial)


# ------------------------------------------------------------------ the trial, inside an actor
class _RecordingTrial:
    """Stands in for an `optuna.Trial` inside a Ray actor: serves the sampled params, records attributes."""

    def __init__(self, params: dict[str, float]) -> None:
        self.params = params
        self.user_attrs: dict[str, Any] = {}
        self.constraints: dict[str, float] = {}

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return float(self.params[name])

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def set_constraint(self, key: str, value: float) -> None:
        self.constraints[key] = float(value)


def _trainable(config: dict, objective: Objective | None = None, threads: int = 1) -> None:
    """One Tune trial: evaluate the sampled ratios with the shared `Objective`, report what it recorded.

    `tune.with_parameters` ships the objective (model, data, cost model) through the object store once;
    actors are reused between trials."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    trial = _RecordingTrial(config)
    try:
        values = objective(trial)
    except Exception as e:
        trial.user_attrs.setdefault("fail_reason", f"{type(e).__name__}: {e}")
        # Tune insists on the metric keys; NaN marks them unusable and the searcher tells Optuna FAIL
        tune.report({**{f"obj{i}": math.nan for i in range(len(objective.objectives))},
                     FAILED_KEY: 1, ATTRS_KEY: json.dumps(trial.user_attrs, default=str)})
        return
    values = values if isinstance(values, list) else [values]
    out = {f"obj{i}": float(v) for i, v in enumerate(values)}
    out[ATTRS_KEY] = json.dumps(trial.user_attrs, default=str)
    out[CONSTRAINTS_KEY] = json.dumps(trial.constraints)
    tune.report(out)


# ------------------------------------------------------------------ the searcher
class ConstrainedOptunaSearch(OptunaSearch):
    """`OptunaSearch` that also passes constraints, user attributes and failures to the Optuna trial."""

    def __init__(self, *args, worker: str = "", warm_starts: list[tuple[str, dict]] | None = None, **kw):
        self._worker = worker
        self._warm = warm_starts or []
        super().__init__(*args, **kw)

    def suggest(self, trial_id: str):
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and self._worker:
            # the driver owns the Optuna trial: a dead driver's RUNNING trials are failed on resume
            ot_trial.set_user_attr("worker", self._worker)
            for label, point in self._warm:
                if all(abs(ot_trial.params.get(k, math.nan) - v) < 1e-12 for k, v in point.items()):
                    ot_trial.set_user_attr("warm_start", label)
                    break
        return params

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        result = result or {}
        for k, v in json.loads(result.get(ATTRS_KEY) or "{}").items():
            ot_trial.set_user_attr(k, v)
        for k, v in json.loads(result.get(CONSTRAINTS_KEY) or "{}").items():
            ot_trial.set_constraint(k, v)  # the whole point: Tune would drop it
        if error or result.get(FAILED_KEY) or any(m not in result for m in self._metric_list()):
            if "fail_reason" not in ot_trial.user_attrs:
                ot_trial.set_user_attr("fail_reason", "the Ray trial failed (see the Ray logs)" if error
                                       else "the Ray trial reported no metric")
            try:
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            except Exception as e:  # already finished by another path
                log.debug("tell FAIL for %s: %s", trial_id, e)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)

    def _metric_list(self) -> list[str]:
        return list(self.metric) if isinstance(self.metric, list) else [self.metric]


# ------------------------------------------------------------------ the search
def run_ray_search(
    session,
    *,
    strategy: str = "optuna",
    n_trials: int | None = None,
    storage: str | None = None,
    show_progress: bool = True,
) -> SearchRun:
    """Run (or resume) an `optuna`/`random` search on Ray Tune; same study, same `SearchRun` as locally."""
    spec = session.spec
    s = spec.search
    if strategy not in ("optuna", "random"):
        raise AutopruneError(f"strategy {strategy!r} runs in process only; the ray backend runs optuna and random")
    n_trials = n_trials or s.n_trials
    t0 = time.perf_counter()
    init_ray(spec)
    if strategy == "optuna" and s.priors == "sensitivity":
        session.sensitivity(map_fn=ray_map_for(spec))  # one Ray task per group; build_space reuses the result
    space, sens_evals = build_space(session, strategy)
    storage_obj = open_storage(storage_url(spec, storage))
    mode = resolve_budget_mode(spec)
    objectives = list(s.objectives)
    name = study_name(spec, strategy)
    study, created = _create_or_load(storage_obj, name, directions(objectives), spec, strategy, mode)
    fail_stale_trials(study)

    warm: list[tuple[str, dict]] = []
    if created and strategy == "optuna":
        warm = [("uniform", space.clip(space.uniform().ratios))]
        if s.priors == "sensitivity":
            warm.insert(0, ("sensitivity-greedy", space.clip(space.greedy(session.sensitivity().table).ratios)))

    objective = Objective(space, session.evaluator, session.cost_model, objectives=objectives, budget_mode=mode)
    threads = max(1, int(s.cpus_per_trial))
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, objective=objective, threads=threads),
        {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial},
    )
    param_space = {n: FloatDistribution(0.0, space.bounds[n]) for n in space.dims}
    metrics = [f"obj{i}" for i in range(len(objectives))]
    modes = ["max" if d == "maximize" else "min" for d in directions(objectives)]
    sampler_name = "random" if strategy == "random" else s.sampler
    ray_dir = (spec.run_dir / "ray").resolve()

    bar = progress(total=n_trials, initial=min(_n_complete(study), n_trials), desc=f"search {name} (ray)",
                   disable=not show_progress)
    attempts = 0
    first = True
    while True:
        done = _n_complete(study)
        bar.n = min(done, n_trials)
        bar.refresh()
        missing = n_trials - done
        if missing <= 0 or attempts >= 3 * n_trials:
            break
        # a fresh sampler seeded by the study's size, like the local loop, so a resumed run does not replay itself
        searcher = ConstrainedOptunaSearch(
            space=param_space,
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            sampler=make_sampler(sampler_name, s.seed + len(study.trials), len(objectives) > 1),
            study_name=name,
            storage=storage_obj,
            points_to_evaluate=[p for _, p in warm] if (first and warm) else None,
            worker=worker_id(),
            warm_starts=warm,
        )
        first = False
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=missing,
                max_concurrent_trials=s.max_concurrent_trials,
                reuse_actors=True,
                trial_dirname_creator=lambda t: t.trial_id,
                trial_name_creator=lambda t: t.trial_id,
            ),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{strategy}-{int(time.time())}",
                storage_path=str(ray_dir),
                verbose=0,
                callbacks=[_ProgressCallback(study, bar, n_trials)],
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, num_to_keep=1),
            ),
        )
        tuner.fit()
        attempts += missing
    bar.close()
    if _n_complete(study) == 0:
        reasons = {t.user_attrs.get("fail_reason", "unknown") for t in study.trials if t.state == TrialState.FAIL}
        raise AutopruneError(f"every trial failed; reasons: {sorted(reasons)[:3]}")
    notes = list(space.notes) + [f"ray backend: {s.max_concurrent_trials} concurrent trial(s), "
                                 f"{s.cpus_per_trial} CPU / {s.gpus_per_trial} GPU each"]
    return SearchRun(session, study, space, strategy, mode, time.perf_counter() - t0, sens_evals, notes)


class _ProgressCallback(tune.Callback):
    """Advances the progress bar as Tune completes trials (the searcher has already told Optuna)."""

    def __init__(self, study: optuna.Study, bar, n_trials: int) -> None:
        self.study, self.bar, self.n_trials = study, bar, n_trials

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.bar.n = min(_n_complete(self.study), self.n_trials)
        best = _best_value(self.study)
        if best is not None:
            self.bar.set_postfix(best=f"{best:.4f}")
        self.bar.refresh()
