"""Soak: several searches at once, the service SIGKILLed mid-run (with some of its workers, as in a crash) and
restarted on the same runs directory; every search finishes with all its trials, none run twice."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from test_service import SMALL, Service, _free_port

N_SEARCHES = 3
N_TRIALS = 40  # enough that the searches are still running when the service is killed (trials take ~50 ms)
BUDGET_S = 240  # the whole test, restart included
POLL_S = 0.2


def _searches(svc: Service) -> dict[str, dict]:
    r = svc.client.get("/searches")
    assert r.status_code == 200, r.text
    return {s["id"]: s for s in r.json()}


def _state(runs: Path, sid: str) -> dict:
    return json.loads((runs / ".service" / sid / "state.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(BUDGET_S + 60)
def test_service_killed_and_restarted_mid_run(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from autoprune.searching.studies import open_storage

    runs = tmp_path / "runs"
    runs.mkdir()
    t0 = time.monotonic()
    polls = 0
    names = [f"soak{i}" for i in range(N_SEARCHES)]
    env = {"OMP_NUM_THREADS": "1"}  # three workers on a small machine: no oversubscription
    svc = Service(runs, _free_port(), env=env)
    try:
        for i, name in enumerate(names):
            spec = {**SMALL, "name": name, "search": {"n_trials": N_TRIALS, "priors": "none", "seed": i}}
            r = svc.client.post("/searches", content=json.dumps(spec), headers={"Content-Type": "application/json"})
            assert r.status_code == 201, r.text
        # mid-run: two searches have finished trials (the third is training or searching too)
        while True:
            listed = _searches(svc)
            polls += 1
            complete = {n: listed[n]["progress"]["complete"] for n in names}
            if sorted(complete.values())[-2] >= 1:
                break
            assert all(listed[n]["status"] == "running" for n in names), listed
            assert time.monotonic() - t0 < BUDGET_S / 2, f"no trials finished in time: {listed}"
            time.sleep(POLL_S)
        pids = {n: _state(runs, n)["pid"] for n in names}
        # the crash: the service, and the workers of the first two searches, all SIGKILLed; the third worker
        # survives (workers run in their own session) and must be adopted, not started a second time
        svc.proc.kill()
        svc.proc.wait()
        running = sorted((n for n in names if listed[n]["status"] == "running"), key=lambda n: -complete[n])
        crashed, survivors = running[:2], running[2:]  # crash the two furthest on: their trials must be kept
        for n in crashed:
            try:
                os.killpg(pids[n], signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        svc.client.close()
        svc.log.close()
    assert len(crashed) == 2 and all(1 <= complete[n] < N_TRIALS for n in crashed), \
        f"the searches were not mid-run when the service was killed: {complete}"

    svc = Service(runs, _free_port(), env=env)
    try:
        for n in crashed:
            st = _state(runs, n)
            assert st["restarts"] == 1 and st["pid"] != pids[n], st
        for n in survivors:
            st = _state(runs, n)
            assert st["restarts"] == 0 and st["pid"] == pids[n], st  # adopted, not started a second time
        while True:
            listed = _searches(svc)
            polls += 1
            assert all(listed[n]["status"] in ("running", "done") for n in names), listed
            if all(listed[n]["status"] == "done" for n in names):
                break
            assert time.monotonic() - t0 < BUDGET_S, f"not done in {BUDGET_S} s: {listed}"
            time.sleep(POLL_S)
        for n in names:
            assert listed[n]["progress"]["complete"] == N_TRIALS, listed[n]
            result = svc.client.get(f"/searches/{n}").json()["result"]
            assert result["n_trials_complete"] == N_TRIALS
    finally:
        log = svc.stop()
    elapsed = time.monotonic() - t0
    assert elapsed < BUDGET_S, elapsed
    assert polls <= BUDGET_S / POLL_S + 10, polls  # bounded in requests as well as in time
    assert f"resumed {', '.join(sorted(crashed))})" in log, log[-2000:]

    # the storage: N_TRIALS completed trials per study, numbers unique, nothing left RUNNING; the killed ones'
    # in-flight trials are FAIL (marked on resume), not re-run under the same number
    for n in names:
        storage = open_storage(str(runs / n / "study.journal"))
        study = optuna.load_study(study_name=f"{n}:optuna", storage=storage)
        trials = study.get_trials(deepcopy=False)
        numbers = [t.number for t in trials]
        assert len(numbers) == len(set(numbers)), numbers
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(done) == N_TRIALS, (n, [(t.number, t.state.name) for t in trials])
        # nothing left RUNNING, except (crashed searches only) a trial the worker was killed inside study.ask,
        # before it claimed it: it has no worker yet, so a resume fails it only once it is older than
        # UNCLAIMED_STALE_S (another live worker could still be sampling it)
        orphans = [t for t in trials if t.state == TrialState.RUNNING]
        assert not orphans or (n in crashed and len(orphans) == 1 and "worker" not in orphans[0].user_attrs), orphans
        assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING}
        assert len(trials) <= N_TRIALS + (1 if n in crashed else 0), (n, len(trials))  # one trial in flight at most
