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
- Multi-fidelity (`search.recovery_rungs`): Tune's own `ASHAScheduler` decides the promotions. The trainable
  climbs the rungs with the shared `objective.climb_rungs`, reporting the proxy at ``recovery_step`` 1 and the
  metric after rung k at ``rung_reduction**k``, each report carrying the trial's record so far; a trial that
  ASHA stops is told to Optuna as PRUNED (plan, costs, ``rung_metrics``, intermediate values at the same steps
  as the optuna backend's), one that ran every rung as COMPLETE with the metric after its last rung. Like the
  local loop, "n_trials done" then counts stopped trials too.
- Code to the cluster: with `search.ray_address`, the modules the trials need that are not installed
  (the spec's factory modules, the packages of the pickled model/data/task classes, autoprune itself when it
  runs from a checkout) go to every node as the job's ``runtime_env`` ``py_modules``, merged under
  `search.ray_runtime_env`.
- Failures that say why: a failed trial's ``fail_reason`` is the worker's exception type and message plus the
  node and pid that ran it (``ray_worker`` user attribute: node_ip, node_id, pid, on every trial); when the
  first min(3, n_trials) trials all fail with the same error, the search stops at once with an
  `AutopruneError` naming it (exit code 2).

`ray_map` fans any `map_fn(fn, items)` call out as Ray tasks; `run_ray_search` uses it for sensitivity
analysis (one task per group).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import pickletools
import re
import site
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import cloudpickle
import optuna
import ray
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from autoprune.errors import AutopruneError
from autoprune._progress import progress
from autoprune.searching import strategies
from autoprune.searching.objective import Objective, directions, record
from autoprune.searching.studies import (
    SearchRun,
    best_metric,
    fsync_now,
    search_score,
    study_centre,
    study_score,
    fast_tpe_math,
    timeout_note,
    create_or_load,
    n_complete,
    n_done,
    build_space,
    auto_swept,
    choose_priors,
    keep_priors,
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
RUNG_KEY = "recovery_step"  # multi-fidelity: ASHA's time attribute, reduction**k after rung k (1: the proxy)
FINAL_KEY = "autoprune_final"  # 1 on the report after the last rung: the trial completed, was not stopped
NUMBER_KEY = "autoprune_trial_number"  # the Optuna trial number, passed in the config (seeds the rungs' fine-tunes)
ERROR_KEY = "autoprune_error"  # the worker's "Type: message", without where it ran (what fast-fail compares)
WHERE_ATTR = "ray_worker"  # user attribute: {"node_ip", "node_id", "pid"} of the Ray worker that ran the trial
IMPORT_HINT = ("the Ray workers cannot import what the driver can: install it on every node, or ship it with "
               "search.ray_runtime_env, e.g. {py_modules: [path/to/package]} or {working_dir: .} (with "
               "search.ray_address, autoprune already ships the spec's factory modules and the packages of the "
               "model's classes that are not installed in site-packages)")


# ------------------------------------------------------------------ code to the cluster
def _installed(path: Path) -> bool:
    """True for files of installed distributions (site-/dist-packages) and of the standard library."""
    path = path.resolve()
    if {"site-packages", "dist-packages"} & set(path.parts):
        return True
    roots = [sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    try:
        roots += list(site.getsitepackages()) + [site.getusersitepackages()]
    except AttributeError:  # some embedded/virtualenv pythons
        pass
    for r in roots:
        if r and path.is_relative_to(Path(r).resolve()):
            return True
    return False


def _local_module_path(top: str) -> str | None:
    """The directory (package) or .py file of top-level module `top` if it is importable here but not
    installed (a checkout, a directory on PYTHONPATH, the working directory); else None."""
    if not top or top in sys.builtin_module_names or top in ("__main__", "__mp_main__"):
        return None
    mod = sys.modules.get(top)
    if mod is not None:
        paths, file = list(getattr(mod, "__path__", None) or []), getattr(mod, "__file__", None)
    else:
        try:
            found = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return None
        if found is None:
            return None
        paths, file = list(found.submodule_search_locations or []), found.origin
    if paths:
        if len(paths) != 1:  # a namespace package split over several directories: Ray cannot ship it
            log.warning("cannot ship namespace package %r (%d directories) to Ray; install it on the nodes", top, len(paths))
            return None
        p = Path(paths[0])
    elif file and file.endswith(".py"):
        p = Path(file)
    else:  # built-in, frozen or a compiled extension: must be installed on the nodes
        return None
    if not p.exists() or _installed(p):
        return None
    return str(p.resolve())


def pickled_modules(data: bytes) -> set[str]:
    """The modules a pickle imports by reference: what unpickling it on a worker needs (GLOBAL/STACK_GLOBAL
    opcodes, and cloudpickle's ``subimport('module')``)."""
    mods: set[str] = set()
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # values pushed by string/memo-get opcodes since the last other opcode
    subimport = False
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name == "GLOBAL":
            mods.add(str(arg).split(" ")[0])
            recent = []
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            if subimport:
                mods.add(arg)
                subimport = False
            recent.append(arg)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(int(arg))
            if subimport and isinstance(value, str):
                mods.add(value)
                subimport = False
            recent.append(value)
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = recent[-1] if recent else None
        elif name == "STACK_GLOBAL":
            if len(recent) >= 2 and isinstance(recent[-2], str):
                mods.add(recent[-2])
                subimport = recent[-1] in ("subimport", "dynamic_subimport")
            recent = []
        else:
            recent = []
    return mods


def _is_cluster(address: str | None) -> bool:
    return bool(address) and address != "local"


def code_modules(spec, objects: Iterable[Any] = ()) -> list[str]:
    """Local paths of the top-level modules a Ray worker on another node needs and may not have: those of the
    spec's factories (model, data, task, metric), of everything `objects` pickle by reference (model classes,
    datasets, task), and autoprune itself, each only when it is importable here but not installed."""
    tops = {"autoprune"}
    factories = [spec.model.factory, spec.data.factory, spec.task.factory,
                 spec.evaluation.metric if ":" in (spec.evaluation.metric or "") else None]
    tops |= {f.split(":")[0].split(".")[0] for f in factories if f}
    for obj in objects:
        try:
            tops |= {m.split(".")[0] for m in pickled_modules(cloudpickle.dumps(obj))}
        except Exception as e:  # noqa: BLE001 - unpicklable here means Ray fails later with its own message
            log.debug("cannot scan %s for modules: %s", type(obj).__name__, e)
    paths = {_local_module_path(t) for t in sorted(tops)}
    return sorted(p for p in paths if p)


def runtime_env_for(spec, objects: Iterable[Any] = ()) -> dict[str, Any] | None:
    """The job's Ray runtime_env: on a cluster (`search.ray_address`), `py_modules` = `code_modules`; then
    `search.ray_runtime_env` on top (its keys win: ``py_modules: []`` turns shipping off)."""
    s = spec.search
    env: dict[str, Any] = {}
    if _is_cluster(s.ray_address):
        mods = code_modules(spec, objects)
        if mods:
            env["py_modules"] = mods
    env.update(s.ray_runtime_env or {})
    if not env.get("py_modules"):
        env.pop("py_modules", None)
    return env or None


# ------------------------------------------------------------------ ray runtime
def init_ray(spec=None, *, address: str | None = None, num_cpus: int | None = None, ship: Iterable[Any] = ()) -> None:
    """Start (or join) Ray once per process.

    Locally: no dashboard, token auth off (a single user's machine), `num_cpus` from the spec
    (max_concurrent_trials x cpus_per_trial). With `search.ray_address` ('auto', host:port or
    ray://host:port) it joins that cluster instead and uses its resources and auth settings, with the
    `runtime_env_for(spec, ship)` that brings the user's code to every node.
    """
    if ray.is_initialized():
        return
    search = spec.search if spec is not None else None
    address = address or (search.ray_address if search else None)
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False,
                              "logging_level": logging.WARNING}
    runtime_env = runtime_env_for(spec, ship) if spec is not None else None
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
        log.info("Ray runtime_env: %s", runtime_env)
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
        env = f" with runtime_env {runtime_env}" if runtime_env else ""
        raise AutopruneError(f"cannot start {where}{env}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                             "check search.ray_address (use 'auto' on a cluster node, or leave it unset)"
                             + (" and search.ray_runtime_env" if runtime_env else "")) from None


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
    try:
        return ray.get([task.remote(fn_ref, i) for i in items])
    except ray.exceptions.RayError as e:
        reason, where = describe_error(e)
        if not _is_import_error(reason):
            raise
        raise AutopruneError(f"a Ray task failed: {reason}{_where_suffix(where)}; {IMPORT_HINT}") from None


def ray_map_for(spec) -> Callable:
    """A `map_fn` for `Session.sensitivity` with the spec's per-trial resources (one task per group)."""
    s = spec.search
    return lambda fn, items: ray_map(fn, items, num_cpus=s.cpus_per_trial, num_gpus=s.gpus_per_trial)


# ------------------------------------------------------------------ the trial, inside an actor
class _RecordingTrial:
    """Stands in for an `optuna.Trial` inside a Ray actor: serves the sampled params, records attributes."""

    def __init__(self, params: dict[str, float]) -> None:
        self.params = dict(params)
        self.number = int(self.params.pop(NUMBER_KEY, 0))
        self.user_attrs: dict[str, Any] = {}
        self.constraints: dict[str, float] = {}

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return float(self.params[name])

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def set_constraint(self, key: str, value: float) -> None:
        self.constraints[key] = float(value)


_LOADED: dict[str, Objective] = {}  # the objective of the current search, unpickled once per actor process


def _load_objective(key: str, payload: bytes) -> Objective:
    obj = _LOADED.get(key)
    if obj is None:
        obj = cloudpickle.loads(payload)  # here, not in Ray's argument fetch, so an ImportError is the trial's
        _LOADED.clear()
        _LOADED[key] = obj
    return obj


def _here() -> dict[str, Any]:
    """Where this code runs: the Ray node's IP and id, and this worker's pid."""
    try:
        node_id = ray.get_runtime_context().get_node_id()
        ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside a Ray worker
        node_id, ip = "", "?"
    return {"node_ip": ip, "node_id": node_id, "pid": os.getpid()}


def _where_suffix(where: dict[str, Any] | None) -> str:
    if not where:
        return ""
    node = where.get("node_ip") or "?"
    if where.get("node_id"):
        node += f" [{where['node_id'][:8]}]"
    return f" (on node {node}, pid {where.get('pid', '?')})"


def _trainable(config: dict, payload: bytes = b"", key: str = "", n_obj: int = 1, threads: int = 1) -> None:
    """One Tune trial: evaluate the sampled ratios with the shared `Objective`, report what it recorded.

    `tune.with_parameters` ships the pickled objective (model, data, cost model) through the object store
    once; it is unpickled here, once per actor (actors are reused between trials), so that a module the
    worker cannot import fails the trial with its own ModuleNotFoundError."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    trial = _RecordingTrial(config)
    where = _here()
    trial.user_attrs[WHERE_ATTR] = where
    try:
        objective = _load_objective(key, payload)
        values = objective(trial, report=_rung_report(trial, objective) if objective.rungs else None)
        if objective.rungs:
            return  # the report after the last rung was the final one
    except Exception as e:
        reason = trial.user_attrs.get("fail_reason") or f"{type(e).__name__}: {e}"
        trial.user_attrs["fail_reason"] = reason + _where_suffix(where)
        # Tune insists on the metric keys; NaN marks them unusable and the searcher tells Optuna FAIL
        tune.report({**{f"obj{i}": math.nan for i in range(n_obj)}, FAILED_KEY: 1, ERROR_KEY: reason,
                     ATTRS_KEY: json.dumps(trial.user_attrs, default=str)})
        return
    values = values if isinstance(values, list) else [values]
    out = {f"obj{i}": float(v) for i, v in enumerate(values)}
    out[ATTRS_KEY] = json.dumps(trial.user_attrs, default=str)
    out[CONSTRAINTS_KEY] = json.dumps(trial.constraints)
    tune.report(out)


def _rung_report(trial: _RecordingTrial, objective: Objective) -> Callable[..., bool]:
    """The `climb_rungs` report of a Tune trial: one `tune.report` per rung, with everything the searcher must
    store should ASHA stop the trial there (it then never returns from `tune.report`: Tune ends its thread)."""
    def report(result, metrics: list[float], step: int, last: bool) -> bool:
        record(trial, result, objective.base)
        trial.set_user_attr("rung_metrics", list(metrics))
        tune.report({"obj0": float(metrics[-1]), RUNG_KEY: step, FINAL_KEY: int(last),
                     ATTRS_KEY: json.dumps(trial.user_attrs, default=str),
                     CONSTRAINTS_KEY: json.dumps(trial.constraints)})
        return False  # Tune's scheduler decides, not the trial
    return report


# ------------------------------------------------------------------ the searcher
class ConstrainedOptunaSearch(OptunaSearch):
    """`OptunaSearch` that also passes constraints, user attributes and failures to the Optuna trial."""

    def __init__(self, *args, worker: str = "", warm_starts: list[tuple[str, dict]] | None = None,
                 watch: "FailWatch | None" = None, trials: "_TrialIndex | None" = None, rungs: bool = False,
                 deadline: float | None = None, **kw):
        self._deadline = deadline  # time.time(): no trial starts after it (search.timeout_s)
        self._suggested = 0
        self._rungs = rungs  # multi-fidelity: intermediate values at RUNG_KEY, stopped trials told PRUNED
        self._reported: dict[str, set[int]] = {}
        self._worker = worker
        self._warm = warm_starts or []
        self._watch = watch or FailWatch(0)
        self._trials = trials or _TrialIndex()
        super().__init__(*args, **kw)

    def suggest(self, trial_id: str):
        if self._deadline is not None and self._suggested and time.time() >= self._deadline:
            return Searcher.FINISHED  # Tune starts no new trial and lets the running ones finish
        self._suggested += 1
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and self._worker:
            # the driver owns the Optuna trial: a dead driver's RUNNING trials are failed on resume
            ot_trial.set_user_attr("worker", self._worker)
            for label, point in self._warm:
                if all(abs(ot_trial.params.get(k, math.nan) - v) < 1e-12 for k, v in point.items()):
                    ot_trial.set_user_attr("warm_start", label)
                    break
        if isinstance(params, dict) and ot_trial is not None:
            params = {**params, NUMBER_KEY: ot_trial.number}
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._rungs:
            return super().on_trial_result(trial_id, result)
        self._report_rung(trial_id, result)

    def _report_rung(self, trial_id: str, result: dict) -> None:
        """The rung's metric as the Optuna trial's intermediate value at step reduction**k, once per step
        (Tune passes a stopped trial's last result to `on_trial_complete` only)."""
        if trial_id in self._completed_trials or trial_id not in self._ot_trials or result.get(FAILED_KEY):
            return
        metric, step = result.get(self._metric_list()[0]), result.get(RUNG_KEY)
        if metric is None or step is None or int(step) in self._reported.setdefault(trial_id, set()):
            return
        self._ot_trials[trial_id].report(float(metric), int(step))
        self._reported[trial_id].add(int(step))

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
            self._reported.pop(trial_id, None)
            reason, full = result.get(ERROR_KEY), None
            if error:  # the actor raised or died: Tune has the exception (the trial never reported)
                reason, where = self._trials.error_of(trial_id)
                if where:
                    ot_trial.set_user_attr(WHERE_ATTR, where)
                full = reason + _where_suffix(where)
            elif reason is None:
                reason = "the Ray trial reported no metric"
            if full is not None or "fail_reason" not in ot_trial.user_attrs:
                full = full or reason
                ot_trial.set_user_attr("fail_reason", full)
            try:
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            except Exception as e:  # already finished by another path
                log.debug("tell FAIL for %s: %s", trial_id, e)
            self._completed_trials.add(trial_id)
            self._watch.note(reason, full or ot_trial.user_attrs.get("fail_reason") or reason)
            return
        if self._rungs:
            self._report_rung(trial_id, result)
            self._reported.pop(trial_id, None)
            if not result.get(FINAL_KEY):  # ASHA stopped it at a rung: recorded like Optuna's pruner does
                try:
                    self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
                except Exception as e:
                    log.debug("tell PRUNED for %s: %s", trial_id, e)
                self._completed_trials.add(trial_id)
                self._watch.note(None)
                return
        super().on_trial_complete(trial_id, result, error)
        self._watch.note(None)

    def _metric_list(self) -> list[str]:
        return list(self.metric) if isinstance(self.metric, list) else [self.metric]


# ------------------------------------------------------------------ failures that say why
_EXC_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failed|Warning))"
                       r"(?:\([^)]*\))?: (.+)$")

_PID_IP = re.compile(r"\(pid=(\d+), ip=([\w.:\-]+)")


def _is_import_error(reason: str) -> bool:
    return reason.startswith(("ModuleNotFoundError:", "ImportError:"))


def describe_error(exc: BaseException | None, text: str = "") -> tuple[str, dict[str, Any] | None]:
    """("Type: message", {"node_ip", "pid"} or None) for an exception Ray or Tune handed back: the user's
    exception inside a RayTaskError, or the last "SomeError: message" line of an actor's death notice."""
    if exc is None and not text:
        return "the Ray trial failed (no error recorded; see the Ray logs)", None
    where = None
    outer = str(exc) if exc is not None else ""
    if isinstance(exc, ray.exceptions.RayTaskError):
        if getattr(exc, "ip", None) or getattr(exc, "pid", None):
            where = {"node_ip": getattr(exc, "ip", None) or "?", "node_id": "", "pid": getattr(exc, "pid", "?")}
        cause = getattr(exc, "cause", None)
        if cause is not None and not isinstance(cause, ray.exceptions.RayError):
            return f"{type(cause).__name__}: {cause}", where
        if cause is not None:
            exc = cause
    body = text or (str(exc) if exc is not None else "")
    if where is None:  # Ray's notices name the worker as "ray::fn() (pid=123, ip=10.0.0.2)"
        m = _PID_IP.search(body) or _PID_IP.search(outer)
        where = {"node_ip": m.group(2), "node_id": "", "pid": int(m.group(1))} if m else None
    lines = [ln for ln in body.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _EXC_LINE.match(ln)
        if m and m.group(1) not in ("RayTaskError", "TuneError"):
            return f"{m.group(1)}: {m.group(2).strip()}", where
    head = " ".join(ln.strip() for ln in lines[:3])[:300]
    return (f"{type(exc).__name__}: {head}" if exc is not None else head) or "the Ray trial failed", where


class _TrialIndex(tune.Callback):
    """Gives the searcher Tune's `Trial` objects (and so their errors): Tune tells the searcher that a trial
    errored before it tells the callbacks, and only the trial object has the exception."""

    def __init__(self) -> None:
        self.trials: list = []

    def __reduce__(self):  # Tune pickles the searcher and callbacks into its experiment state: keep it small
        return (_TrialIndex, ())

    def on_step_begin(self, iteration, trials, **info) -> None:
        self.trials = trials  # Tune's own list: trials added later show up in it

    def error_of(self, trial_id: str) -> tuple[str, dict[str, Any] | None]:
        trial = next((t for t in self.trials if t.trial_id == trial_id), None)
        if trial is None:
            return describe_error(None)
        try:
            if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
                with open(trial.pickled_error_file, "rb") as f:
                    return describe_error(cloudpickle.load(f))
        except Exception as e:  # noqa: BLE001 - an exception whose class the driver cannot unpickle
            log.debug("cannot read %s: %s", trial.pickled_error_file, e)
        try:
            if trial.error_file and os.path.exists(trial.error_file):
                return describe_error(None, Path(trial.error_file).read_text(errors="replace"))
        except OSError as e:
            log.debug("cannot read %s: %s", trial.error_file, e)
        return describe_error(None)


class FailWatch:
    """Fast fail: when the first `n` trials of a search all fail with the same error, that error is the
    search's (a module the workers cannot import, a broken factory), not bad luck: stop and say so."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.outcomes: list[str | None] = []  # the error of each finished trial, None for a completed one
        self.reason: str | None = None  # set once the search must stop: the full reason of the first failure
        self._first_full: str | None = None

    def note(self, error: str | None, full: str | None = None) -> None:
        if self.n <= 0 or len(self.outcomes) >= self.n:
            return
        self.outcomes.append(error)
        if len(self.outcomes) == 1:
            self._first_full = full or error
        if len(self.outcomes) == self.n and error is not None and all(o == error for o in self.outcomes):
            self.reason = self._first_full

    def message(self) -> str:
        error = self.outcomes[0] or ""
        which = "the first trial" if self.n == 1 else f"the first {self.n} trials all"
        msg = f"search stopped: {which} failed with the same error: {self.reason}"
        return msg + (f"; {IMPORT_HINT}" if _is_import_error(error) else "")


class _FastFailStopper(Stopper):
    def __init__(self, watch: FailWatch) -> None:
        self.watch = watch

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.watch.reason is not None


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
    # on a cluster, ship what unpickling the model, data and task needs (built here anyway, before sensitivity)
    init_ray(spec, ship=(session.evaluator, session.pruner) if _is_cluster(s.ray_address) and not ray.is_initialized() else ())
    storage_obj = open_storage(storage_url(spec, storage))
    name = study_name(spec, strategy)
    # (the estimate is the sweep run serially: on a cluster its Ray tasks run side by side, so it errs towards
    # skipping; search.priors: sensitivity sweeps regardless)
    priors, priors_note, timing_evals = choose_priors(session, strategy, storage_obj, name, t0)
    if priors == "sensitivity":
        session.sensitivity(map_fn=ray_map_for(spec))  # one Ray task per group; build_space reuses the result
    space, sens_evals = build_space(session, strategy, priors)
    sens_evals += timing_evals
    mode = resolve_budget_mode(spec)
    objectives = list(s.objectives)
    study, created = create_or_load(storage_obj, name, directions(objectives), spec, strategy, mode)
    keep_priors(study, created, priors, priors_note)
    fail_stale_trials(study)
    prep_s = time.perf_counter() - t0  # Ray's start, the sensitivity sweep (unless cached), the study

    warm: list[tuple[str, dict]] = []
    if created and strategy == "optuna":
        # the same warm starts as the local loop; Tune passes a point's config only, so here the sampler's
        # clipped view of each plan is what is evaluated (projected), not the plan itself
        sens = session.sensitivity().table if priors == "sensitivity" else None
        warm = [(label, space.point(plan)) for label, plan in strategies.warm_start_plans(space, sens)]

    # multi-fidelity as in the local loop: successive halving over the recovery rungs, here Tune's ASHA
    rungs = list(s.recovery_rungs) if len(objectives) == 1 else []
    score = study_score(study, created, search_score(spec, strategy), auto=spec.search.score == "auto")
    study_centre(study, created, space)
    objective = Objective(space, session.evaluator, session.cost_model, objectives=objectives, budget_mode=mode,
                          rungs=rungs, reduction=s.rung_reduction,
                          recovery_lr=spec.recovery_lr, seed=s.seed, score=score)
    threads = max(1, int(s.cpus_per_trial))
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, payload=cloudpickle.dumps(objective), key=uuid.uuid4().hex,
                             n_obj=len(objectives), threads=threads),
        {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial},
    )
    param_space = {n: FloatDistribution(*space.param_range(n)) for n in space.dims}
    metrics = [f"obj{i}" for i in range(len(objectives))]
    modes = ["max" if d == "maximize" else "min" for d in directions(objectives)]
    sampler_name = "random" if strategy == "random" else s.sampler
    ray_dir = (spec.run_dir / "ray").resolve()

    bar = progress(total=n_trials, initial=min(n_done(study, bool(rungs)), n_trials), desc=f"search {name} (ray)",
                   disable=not show_progress)
    attempts = 0
    first = True
    watch = FailWatch(min(3, n_trials))
    index = _TrialIndex()
    deadline = time.time() - (time.perf_counter() - t0) + s.timeout_s if s.timeout_s else None
    while True:
        done = n_done(study, bool(rungs))
        bar.n = min(done, n_trials)
        bar.refresh()
        missing = n_trials - done
        if missing <= 0 or attempts >= 3 * n_trials or (deadline is not None and not first and time.time() >= deadline):
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
            watch=watch,
            trials=index,
            rungs=bool(rungs),
            deadline=deadline,
        )
        first = False
        scheduler = ASHAScheduler(time_attr=RUNG_KEY, metric=metrics[0], mode=modes[0], grace_period=1,
                                  reduction_factor=s.rung_reduction, max_t=s.rung_reduction ** len(rungs)) if rungs else None
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
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
                stop=_FastFailStopper(watch),
                callbacks=[index, _ProgressCallback(study, bar, n_trials, bool(rungs))],
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, num_to_keep=1),
            ),
        )
        with fast_tpe_math():  # the searcher samples in this process
            tuner.fit()
        attempts += missing
        if watch.reason is not None:
            bar.close()
            raise AutopruneError(watch.message())
    bar.close()
    if n_complete(study) == 0:
        reasons = {t.user_attrs.get("fail_reason", "unknown") for t in study.trials if t.state == TrialState.FAIL}
        raise AutopruneError(f"every trial failed; reasons: {sorted(reasons)[:3]}")
    note = timeout_note(s.timeout_s, n_done(study, bool(rungs)), n_trials, prep_s,
                        sweep_skips=spec.sensitivity.skip_insensitive,
                        auto_swept=auto_swept(spec, priors))
    notes = list(space.notes) + ([priors_note] if priors_note else []) + ([note] if note else []) + [f"ray backend: {s.max_concurrent_trials} concurrent trial(s), "
                                 f"{s.cpus_per_trial} CPU / {s.gpus_per_trial} GPU each"
                                 + (f"; ASHA over recovery rungs {rungs} (reduction {s.rung_reduction})" if rungs else "")]
    fsync_now()  # the journal's last trials, on disk before the search returns (studies.TrialDurableJournal)
    return SearchRun(session, study, space, strategy, mode, time.perf_counter() - t0, sens_evals, notes, priors)


class _ProgressCallback(tune.Callback):
    """Advances the progress bar as Tune completes trials (the searcher has already told Optuna)."""

    def __init__(self, study: optuna.Study, bar, n_trials: int, rungs: bool = False) -> None:
        self.study, self.bar, self.n_trials, self.rungs = study, bar, n_trials, rungs

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.bar.n = min(n_done(self.study, self.rungs), self.n_trials)
        best = best_metric(self.study)
        if best is not None:
            self.bar.set_postfix(best=f"{best:.4f}")
        self.bar.refresh()
