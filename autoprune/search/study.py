"""Run a search: storage, study, sampler, warm starts, resumption, and every strategy as Optuna trials.

A search is one Optuna study named ``<spec name>:<strategy>`` in the run's storage (a journal file by
default). Re-running the same command resumes it: finished trials are kept, trials left RUNNING by a
killed process are marked failed, and the loop continues until ``n_trials`` trials have completed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autoprune.errors import AutopruneError
from autoprune.plan import PruningPlan
from autoprune.progress import progress
from autoprune.search import strategies
from autoprune.search.objective import Objective, TrialFailed, directions, evaluate_plan, objective_values, record, trial_attrs
from autoprune.search.space import Budget, SearchSpace

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

ITERATIVE = ("optuna", "random", "netadapt")


@dataclass
class SearchRun:
    """What `run_search` hands to the results stage."""

    session: Any  # autoprune.session.Session
    study: optuna.Study
    space: SearchSpace
    strategy: str
    budget_mode: str
    wall_s: float
    sensitivity_evaluations: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def n_complete(self) -> int:
        return sum(t.state == TrialState.COMPLETE for t in self.study.trials)

    @property
    def n_failed(self) -> int:
        return sum(t.state == TrialState.FAIL for t in self.study.trials)


# ------------------------------------------------------------------ storage
def storage_url(spec, override: str | None = None) -> str:
    url = override or spec.search.storage
    if url:
        return url
    return str(spec.run_dir / "study.journal")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A journal file (a path, or ``journal:PATH``) or any SQLAlchemy URL, with a clear error if unusable."""
    if "://" not in url:
        path = Path(url.removeprefix("journal:"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(path.parent, os.W_OK):
                raise PermissionError(f"{path.parent} is not writable")
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            repair_journal(path)
            return JournalStorage(JournalFileBackend(str(path)))
        except AutopruneError:
            raise
        except (PermissionError, NotADirectoryError, FileExistsError) as e:
            raise AutopruneError(f"cannot write the study journal {str(path)!r}: {e}; set output: to a writable directory") from None
        except Exception as e:  # a corrupted journal fails while it is replayed
            raise AutopruneError(
                f"cannot read the study journal {str(path)!r} ({type(e).__name__}: {e}); "
                "move it away to start a new study"
            ) from None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as e:
        safe = url.split("@")[-1]
        raise AutopruneError(f"cannot connect to storage ...@{safe}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


STALE_LOCK_S = 5.0  # a journal write holds the lock for milliseconds; an older lock was left by a killed process


def repair_journal(path: Path) -> None:
    """Undo what a `kill -9` during a journal write can leave behind, and refuse a corrupted journal.

    Optuna's JournalFileBackend would wait 30 s on a stale lock (its grace period) and, worse, append the
    next record to a half-written last line, which makes the whole journal unreadable on the following
    replay. So: wait for the lock at most until it is STALE_LOCK_S old (the symlink's own mtime is when it
    was taken) and then drop it, cut a partial last line while holding the lock, and check that every
    complete line is JSON so that a corrupted file fails now with one clear message.
    """
    import json

    from optuna.storages.journal import JournalFileSymlinkLock

    lock = Path(str(path) + ".lock")
    while True:
        try:
            age = time.time() - os.lstat(lock).st_mtime
        except FileNotFoundError:
            break
        if age > STALE_LOCK_S:
            log.warning("removing the stale journal lock %s (left by a killed process)", lock)
            lock.unlink(missing_ok=True)
            break
        time.sleep(0.05)
    if not path.exists() or path.stat().st_size == 0:
        return
    locker = JournalFileSymlinkLock(str(path))
    locker.acquire()
    try:
        with open(path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                log.warning("journal %s: dropping a half-written last record (%d bytes)", path, len(data) - end)
                f.truncate(end)
    finally:
        locker.release()
    for i, line in enumerate(data[:end].splitlines(), 1):
        try:
            json.loads(line)
        except ValueError:
            raise AutopruneError(
                f"cannot read the study journal {str(path)!r}: line {i} is not a journal record (the file is "
                "corrupted); move it away to start a new study"
            ) from None


def study_name(spec, strategy: str) -> str:
    return f"{spec.name}:{strategy}"


def make_sampler(name: str, seed: int, multi: bool) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Creates the real sampler at this process's first trial, seeded with ``seed + trial.number``.

    Trial numbers are handed out atomically by the storage, so parallel workers on one study get distinct
    seeds (and do not sample identical points), while a single process gets ``seed + trials already in the
    study``: reproducible, and a resumed run does not replay itself. Every call is delegated.
    """

    def __init__(self, name: str, seed: int, multi: bool) -> None:
        self._args = (name, seed, multi)
        self._inner: optuna.samplers.BaseSampler | None = None

    def _sampler(self, trial_number: int | None = None) -> optuna.samplers.BaseSampler:
        if self._inner is None:
            name, seed, multi = self._args
            self._inner = make_sampler(name, seed + (trial_number or 0), multi)
        return self._inner

    def before_trial(self, study, trial) -> None:
        self._sampler(trial.number).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._sampler(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler(trial.number).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler(trial.number).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler().reseed_rng()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_stale_trials(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a dead process on this host as failed (journal storages have no heartbeat)."""
    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker", "")
        h, _, pid = w.rpartition(":")
        if h != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted: its worker process died")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            n += 1
        except Exception as e:  # another worker got there first
            log.debug("stale trial %s: %s", t.number, e)
    return n


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host (or is us)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_budget_mode(spec) -> str:
    if spec.search.budget_mode:
        return spec.search.budget_mode
    return "projection" if len(spec.search.objectives) == 1 else "constraint"


# ------------------------------------------------------------------ the search
def build_space(session, strategy: str) -> tuple[SearchSpace, int]:
    """The search space for a strategy; sensitivity priors only where the strategy uses them."""
    spec = session.spec
    budget = Budget.from_spec(spec, session.pruner, session.cost_model)
    use_priors = strategy == "optuna" and spec.search.priors == "sensitivity"
    sens, n_eval = None, 0
    if use_priors:
        SearchSpace.build(session.pruner, budget, None, spec.search.tolerance)  # an unreachable budget fails now
        res = session.sensitivity()
        sens, n_eval = res.table, res.evaluations
    return SearchSpace.build(session.pruner, budget, sens, spec.search.tolerance), n_eval


def run_search(
    spec_or_session,
    *,
    strategy: str | None = None,
    n_trials: int | None = None,
    storage: str | None = None,
    show_progress: bool = True,
) -> SearchRun:
    """Run (or resume) one strategy's search for a spec; returns the study for the results stage."""
    from autoprune.session import Session

    session = spec_or_session if isinstance(spec_or_session, Session) else Session(spec_or_session, show_progress=show_progress)
    spec = session.spec
    strategy = strategy or spec.search.strategy
    n_trials = n_trials or spec.search.n_trials
    if spec.search.backend == "ray" and strategy in ("optuna", "random"):
        from autoprune.search.ray_backend import run_ray_search

        return run_ray_search(session, strategy=strategy, n_trials=n_trials, storage=storage, show_progress=show_progress)

    t0 = time.perf_counter()
    storage_obj = open_storage(storage_url(spec, storage))  # fail on bad storage before sensitivity analysis
    space, sens_evals = build_space(session, strategy)
    mode = resolve_budget_mode(spec)
    objectives = list(spec.search.objectives) if strategy in ("optuna", "random") else ["accuracy"]
    name = study_name(spec, strategy)
    study, created = _create_or_load(storage_obj, name, directions(objectives), spec, strategy, mode)
    fail_stale_trials(study)
    # seeded with seed + the number of this process's first trial: a resumed run does not replay itself and
    # parallel workers (distinct trial numbers) do not sample identical points
    sampler_name = "random" if strategy == "random" else spec.search.sampler
    study.sampler = TrialSeededSampler(sampler_name, spec.search.seed, len(objectives) > 1)
    if created and strategy == "optuna":
        _enqueue_warm_starts(study, space, session)

    notes = list(space.notes)
    if strategy in ("optuna", "random"):
        _optimize(study, Objective(space, session.evaluator, session.cost_model, objectives=objectives,
                                   budget_mode=mode, worker=worker_id()), n_trials, show_progress)
    elif strategy == "netadapt":
        _run_netadapt(study, space, session, n_trials, show_progress)
    else:
        plan = strategies.uniform_plan(space) if strategy == "uniform" else strategies.ranked_plan(
            space, "global_l2" if strategy == "global" else "lamp")
        _record_plans(study, space, session, [plan], show_progress=False)
    return SearchRun(session, study, space, strategy, mode, time.perf_counter() - t0, sens_evals, notes)


def _create_or_load(storage, name: str, dirs: list[str], spec, strategy: str, mode: str) -> tuple[optuna.Study, bool]:
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=dirs)
        created = True
        attrs = {"spec": spec.model_dump(mode="json"), "strategy": strategy, "budget_mode": mode,
                 "objectives": list(spec.search.objectives)}
        for k, v in attrs.items():
            study.set_user_attr(k, v)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name)
        created = False
        if [d.name.lower() for d in study.directions] != dirs:
            raise AutopruneError(
                f"study {name!r} in this storage has objectives {study.user_attrs.get('objectives')}; "
                f"the spec asks for {list(spec.search.objectives)}: use another name or storage"
            ) from None
    return study, created


def _enqueue_warm_starts(study: optuna.Study, space: SearchSpace, session) -> None:
    """Sensitivity-greedy and uniform allocations (and global, LAMP when re-ranking), clipped into the bounds,
    enqueued once at creation."""
    starts: list[tuple[str, PruningPlan]] = [("uniform", space.uniform())]
    if session.spec.search.priors == "sensitivity":
        starts.insert(0, ("sensitivity-greedy", space.greedy(session.sensitivity().table)))
    if session.spec.search.rerank_top_k:  # the heuristics' plans become re-rank candidates (results.summarize)
        starts += [("global", strategies.ranked_plan(space, "global_l2")), ("lamp", strategies.ranked_plan(space, "lamp"))]
    for label, plan in starts:
        params = space.clip(plan.ratios)
        study.enqueue_trial(params, user_attrs={"warm_start": label}, skip_if_exists=True)


def _n_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _optimize(study: optuna.Study, objective: Objective, n_trials: int, show_progress: bool) -> None:
    done = _n_complete(study)
    if done >= n_trials:
        return
    bar = progress(total=n_trials, initial=done, desc=f"search {study.study_name}", disable=not show_progress)

    def callback(st: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        n = _n_complete(st)
        bar.n = min(n, n_trials)
        best = _best_value(st)
        if best is not None:
            bar.set_postfix(best=f"{best:.4f}")
        bar.refresh()
        if n >= n_trials:
            st.stop()

    # at most 3x attempts per process, so that a model whose every trial fails cannot loop forever
    study.optimize(objective, n_trials=3 * n_trials, callbacks=[callback], catch=(Exception,), gc_after_trial=False)
    bar.close()
    if _n_complete(study) == 0:
        reasons = {t.user_attrs.get("fail_reason", "unknown") for t in study.trials if t.state == TrialState.FAIL}
        raise AutopruneError(f"every trial failed; reasons: {sorted(reasons)[:3]}")


def _best_value(study: optuna.Study) -> float | None:
    vals = [t.values[0] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if trial_attrs(t).get("feasible", True)]
    return max(vals) if vals else None


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
        trial = study.ask()
        trial.set_user_attr("worker", worker_id())
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
