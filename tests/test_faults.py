"""Faults: failing evaluations, unprunable groups, killed processes, torn journal writes, parallel workers.

The kill -9 and 4-worker tests run real `autoprune search` subprocesses (marked slow); the rest run in process.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn as nn
import yaml
from optuna.trial import TrialState

from autoprune.app import api
from autoprune.app.cli import main
from autoprune.searching.objective import trial_attrs
from autoprune.searching.studies import STALE_LOCK_S, open_storage, study_name
from autoprune.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "AUTOPRUNE_PROGRESS": "0", "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


# ----------------------------------------------------------------- helpers
def _study(spec: dict, strategy: str = "optuna") -> optuna.Study:
    """The study as stored, read with plain Optuna (no repair: observing must not change the journal)."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    s = load_spec(spec)
    storage = JournalStorage(JournalFileBackend(str(s.run_dir / "study.journal")))
    return optuna.load_study(study_name=study_name(s, strategy), storage=storage)


def _snapshot(spec: dict) -> dict[int, tuple[str, tuple | None, dict]]:
    """trial number -> (state, values, params) as stored now (empty when no study exists yet)."""
    try:
        st = _study(spec)
    except Exception:  # noqa: BLE001 - no study yet (killed before its creation)
        return {}
    return {t.number: (t.state.name, tuple(t.values) if t.values else None, dict(t.params), "worker" in t.user_attrs)
            for t in st.trials}


def _spawn(spec_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoprune.app.cli", "search", str(spec_path), *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=spec_path.parent)


def _write(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec))
    return p


def _cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


class FlakyEvaluator:
    """Wraps the real evaluator; the n-th pruned-model evaluation raises, returns NaN/inf or runs out of memory."""

    def __init__(self, inner, faults: dict[int, str]) -> None:
        self.inner, self.faults, self.calls = inner, faults, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, model, split: str = "val"):
        self.calls += 1
        kind = self.faults.get(self.calls)
        if kind == "raise":
            raise RuntimeError("simulated evaluation crash")
        if kind == "memory":
            raise MemoryError("simulated: cannot allocate 64 GiB")
        value = self.inner(model, split)
        return {"nan": float("nan"), "inf": float("inf")}.get(kind, value)

    def with_loss(self, model, split: str = "val"):  # search.score: loss (the default for a classifier)
        value = self(model, split)
        return value, -value


# ----------------------------------------------------------------- failing trials
@pytest.mark.parametrize("score", ["metric", "loss"])
def test_failed_evaluations_are_recorded_and_the_study_goes_on(make_spec, capsys, score):
    spec = make_spec("cnn1d", search={"n_trials": 6, "priors": "none", "score": score})
    s = api.session(spec, show_progress=False)
    s.__dict__["evaluator"] = FlakyEvaluator(s.evaluator, {2: "raise", 3: "nan", 5: "memory", 6: "inf"})
    result = api.search(s, show_progress=False, test=False)
    assert result["n_trials_complete"] == 6
    assert result["n_trials_failed"] == 4
    reasons = sorted(f["reason"] for f in result["failures"])
    assert any("RuntimeError: simulated evaluation crash" in r for r in reasons), reasons
    assert any("metric is nan" in r for r in reasons), reasons
    assert any("metric is inf" in r for r in reasons), reasons
    assert any("out of memory during evaluation" in r for r in reasons), reasons
    st = _study(spec)
    fails = [t for t in st.trials if t.state == TrialState.FAIL]
    assert len(fails) == 4 and all("plan" in trial_attrs(t) and trial_attrs(t)["fail_reason"] for t in fails)
    assert result["best"] is not None and result["best"]["macs_ratio"] <= 0.5 + 1e-9

    assert _cli(["report", str(s.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "failed trials:" in out and "simulated evaluation crash" in out and "out of memory" in out
    assert out.count("optuna #") == 4


def test_every_trial_failing_stops_with_a_clear_message(make_spec):
    spec = make_spec("cnn1d", search={"n_trials": 2, "priors": "none"})
    s = api.session(spec, show_progress=False)
    s.__dict__["evaluator"] = FlakyEvaluator(s.evaluator, {i: "raise" for i in range(1, 100)})
    from autoprune.errors import AutopruneError

    with pytest.raises(AutopruneError, match=r"every trial failed; reasons: \['RuntimeError: simulated evaluation crash'\]"):
        api.search(s, show_progress=False, test=False)
    assert len(_study(spec).trials) == 6  # bounded: 3 x n_trials attempts, not an endless loop


# ----------------------------------------------------------------- a group Torch-Pruning cannot handle
class HalfBroken(nn.Module):
    """conv1's channels prune fine; conv2's output is scaled by a raw tensor Torch-Pruning does not track."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 16, 3, padding=1)
        self.scale = torch.linspace(0.5, 1.5, 16).view(1, 16, 1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.fc((self.conv2(y) * self.scale).mean(-1))


def half_broken():
    return HalfBroken()


def test_unprunable_group_is_named_and_the_search_uses_the_others(make_spec, capsys):
    spec = make_spec("cnn1d", budget={"macs": 0.7}, search={"n_trials": 4, "priors": "none"})
    spec["model"] = {"factory": "test_faults:half_broken", "input_shape": [1, 40]}
    spec["data"] = {"factory": "test_bad_input:tiny_data", "batch_size": 32}
    spec["train"] = {"epochs": 1, "lr": 0.01}
    s = api.session(spec, show_progress=False)
    assert s.pruner.prunable_names == ["conv1"]
    bad = {g.name: g for g in s.pruner.groups}["conv2"]
    assert not bad.prunable and bad.reason.startswith("pruning fails: RuntimeError")
    result = api.search(s, show_progress=False, test=False)
    assert result["n_trials_complete"] == 4
    assert set(result["best"]["plan"]["ratios"]) == {"conv1"}
    assert result["best"]["macs_ratio"] <= 0.7 + 1e-9

    spec_path = s.run_dir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    assert _cli(["groups", str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert "conv2" in out and "pruning fails" in out and "1 of 2 groups prunable" in out


# ----------------------------------------------------------------- torn journal writes and stale locks
def test_torn_journal_write_and_stale_lock_do_not_wedge_the_next_run(make_spec, tmp_path):
    spec = make_spec("cnn1d", search={"n_trials": 3, "priors": "none"})
    api.session(spec, show_progress=False).target  # train (cached) before timing anything
    proc = _spawn(_write(tmp_path, spec))
    assert proc.wait(timeout=240) == 0, proc.stderr.read()
    journal = load_spec(spec).run_dir / "study.journal"
    data = journal.read_bytes()
    assert data.endswith(b"\n")
    # what kill -9 in the middle of a journal write leaves: half a record and the lock symlink
    journal.write_bytes(data[:-7])  # the last record loses its end and its newline
    lock = Path(str(journal) + ".lock")
    os.symlink(journal, lock)
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old), follow_symlinks=False)

    t0 = time.perf_counter()
    st = open_storage(str(journal))  # repairs: stale lock removed, half record cut
    assert time.perf_counter() - t0 < 5  # optuna alone would wait its 30 s grace period
    assert not lock.exists() and journal.read_bytes().endswith(b"\n")
    before = {t.number: t.state for t in optuna.load_study(study_name=study_name(load_spec(spec), "optuna"), storage=st).trials}
    result = api.search(spec, n_trials=5, show_progress=False, test=False)
    after = _snapshot(spec)
    assert result["n_trials_complete"] == 5
    assert all(after[n][0] == "COMPLETE" for n, s in before.items() if s == TrialState.COMPLETE)
    assert not any(v[0] == "RUNNING" for v in after.values())
    # appending after the repair left a journal that replays cleanly
    assert len(optuna.load_study(study_name=study_name(load_spec(spec), "optuna"),
                                 storage=open_storage(str(journal))).trials) == len(after)


# ----------------------------------------------------------------- kill -9
@pytest.mark.slow
def test_kill_9_at_random_points_loses_no_trial(make_spec, tmp_path):
    """Kill a real search by its pid during sensitivity analysis and during trials; rerun the same command."""
    n_trials = 14
    # unique sensitivity ratios: the analysis is not in the shared cache yet, so the first kill can land in it
    spec = make_spec("cnn1d", search={"n_trials": n_trials}, evaluation={"calibration_batches": 4, "finetune_steps": 2},
                     sensitivity={"ratios": [0.15, 0.35, 0.55, 0.75]})
    s = api.session(spec, show_progress=False)
    s.target  # train once (cached), so the subprocesses only load it
    path = _write(tmp_path, spec)
    journal = s.run_dir / "study.journal"
    sens_cache = s.cache_dir / "sensitivity"
    rng = random.Random(7)
    kills: list[str] = []
    seen: dict[int, tuple] = {}

    # 1) during sensitivity analysis: the journal is open but the study not yet created, no cached table yet
    proc = _spawn(path)
    deadline = time.time() + 120
    while not journal.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.2, 0.8))
    in_sens = journal.exists() and journal.stat().st_size == 0 and not list(sens_cache.glob("*.csv"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if in_sens:
        kills.append("sensitivity")

    # 2) during trials, at random progress points
    for target in sorted(rng.sample(range(2, n_trials - 2), 3)):
        proc = _spawn(path)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            snap = _snapshot(spec)
            if sum(v[0] == "COMPLETE" for v in snap.values()) >= target:
                break
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        snap = _snapshot(spec)
        kills.append("trial" if any(v[0] == "RUNNING" for v in snap.values()) else "between trials")
        for n, v in seen.items():  # every finished trial is still there, unchanged
            if v[0] == "COMPLETE":
                assert snap[n] == v
        seen = snap

    # a trial is claimed (its "worker" attribute) the moment Optuna creates it; one killed inside that window of a
    # few storage writes stays RUNNING until it is UNCLAIMED_STALE_S old, and is never counted as finished
    running_at_kill = {n for n, v in seen.items() if v[0] == "RUNNING" and v[3]}
    unclaimed_at_kill = {n for n, v in seen.items() if v[0] == "RUNNING" and not v[3]}
    # 3) rerun the same command to completion
    proc = _spawn(path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    final = _snapshot(spec)
    complete = [n for n, v in final.items() if v[0] == "COMPLETE"]
    assert len(complete) == n_trials
    assert all(final[n] == v for n, v in seen.items() if v[0] == "COMPLETE")
    assert {n: final[n][0] for n in running_at_kill} == {n: "FAIL" for n in running_at_kill}
    assert all(final[n][0] in ("FAIL", "RUNNING") for n in unclaimed_at_kill)
    st = _study(spec)
    assert all(trial_attrs(t)["fail_reason"] == "interrupted: its worker process died" for t in st.trials
               if t.number in running_at_kill)
    assert sorted(final) == list(range(len(final)))  # trial numbers: no gap, no duplicate
    assert "trial" in kills, kills  # at least one kill landed inside a running trial

    # sensitivity computed by an earlier run is reused, not recomputed
    result = json.loads((s.run_dir / "result.json").read_text())
    proc = _spawn(path, "--n-trials", str(n_trials + 1))
    assert proc.wait(timeout=300) == 0
    again = json.loads((s.run_dir / "result.json").read_text())
    assert again["sensitivity_evaluations"] == 0 and again["n_trials_complete"] == n_trials + 1
    assert result["n_trials_failed"] >= len(running_at_kill)
    print(f"kills: {kills}; trials lost: 0; interrupted->FAIL: {sorted(running_at_kill)}")


# ----------------------------------------------------------------- parallel workers
@pytest.mark.slow
def test_four_search_processes_on_one_journal(make_spec, tmp_path):
    n_trials = 16
    spec = make_spec("cnn1d", search={"n_trials": n_trials, "priors": "none"})
    api.session(spec, show_progress=False).target  # train once before the workers start
    path = _write(tmp_path, spec)
    procs = [_spawn(path) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err
    st = _study(spec)
    trials = st.trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost, none duplicated
    assert n_trials <= len(complete) <= n_trials + 3  # each worker may finish the trial it was running
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert [trial_attrs(t).get("warm_start") for t in trials].count("uniform") == 1  # enqueued and run once
    points = [tuple(round(v, 9) for v in t.params.values()) for t in complete]
    assert len(set(points)) == len(points), "two workers sampled the same point (same sampler seed)"
    assert len({trial_attrs(t)["worker"] for t in trials}) >= 2
