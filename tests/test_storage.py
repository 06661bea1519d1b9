"""Study storage: the journal file and a real PostgreSQL (AUTOPRUNE_PG_URL, started by .ci/postgres.sh).

Four worker processes on one study lose and duplicate no trial; a search resumes on either storage.
Every test uses a fresh study/spec name so that the database can be reused between runs.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autoprune.app import api
from autoprune.searching.objective import trial_attrs
from autoprune.searching.studies import open_storage, study_name
from autoprune.spec import load_spec
from conftest import require_service

WORKERS = 4
PER_WORKER = 10
WARM = [{"x": 0.123, "y": 0.456}, {"x": 0.789, "y": 0.321}]


def _pg_url() -> str:
    url = os.environ.get("AUTOPRUNE_PG_URL", "")
    why = "AUTOPRUNE_PG_URL is not set (run: export AUTOPRUNE_PG_URL=$(bash .ci/postgres.sh))"
    if url:
        try:
            open_storage(url)
        except Exception as e:  # noqa: BLE001 - reported through require_service
            why = f"cannot connect: {e}"
            url = ""
    require_service("PostgreSQL", bool(url), why)
    return url


@pytest.fixture(params=["journal", "postgresql"])
def storage(request, tmp_path) -> str:
    if request.param == "journal":
        return str(tmp_path / "study.journal")
    return _pg_url()


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def run_worker(url: str, name: str, log_path: str, n: int) -> None:
    """One worker process: load the shared study and run `n` trials, logging what it evaluated."""
    study = optuna.load_study(study_name=name, storage=open_storage(url),
                              sampler=optuna.samplers.TPESampler(seed=os.getpid()))
    with open(log_path, "w") as log:
        def objective(trial: optuna.Trial) -> float:
            x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
            log.write(json.dumps({"number": trial.number, "x": x, "y": y}) + "\n")
            log.flush()
            return (x - 0.3) ** 2 + (y - 0.7) ** 2

        study.optimize(objective, n_trials=n)


def test_four_parallel_workers_lose_and_duplicate_no_trial(storage, tmp_path):
    name = _unique("parallel")
    study = optuna.create_study(study_name=name, storage=open_storage(storage))
    for p in WARM:  # enqueued once, before the workers start (as run_search does at creation)
        study.enqueue_trial(p)
    ctx = mp.get_context("spawn")
    logs = [tmp_path / f"worker{i}.jsonl" for i in range(WORKERS)]
    procs = [ctx.Process(target=run_worker, args=(storage, name, str(p), PER_WORKER)) for p in logs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * WORKERS

    trials = optuna.load_study(study_name=name, storage=open_storage(storage)).trials
    ran = [json.loads(line) for p in logs for line in Path(p).read_text().splitlines()]
    assert len(ran) == WORKERS * PER_WORKER
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(WORKERS * PER_WORKER))  # nothing lost, no gaps, no duplicates
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(r["number"] for r in ran) == sorted(numbers)  # each trial evaluated by exactly one worker
    stored = {t.number: (t.params["x"], t.params["y"]) for t in trials}
    assert all(stored[r["number"]] == (r["x"], r["y"]) for r in ran)
    for w in WARM:  # each warm start ran exactly once, not once per worker
        assert sum(1 for t in trials if t.params == w) == 1


def test_search_resumes_on_the_storage(storage, make_spec):
    spec = make_spec("cnn1d", name=_unique("resume"), budget={"macs": 0.5},
                     search={"n_trials": 4, "storage": storage, "priors": "none"})
    first = api.search(spec, show_progress=False, test=False)
    assert first["n_trials_complete"] == 4
    s = load_spec(spec)
    st = open_storage(storage)
    before = {t.number: t.params for t in optuna.load_study(study_name=study_name(s, "optuna"), storage=st).trials}

    # a trial left RUNNING by a killed worker on this host: the resumed run fails it and carries on
    study = optuna.load_study(study_name=study_name(s, "optuna"), storage=st)
    orphan = study.ask()
    orphan.set_user_attr("worker", f"{os.uname().nodename}:999999999")

    second = api.search(spec, n_trials=6, show_progress=False, test=False)
    trials = optuna.load_study(study_name=study_name(s, "optuna"), storage=open_storage(storage)).trials
    assert second["n_trials_complete"] == 6
    assert {t.number: t.params for t in trials if t.number in before} == before  # the first 4 kept as they were
    assert trials[orphan.number].state == TrialState.FAIL
    assert "interrupted" in trial_attrs(trials[orphan.number])["fail_reason"]
    assert second["best"]["macs_ratio"] <= 0.5
    assert sorted(t.number for t in trials) == list(range(len(trials)))


def _search_worker(spec: dict, n_trials: int, out: str) -> None:
    os.environ["AUTOPRUNE_PROGRESS"] = "0"
    from autoprune.searching.study import run_search

    run = run_search(api.session(spec, show_progress=False), n_trials=n_trials, show_progress=False)
    Path(out).write_text(json.dumps(sorted(t.number for t in run.study.trials
                                           if trial_attrs(t).get("worker", "").endswith(f":{os.getpid()}"))))


@pytest.mark.slow
def test_four_autoprune_workers_share_one_study(storage, make_spec, tmp_path):
    """Four `run_search` processes on one spec and storage: one creates the study and the warm starts,
    together they complete n_trials, and every trial belongs to exactly one worker."""
    spec = make_spec("cnn1d", name=_unique("shared"), budget={"macs": 0.5},
                     search={"n_trials": 12, "storage": storage, "priors": "none"})
    api.session(spec, show_progress=False).target  # train (cached) once, before the workers start
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"w{i}.json" for i in range(WORKERS)]
    procs = [ctx.Process(target=_search_worker, args=(spec, 12, str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    s = load_spec(spec)
    trials = optuna.load_study(study_name=study_name(s, "optuna"), storage=open_storage(storage)).trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    # each worker stops once 12 are complete; trials already in flight then may add up to WORKERS - 1 more
    assert 12 <= len(done) <= 12 + WORKERS - 1
    assert all(t.state == TrialState.COMPLETE for t in trials)
    owned = [n for o in outs for n in json.loads(o.read_text())]
    assert sorted(owned) == sorted(t.number for t in trials)  # no trial lost, none run twice
    assert sum(trial_attrs(t).get("warm_start") == "uniform" for t in trials) == 1
    assert all(trial_attrs(t)["macs_ratio"] <= 0.5 + 1e-9 for t in done)


def test_an_unclaimed_running_trial_is_failed_only_once_it_is_old(tmp_path, monkeypatch):
    # a trial autoprune's journal creates carries its worker's claim in its creation record; one created
    # elsewhere (an older autoprune, Optuna itself) is RUNNING with no worker attribute: it may still belong to a
    # live worker that is sampling, so it is failed only after UNCLAIMED_STALE_S
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from autoprune.searching import studies

    study = optuna.create_study(storage=studies.open_storage(str(tmp_path / "s.journal")), study_name="x")
    mine = study.ask()
    assert mine.user_attrs["worker"] == studies.worker_id()  # claimed at creation, by this live process
    plain = optuna.load_study(storage=JournalStorage(JournalFileBackend(str(tmp_path / "s.journal"))), study_name="x")
    trial = plain.ask()
    assert "worker" not in study.trials[trial.number].user_attrs
    assert studies.fail_stale_trials(study) == 0
    monkeypatch.setattr(studies, "UNCLAIMED_STALE_S", 0.0)
    assert studies.fail_stale_trials(study) == 1
    assert study.trials[trial.number].state == optuna.trial.TrialState.FAIL


def test_the_journal_is_fsynced_when_a_trial_ends_and_every_record_is_readable_at_once(tmp_path, monkeypatch):
    # the journal skips the per-record fsync of Optuna's backend (17 a ResNet-20 trial) and syncs when a trial
    # ends (in the background: the next test); every record must still reach the file before the write returns, for other processes and a restart
    from autoprune.searching import studies

    path = tmp_path / "s.journal"
    syncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd))[1])
    study = optuna.create_study(storage=studies.open_storage(str(path)), study_name="x")
    syncs.clear()
    seen_mid_trial = []

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        trial.suggest_float("y", 0, 1)
        trial.set_user_attr("record", {"x": x})
        other = optuna.load_study(storage=studies.open_storage(str(path)), study_name="x")  # another reader
        seen_mid_trial.append(other.trials[trial.number].params)
        return x

    study.optimize(objective, n_trials=5)
    import time as _time

    for _ in range(1000):  # a trial's end is fsynced by a background thread (the next test), soon
        if syncs:
            break
        _time.sleep(0.01)
    assert 1 <= len(syncs) <= 5  # at most one per finished trial (its state), none for its params and attributes
    assert all(set(p) == {"x", "y"} for p in seen_mid_trial)  # flushed before the trial finished
    reloaded = optuna.load_study(storage=studies.open_storage(str(path)), study_name="x").trials
    assert [t.state for t in reloaded] == [TrialState.COMPLETE] * 5
    assert [t.user_attrs["record"]["x"] for t in reloaded] == [t.params["x"] for t in reloaded]


def test_journal_writes_a_trials_parameters_in_one_append(tmp_path):
    # a trial's suggested parameters (and system attributes) are appended together before anything else is
    # written or read; what any reader sees of a finished trial is whole, Optuna's own journal reader included
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = tmp_path / "study.journal"
    st = open_storage(str(path))
    appends = []
    real = st._backend.append_logs
    st._backend.append_logs = lambda logs: (appends.append([log["op_code"] for log in logs]), real(logs))[1]
    study = optuna.create_study(storage=st, study_name="batched", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        xs = [trial.suggest_float(f"x{i}", 0, 1) for i in range(5)]
        trial.set_constraint("c", -1.0)
        return sum(xs)

    study.optimize(objective, n_trials=3)
    from optuna.storages.journal._storage import JournalOperation as op

    param, system, state = int(op.SET_TRIAL_PARAM), int(op.SET_TRIAL_SYSTEM_ATTR), int(op.SET_TRIAL_STATE_VALUES)
    per_trial = [ops for ops in appends if param in ops]
    assert len(per_trial) == 3 and all(ops.count(param) == 5 for ops in per_trial)  # 5 records, 1 append each
    # each append keeps Optuna's order, and each trial's end comes after its parameters
    assert all(ops == [param] * 5 or ops == [param] * 5 + [system] for ops in per_trial), per_trial
    ends = [i for i, ops in enumerate(appends) if ops == [state]]
    assert len(ends) == 3 and all(any(param in ops for ops in appends[:e]) for e in ends)

    plain = JournalStorage(JournalFileBackend(str(path)))  # Optuna's own reader, another "process"
    got = optuna.load_study(study_name="batched", storage=plain).trials
    assert [t.state for t in got] == [TrialState.COMPLETE] * 3
    assert [t.params for t in got] == [t.params for t in study.trials]
    assert [t.system_attrs for t in got] == [t.system_attrs for t in study.trials]
    assert all(t.system_attrs for t in got)  # the constraint, appended with the parameters
    assert all(abs(t.value - sum(t.params.values())) < 1e-12 for t in got)

    # a parameter set on a finished trial fails at once, not when it would be appended
    with pytest.raises(UpdateFinishedTrialError):
        st.set_trial_param(study.trials[0]._trial_id, "late", 0.5, optuna.distributions.FloatDistribution(0, 1))
    assert optuna.load_study(study_name="batched", storage=plain).trials[0].params == got[0].params


def test_journal_fsyncs_a_trials_end_in_the_background_and_everything_before_a_search_returns(tmp_path, monkeypatch,
                                                                                              make_spec):
    # a trial's records reach the file before append_logs returns (other processes, a restart after a kill see
    # them); the fsync that makes a trial's end survive an OS crash runs on a background thread, off the trial's
    # time; a search fsyncs its journal itself before it returns
    import threading
    import time as _time

    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal._storage import JournalOperation as op

    from autoprune.searching import studies

    synced = []
    real = os.fsync

    def recording(fd):
        where = os.path.realpath(f"/proc/self/fd/{fd}")
        if where.startswith(os.path.realpath(tmp_path)):  # (not an earlier test's journal, synced late)
            synced.append((threading.current_thread().name, where))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    path = str(tmp_path / "j.journal")
    backend = studies.TrialDurableJournal(path)
    backend.append_logs([{"op_code": int(op.CREATE_TRIAL), "worker_id": "w", "study_id": 0, "datetime_start": None}])
    backend.append_logs([{"op_code": int(op.SET_TRIAL_PARAM), "worker_id": "w", "trial_id": 0}])
    assert synced == [] and len(list(JournalFileBackend(path).read_logs(0))) == 2  # written, readable, not fsynced
    backend.append_logs([{"op_code": int(op.SET_TRIAL_STATE_VALUES), "worker_id": "w", "trial_id": 0}])
    assert len(list(JournalFileBackend(path).read_logs(0))) == 3
    for _ in range(1000):  # (10 s at most: a loaded CI machine)
        if synced:
            break
        _time.sleep(0.01)
    assert synced == [("autoprune-journal-fsync", os.path.realpath(path))]  # the trial's end, by the thread

    synced.clear()
    spec = make_spec("cnn1d", name=_unique("fsync"), budget={"macs": 0.5},
                     search={"n_trials": 3, "storage": str(tmp_path / "s.journal"), "priors": "none"})
    api.search(spec, show_progress=False, test=False)
    mine = [who for who, p in synced if p == os.path.realpath(tmp_path / "s.journal")]
    assert mine and mine[-1] == threading.current_thread().name  # the search's own fsync, after its last trial


def test_a_failed_journal_append_keeps_the_trials_parameters_for_the_next_write(tmp_path):
    # the parameters a trial keeps in memory are dropped only once they are on file: an append that fails (a full
    # disk) leaves them for the next write, and the finished trial is still whole
    st = open_storage(str(tmp_path / "f.journal"))
    study = optuna.create_study(storage=st, study_name="f", sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    real, calls = st._backend.append_logs, []

    def failing_once(logs):
        calls.append(len(logs))
        if len(calls) == 1:
            raise OSError("No space left on device")
        return real(logs)

    st._backend.append_logs = failing_once
    with pytest.raises(OSError):
        trial.set_user_attr("record", 1)  # appends the kept parameter with this record: fails
    trial.set_user_attr("record", 2)
    study.tell(trial, 0.5)
    again = optuna.load_study(study_name="f", storage=open_storage(str(tmp_path / "f.journal"))).trials[0]
    assert again.params == trial.params and again.user_attrs["record"] == 2 and calls[:2] == [2, 2]
