"""Study plumbing both backends share: storage, study names, samplers, stale trials, the search space a
strategy searches, and what a finished search hands to the results stage."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.storages.journal._file import get_lock_file
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import TrialState

from autoprune.errors import AutopruneError
from autoprune.costs.budgets import Budget
from autoprune.searching.objective import RECORD_KEY, trial_attrs
from autoprune.searching import strategies
from autoprune.searching.space import SearchSpace

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

@dataclass
class SearchRun:
    """What `run_search` hands to the results stage."""

    session: Any  # autoprune.app.session.Session
    study: optuna.Study
    space: SearchSpace
    strategy: str
    budget_mode: str
    wall_s: float
    sensitivity_evaluations: int = 0
    notes: list[str] = field(default_factory=list)
    priors: str = "none"  # what the search used: "sensitivity" or "none" (`resolve_priors`)

    @property
    def n_complete(self) -> int:
        return sum(t.state == TrialState.COMPLETE for t in self.study.trials)

    @property
    def n_failed(self) -> int:
        return sum(t.state == TrialState.FAIL for t in self.study.trials)

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
            repair_journal(path)
            return TrialBatchedJournalStorage(TrialDurableJournal(str(path)))
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


class TrialDurableJournal(JournalFileBackend):
    """Optuna's journal file, `fsync`ed when a trial ends, by a background thread, rather than after every record.

    Why by hand: `JournalFileBackend.append_logs` fsyncs each record, and a trial writes ~17 of them (one per
    suggested ratio, its record, its constraint, its state): 2-3 ms of a 60 ms ResNet-20 trial, for durability
    that only matters for the records of a trial that finished; and the one fsync at a trial's end still cost
    0.5 ms of the ~8 ms a trial spends outside evaluation. Every record is written and flushed under the
    journal's lock before `append_logs` returns, so other processes, and a restart after the search is killed,
    see it at once. A trial's end asks `fsync_soon` to make the file durable, which a background thread does while
    the next trial runs; a search ends with `fsync_now`, and so does the process (atexit). What an OS crash
    or power loss can lose is the trials that ended in the last few milliseconds, which a resume runs again.
    Study-level changes (a new study, its attributes) are written by Optuna itself, fsynced before returning."""

    _CHEAP = frozenset(int(op) for op in (JournalOperation.CREATE_TRIAL, JournalOperation.SET_TRIAL_PARAM,
                                          JournalOperation.SET_TRIAL_INTERMEDIATE_VALUE,
                                          JournalOperation.SET_TRIAL_USER_ATTR, JournalOperation.SET_TRIAL_SYSTEM_ATTR))
    _END = int(JournalOperation.SET_TRIAL_STATE_VALUES)
    _OWN = _CHEAP | {_END}  # what this class writes itself; anything else (study-level) goes to Optuna's append

    def read_logs(self, log_number_from: int):
        # the storage reads the journal before and after every operation (~13 times a trial), and mostly nothing
        # was added: when the file still ends where the last read ended, skip opening it
        end = getattr(self, "_log_number_offset", {}).get(log_number_from)
        if end is not None and os.stat(self._file_path).st_size == end:
            return iter(())
        return super().read_logs(log_number_from)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if not (hasattr(self, "_lock") and hasattr(self, "_file_path")) or any(
                log.get("op_code") not in self._OWN for log in logs):
            return super().append_logs(logs)  # (also if a future Optuna renames the private names used below)
        text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
        with get_lock_file(self._lock):
            with open(self._file_path, "ab") as f:
                f.write(text.encode("utf-8"))
        if any(log.get("op_code") == self._END for log in logs):
            fsync_soon(self._file_path)


_FSYNC = threading.Condition()
_FSYNC_PENDING: set[str] = set()
_FSYNC_KNOWN: set[str] = set()
_FSYNC_THREAD: dict[int, threading.Thread] = {}  # by process id: a forked worker starts its own


def fsync_soon(path: str) -> None:
    """Have the background thread fsync `path` (see `TrialDurableJournal`)."""
    with _FSYNC:
        _FSYNC_PENDING.add(path)
        _FSYNC_KNOWN.add(path)
        if os.getpid() not in _FSYNC_THREAD:
            t = threading.Thread(target=_fsync_loop, name="autoprune-journal-fsync", daemon=True)
            _FSYNC_THREAD[os.getpid()] = t
            t.start()
        _FSYNC.notify()


def _fsync_loop() -> None:
    while True:
        with _FSYNC:
            while not _FSYNC_PENDING:
                _FSYNC.wait()
            paths = sorted(_FSYNC_PENDING)
            _FSYNC_PENDING.clear()
        for path in paths:
            _fsync_path(path)


def fsync_now() -> None:
    """fsync every journal this process wrote a trial's end to, now (the end of a search; process exit)."""
    with _FSYNC:
        _FSYNC_PENDING.clear()
        paths = sorted(_FSYNC_KNOWN)
        _FSYNC_KNOWN.clear()
    for path in paths:
        _fsync_path(path)


def _fsync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:  # moved away or deleted since: nothing of ours left to make durable
        return
    try:
        os.fsync(fd)
    except OSError as e:
        log.warning("cannot fsync the study journal %s: %s", path, e)
    finally:
        os.close(fd)


def _fsync_after_fork() -> None:
    # a forked child (multiprocessing workers) starts with no fsync thread and with a lock another of the
    # parent's threads may have held at the fork
    global _FSYNC
    _FSYNC = threading.Condition()
    _FSYNC_PENDING.clear()
    _FSYNC_KNOWN.clear()


atexit.register(fsync_now)
os.register_at_fork(after_in_child=_fsync_after_fork)


class TrialBatchedJournalStorage(JournalStorage):
    """Optuna's journal storage, writing a running trial's parameters in one append.

    Why by hand: Optuna writes one journal record per `suggest_float`, each an append under the file lock
    followed by a read of the journal (~0.1 ms each, 12 a ResNet-20 trial, ~1.2 ms of its ~11 ms outside
    evaluation). Here parameter and system-attribute records are kept in memory and appended together, in
    order, just before the storage next writes or reads anything else (the trial's result record, a sampler or
    pruner reading the study, the trial's end): every reader, in this process or another, sees them before the
    trial's result and end are written, so a finished trial is on disk whole. User attributes (a result, a
    failure's reason) are written at once, as before; a trial this process creates for itself carries its
    worker's claim in its creation record. What a kill can lose is the
    parameters of the trial that was running, which a resume marks failed anyway (`fail_stale_trials`). Optuna
    offers no batching for the journal; this relies on its `_write_log` / `_sync_with_backend` pair (a future
    Optuna without them writes every record through, as Optuna does)."""

    _BUFFERED = frozenset(int(op) for op in (JournalOperation.SET_TRIAL_PARAM, JournalOperation.SET_TRIAL_SYSTEM_ATTR))
    _CREATE = int(JournalOperation.CREATE_TRIAL)

    def __init__(self, backend) -> None:
        self._pending: list[dict[str, Any]] = []
        self._skip_sync = False
        super().__init__(backend)

    def _write_log(self, op_code: int, extra_fields: dict[str, Any]) -> None:
        if int(op_code) == self._CREATE and "state" not in extra_fields:
            # a trial this process creates to run it (`study.ask`; an enqueued one has a template with its state):
            # claimed by it in the same record (`fail_stale_trials`), not in a second append
            extra_fields = {**extra_fields, "user_attrs": {"worker": worker_id()}}
        if int(op_code) in self._BUFFERED:
            trial = self._replay_result._trials.get(extra_fields.get("trial_id"))
            if trial is not None and trial.state.is_finished():  # what replaying it would raise, now
                raise UpdateFinishedTrialError(f"trial #{trial.number} has already finished and cannot be updated")
            self._pending.append({"op_code": op_code, "worker_id": self._replay_result.worker_id, **extra_fields})
            self._skip_sync = True  # the sync Optuna makes right after this write: nothing to read yet
            return
        if not self._pending:
            return super()._write_log(op_code, extra_fields)
        # one append: what was kept, then this record (kept until the append succeeds: never dropped)
        self._backend.append_logs([*self._pending, {"op_code": op_code, "worker_id": self._replay_result.worker_id,
                                                     **extra_fields}])
        self._pending = []

    def _sync_with_backend(self) -> None:
        if self._skip_sync:
            self._skip_sync = False
            return
        self._flush()
        super()._sync_with_backend()

    def _flush(self) -> None:
        if self._pending:
            self._backend.append_logs(self._pending)
            self._pending = []

    def __getstate__(self) -> dict[Any, Any]:
        with self._thread_lock:
            self._flush()
        return super().__getstate__()

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._pending, self._skip_sync = [], False


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
        # claim the trial for this process as soon as Optuna has created it (before any sampling), so a kill
        # leaves at most the create -> claim window unclaimed (see fail_stale_trials)
        if "worker" not in trial.user_attrs:
            study._storage.set_trial_user_attr(trial._trial_id, "worker", worker_id())
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

_TPE_MATH_LOCK = threading.Lock()
_TPE_MATH_USERS = 0
_TPE_MATH_SAVED: dict[str, Any] = {}


@contextlib.contextmanager
def fast_tpe_math():
    """While a search runs, Optuna's TPE evaluates the normal distribution's log-CDF and CDF with SciPy's ufuncs
    (`scipy.special.log_ndtr`, `ndtr`) instead of its own pure-Python ones; restored when the last search ends.

    Why by hand: Optuna's TPE keeps SciPy out of its dependencies and computes `log_ndtr` element by element in
    Python (`np.frompyfunc`): ~1,300 calls a trial for 12 ratios at 60 trials, half of the sampler's 2.5 ms on a
    ResNet-20 trial, and it grows with the trials. Optuna offers no hook for it; its truncated-normal module looks
    these two functions up as module globals, so swapping them changes nothing but the speed (same functions,
    SciPy's to the last bits: a test compares both, and the proposals of a TPE study with and without). SciPy is
    there with scikit-learn. If this Optuna lacks the names, nothing is swapped."""
    global _TPE_MATH_USERS
    try:
        import scipy.special as sp
        from optuna.samplers._tpe import _truncnorm as tn
    except ImportError:
        yield
        return
    fast = {"_log_ndtr": sp.log_ndtr, "_ndtr": sp.ndtr}
    if not all(callable(getattr(tn, name, None)) for name in fast):
        yield
        return
    with _TPE_MATH_LOCK:  # a count, so that searches in threads (the service) restore Optuna's only at the end
        if _TPE_MATH_USERS == 0:
            _TPE_MATH_SAVED.update({name: getattr(tn, name) for name in fast})
            for name, fn in fast.items():
                setattr(tn, name, fn)
        _TPE_MATH_USERS += 1
    try:
        yield
    finally:
        with _TPE_MATH_LOCK:
            _TPE_MATH_USERS -= 1
            if _TPE_MATH_USERS == 0:
                for name, fn in _TPE_MATH_SAVED.items():
                    setattr(tn, name, fn)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"

UNCLAIMED_STALE_S = 120.0  # a RUNNING trial with no worker yet (its process died inside study.ask) after this long


def fail_stale_trials(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a dead process on this host as failed (journal storages have no heartbeat)."""
    host = socket.gethostname()
    n = 0
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker", "")
        h, _, pid = w.rpartition(":")
        if not w:  # killed between creating the trial and claiming it: stale once older than any sampling step
            if t.datetime_start is None or (now - t.datetime_start).total_seconds() < UNCLAIMED_STALE_S:
                continue
        elif h != host or not pid.isdigit() or pid_alive(int(pid)):
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

# Under search.timeout_s, `priors: auto` sweeps only when the sweep can take at most this share of the time left:
# the sweep is worth its time only through the trials that use its bounds and warm start, so a third of the limit
# stays theirs. Set from the ten-seed runs at FastNAS's wall time (benchmarks/README.md), not before them: it was 1/2 first, which
# skipped ResNet-20's sweep at ~55 % of the limit, and sweeping there was better (+0.36 pp at 30 % MACs, with ~35
# trials after it against 60 without); ResNeXt-20's sweep (~130 % of its limit) is skipped under either, and
# sweeping first there had cost 1.1 pp at 30 %.
SWEEP_SHARE = 2 / 3


def stored_priors(storage, name: str) -> str | None:
    """The priors a study in `storage` was searched with under `auto`: "none" when it recorded that the time limit
    skipped its sweep, else "sensitivity" (only that skip is recorded: one journal write fewer for every other
    study); None when there is no such study yet."""
    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(sid).get("priors", "sensitivity")


def resolve_priors(session, strategy: str, *, stored: str | None = None,
                   time_left_s: float | None = None) -> tuple[str, str | None]:
    """("sensitivity" or "none", a note or None): whether this search sweeps sensitivity first.

    Only the optuna strategy uses priors. search.priors: sensitivity or none is taken as it is. auto (the default)
    is sensitivity, unless search.timeout_s is set, the sweep is not cached, and the sweep would take more than
    SWEEP_SHARE of the time left (`time_left_s`): its evaluations at most (`Session.sweep_estimate`) times one
    evaluation of the unpruned model, timed (the sweep reuses it as its baseline). A resumed study keeps the
    priors it was created with (`stored`), so its trials stay in one space."""
    if strategy != "optuna":
        return "none", None
    asked = session.spec.search.priors
    if asked != "auto":
        return asked, None
    if stored in ("sensitivity", "none"):
        return stored, None
    limit = session.spec.search.timeout_s
    if not limit or session.sensitivity_cached():
        return "sensitivity", None
    left = limit if time_left_s is None else time_left_s
    n_evals, per_eval = session.sweep_estimate()
    if n_evals * per_eval <= SWEEP_SHARE * left:
        return "sensitivity", None
    return "none", (f"search.priors: auto skipped the sensitivity sweep: up to {n_evals} evaluations at "
                    f"{per_eval:.2f} s (~{n_evals * per_eval:.0f} s) would take over {SWEEP_SHARE:.0%} of the "
                    f"{left:.0f} s that search.timeout_s left, so every trial searched each group in "
                    f"[0, max_ratio] with the uniform, global and LAMP warm starts; raise timeout_s, or set "
                    f"search.priors: sensitivity to sweep anyway")


def choose_priors(session, strategy: str, storage, name: str, t0: float) -> tuple[str, str | None, int]:
    """What both backends do before building the space: `resolve_priors` for the study `name` in `storage`, with
    the time left of search.timeout_s since `t0` (`time.perf_counter()` at the search's start). Returns the
    priors, the note, and the evaluations spent on deciding: 1 when the sweep was timed and then skipped (a sweep
    that runs reuses the timing evaluation as its baseline and counts it itself)."""
    limit = session.spec.search.timeout_s
    left = limit - (time.perf_counter() - t0) if limit else None
    priors, note = resolve_priors(session, strategy, stored=stored_priors(storage, name), time_left_s=left)
    return priors, note, int(note is not None)


def keep_priors(study: optuna.Study, created: bool, priors: str, note: str | None) -> None:
    """A new study whose sweep `auto` skipped for the time limit records it (`stored_priors`), so that a resume
    searches the same space."""
    if created and note is not None:
        study.set_user_attr("priors", priors)


def auto_swept(spec, priors: str) -> bool:
    """Whether the sweep ran because `search.priors: auto` chose it (what `timeout_note` needs to know)."""
    return spec.search.priors == "auto" and priors == "sensitivity"


def build_space(session, strategy: str, priors: str | None = None) -> tuple[SearchSpace, int]:
    """The search space for a strategy; sensitivity priors only where the strategy uses them (`priors`: what
    `resolve_priors` decided; None: resolve it here, without a time limit)."""
    spec = session.spec
    budget = Budget.from_spec(spec, session.pruner, session.cost_model)
    if priors is None:
        priors = resolve_priors(session, strategy)[0]
    use_priors = strategy == "optuna" and priors == "sensitivity"
    sens, n_eval = None, 0
    if use_priors:
        SearchSpace.build(session.pruner, budget, None, spec.search.tolerance)  # an unreachable budget fails now
        res = session.sensitivity()
        sens, n_eval = res.table, res.evaluations
    space = SearchSpace.build(session.pruner, budget, sens, spec.search.tolerance)
    centre = resolve_centre(spec, strategy)
    if centre != "none":
        ref = strategies.ranked_plan(space, "lamp")  # (the only centre so far: the one benchmarked)
        space.centre = {n: max(1.0 - ref.ratios.get(n, 0.0), 1e-3) for n in space.dims}
        space.span = spec.search.centre_span
        space.centre_name = centre
    return space, n_eval


def resolve_centre(spec, strategy: str) -> str:
    """The reference plan a search's proposals are relative to (search.centre): only the optuna strategy with
    the budget projection (one objective) uses one. A multi-objective search spreads its trials over the costs
    (budget_mode: constraint), which one common scale onto the budget would undo; the random strategy stays the
    plain baseline (a ratio per group, uniformly at random)."""
    if strategy != "optuna" or resolve_budget_mode(spec) != "projection":
        return "none"
    return spec.search.centre


def study_centre(study: optuna.Study, created: bool, space: SearchSpace) -> None:
    """A study's proposals mean one thing for its whole life: a new study records its centre; resuming one made
    with another (a study from before search.centre had none) is an error naming both, since its trials'
    parameters would be read as another space's."""
    centre = space.centre_name
    if created:
        if centre != "none":  # (absent means none: a default study pays no extra journal write)
            study.set_user_attr("centre", centre)
        return
    stored = study.user_attrs.get("centre", "none")
    if stored != centre:
        raise AutopruneError(f"study {study.study_name!r} was searched with search.centre: {stored}; this run "
                             f"would use {centre}: use another name or storage, or search.centre: {stored}")

def create_or_load(storage, name: str, dirs: list[str], spec, strategy: str, mode: str) -> tuple[optuna.Study, bool]:
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

def search_score(spec, strategy: str) -> str:
    """What `strategy`'s trials are ranked by: search.score ("metric"; "loss": minus the task's loss; "balanced:W":
    the metric plus W x the width balance) for the optuna and random strategies; the heuristics and NetAdapt choose
    by the metric themselves. `auto` (the default) is balanced for the optuna strategy with one objective and no
    recovery rungs (where the ten-seed benchmark measured it), and the metric elsewhere: a Pareto front and the
    rungs compare plans by the metric, and the random strategy stays the plain baseline."""
    if strategy not in ("optuna", "random"):
        return "metric"
    score = spec.search.score
    if score == "auto":
        single = len(spec.search.objectives) == 1 and not spec.search.recovery_rungs
        score = "balanced" if strategy == "optuna" and single else "metric"
    if score == "balanced":  # the weight is part of what the values mean: "balanced:0.2"
        return f"balanced:{spec.search.balance_weight:g}"
    return score


def study_score(study: optuna.Study, created: bool, score: str, *, auto: bool = False) -> str:
    """The score a study ranks by is kept with it: a new study records `score`; resuming one created with
    another is an error, since its trials' values would not be comparable, unless the score was left to `auto`
    (search.score's default): then the study keeps its own (a study from before the default became balanced
    resumes ranking by the metric, as it began)."""
    if created:
        study.set_user_attr("score", score)
        return score
    stored = study.user_attrs.get("score", "metric")
    if stored != score:
        if auto:
            return stored
        raise AutopruneError(f"study {study.study_name!r} ranks its trials by the {stored}; the spec asks for "
                             f"search.score: {score}: use another name or storage, or search.score: {stored}")
    return score


def timeout_note(timeout_s: float | None, done: int, n_trials: int, prep_s: float, *, sweep_skips: bool,
                 auto_swept: bool = False) -> str | None:
    """What `search.timeout_s` cost, when it stopped the search before `n_trials`: how many trials ran, and how
    much of the limit went to the sensitivity sweep (on a model with many groups the sweep alone can use most
    of it, and the user should know the search was the sweep plus a few trials). `sweep_skips`: whether the
    sweep already skipped insensitive groups' smaller ratios (`sensitivity.skip_insensitive`). `auto_swept`:
    `priors: auto` chose the sweep because it fitted its share of the limit; then `priors: none` is not
    suggested (on the benchmark log's held-out check, benchmarks/README.md, such a sweep was worth +0.5 pp over skipping it)."""
    if not timeout_s or done >= n_trials:
        return None
    note = f"search.timeout_s ({timeout_s:g} s) stopped the search after {done} of {n_trials} trials"
    if prep_s > 0.05 * timeout_s:
        note += f"; the sensitivity sweep took {prep_s:.1f} s of it ({prep_s / timeout_s:.0%})"
        if prep_s > 0.5 * timeout_s:
            fixes = ["raise timeout_s"]
            if not sweep_skips:
                fixes.append("set sensitivity.skip_insensitive: true to sweep fewer ratios (ResNeXt-20: half)")
            if not auto_swept:
                fixes.append("set search.priors: none to spend it on trials")
            note += "; " + (fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + ", or " + fixes[-1])
    return note


def n_done(study: optuna.Study, rungs: bool = False) -> int:
    """Trials that count towards n_trials: completed ones, and with multi-fidelity those stopped at a rung."""
    states = (TrialState.COMPLETE, TrialState.PRUNED) if rungs else (TrialState.COMPLETE,)
    return len(study.get_trials(deepcopy=False, states=states))


def n_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best feasible completed trial by its value (what the search ranks by: the metric, or minus the loss
    under search.score: loss); the first objective of a multi-objective study."""
    feasible = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _feasible(t)]
    return max(feasible, key=lambda t: t.values[0], default=None)


def _feasible(t: optuna.trial.FrozenTrial) -> bool:
    """`trial_attrs(t).get("feasible", True)` without unpacking the whole record (the progress bar asks after
    every trial, for every trial)."""
    a = t.user_attrs
    if "feasible" in a:
        return bool(a["feasible"])
    rec = a.get(RECORD_KEY)
    return bool(rec.get("feasible", True)) if isinstance(rec, dict) else True


def best_metric(study: optuna.Study) -> float | None:
    """The metric `best_trial` recorded: what the progress bars show."""
    best = best_trial(study)
    return None if best is None else trial_attrs(best).get("metric", best.values[0])
