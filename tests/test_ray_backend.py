"""The Ray Tune backend: same study, budgets met, constraints passed through to Optuna, sensitivity fan-out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from optuna.trial import TrialState

from autoprune.app import api
from autoprune.results.tables import load
from autoprune.searching.objective import trial_attrs
from autoprune.spec import load_spec
from conftest import stored_study

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("ray_runtime")


def test_ray_search_meets_budget_and_lands_in_the_optuna_storage(make_spec, monkeypatch):
    from autoprune.searching import ray_backend

    fanned: list[int] = []
    real_map = ray_backend.ray_map

    def spy(fn, items, **kw):  # sensitivity goes through ray_map: one Ray task per group
        items = list(items)
        fanned.append(len(items))
        return real_map(fn, items, **kw)

    monkeypatch.setattr(ray_backend, "ray_map", spy)
    # sensitivity ratios of its own: the session-wide cache must not serve this table, so the fan-out really runs
    spec = make_spec("cnn1d", budget={"macs": 0.5}, sensitivity={"ratios": [0.3, 0.6, 0.8]},
                     search={"backend": "ray", "n_trials": 6, "max_concurrent_trials": 2, "cpus_per_trial": 1})
    result = api.search(spec, show_progress=False)
    assert result["n_trials_complete"] == 6
    assert result["best"]["macs_ratio"] <= 0.5
    assert result["best"]["measured_cost"] <= result["budget"]["limit"]
    assert 0.1 < result["best"]["metric_val"] <= 1.0
    assert result["sensitivity_evaluations"] > 1
    assert fanned == [len(result["search_bounds"])] and fanned[0] >= 3  # one task per group
    assert any("ray backend" in n for n in result["notes"])

    study = stored_study(spec)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 6
    for t in done:  # what Tune alone would have dropped: the plan, its costs and the budget constraint
        assert {"plan", "macs_ratio", "feasible", "cost"} <= set(trial_attrs(t))
        assert trial_attrs(t)["macs_ratio"] <= 0.5 + 1e-9  # projection mode: every trial is on budget
        assert t.constraints["budget"] <= 1e-9
        assert trial_attrs(t)["worker"].endswith(f":{os.getpid()}")  # the driver owns the Optuna trial
        ran = trial_attrs(t)["ray_worker"]  # the Ray worker that ran it
        assert ran["pid"] != os.getpid() and ran["node_id"] == ray.get_runtime_context().get_node_id()
    labels = sorted(trial_attrs(t).get("warm_start") or "" for t in done)
    assert labels[-4:] == ["global", "lamp", "sensitivity-greedy", "uniform"]  # went in as points_to_evaluate
    # report/load read a Ray run like a local one
    runs = load(load_spec(spec).run_dir)
    assert (runs.trials.state == "COMPLETE").sum() == 6

    # resume: asking for 8 runs only the 2 missing trials, and the warm starts are not enqueued twice
    result = api.search(spec, n_trials=8, show_progress=False)
    study = stored_study(spec)
    assert result["n_trials_complete"] == 8 == len(study.get_trials(states=(TrialState.COMPLETE,)))
    assert sum(bool(trial_attrs(t).get("warm_start")) for t in study.trials) == 4


def test_constraint_reaches_optuna_and_infeasible_trials_stay_off_the_front(make_spec):
    spec = make_spec("cnn1d", budget={"macs": 0.3},
                     search={"backend": "ray", "n_trials": 10, "max_concurrent_trials": 2, "priors": "none",
                             "objectives": ["accuracy", "macs"], "budget_mode": "constraint", "sampler": "random"})
    result = api.search(spec, show_progress=False)
    assert result["budget_mode"] == "constraint"
    study = stored_study(spec)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 10
    over = [t for t in done if trial_attrs(t)["macs_ratio"] > 0.3 + 1e-9]
    assert over, "a random sampler in constraint mode at 30% MACs proposes some infeasible plans"
    for t in done:  # the constraint Optuna stored is the trial's real overshoot
        assert t.constraints["budget"] == pytest.approx(trial_attrs(t)["cost"] / result["budget"]["limit"] - 1)
        assert (t.constraints["budget"] > 1e-9) == (trial_attrs(t)["macs_ratio"] > 0.3 + 1e-9)
    # Optuna's own front (which honours constraints) and ours both exclude every infeasible trial
    front = {t.number for t in study.best_trials}
    assert front and not front & {t.number for t in over}
    assert result["pareto"] and all(p["macs_ratio"] <= 0.3 + 1e-9 for p in result["pareto"])
    assert {p["trial"] for p in result["pareto"]}.isdisjoint({t.number for t in over})
    if result["best"]:
        assert result["best"]["macs_ratio"] <= 0.3 + 1e-9


def test_ray_map_fans_out_in_order_on_other_processes():
    from autoprune.searching.ray_backend import ray_map

    out = ray_map(lambda x: (x * x, os.getpid()), range(6), num_cpus=1)
    assert [v for v, _ in out] == [0, 1, 4, 9, 16, 25]
    assert os.getpid() not in {pid for _, pid in out}


def test_failed_evaluations_are_recorded_as_failed_trials_with_their_reason(make_spec, tmp_path):
    from autoprune.app.session import Session

    spec = make_spec("cnn1d", budget={"macs": 0.5},
                     search={"backend": "ray", "n_trials": 2, "priors": "none", "max_concurrent_trials": 2})
    s = Session(spec, show_progress=False)
    real = s.evaluator
    s.cost_model  # built with the real evaluator's calibration batches
    marker = str(tmp_path / "failed-once")

    class Flaky:  # the first call in any actor fails (an O_EXCL marker file), every later one scores normally
        def __call__(self, model, split="val"):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return real(model, split)
            raise RuntimeError("planted failure")

        def __getattr__(self, name):
            return getattr(real, name)

    s.__dict__["evaluator"] = Flaky()
    result = api.search(s, show_progress=False)
    study = stored_study(spec)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert result["n_trials_complete"] == 2
    assert len(failed) == 1 and all("planted failure" in trial_attrs(t)["fail_reason"] for t in failed)
    assert all(trial_attrs(t)["fail_reason"].startswith("RuntimeError: planted failure (on node ") for t in failed)
    assert all("plan" in trial_attrs(t) for t in failed)


def test_score_loss_reaches_tune_and_the_study(make_spec):
    spec = make_spec("cnn1d", budget={"macs": 0.5},
                     search={"backend": "ray", "n_trials": 3, "priors": "none", "score": "loss"})
    result = api.search(spec, show_progress=False, test=False)
    study = stored_study(spec)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 3 and study.user_attrs["score"] == "loss"
    for t in done:  # what the searcher told Optuna: minus the loss; the record keeps the accuracy
        assert t.values[0] == pytest.approx(-trial_attrs(t)["val_loss"]) and 0 <= trial_attrs(t)["metric"] <= 1
    best = max(done, key=lambda t: t.values[0])
    assert result["best"]["trial"] == best.number and result["best"]["metric"] == trial_attrs(best)["metric"]


def test_a_centred_search_reaches_tune_as_multipliers_around_lamp(make_spec):
    spec = make_spec("cnn1d", budget={"macs": 0.3},
                     search={"backend": "ray", "n_trials": 5, "priors": "none", "centre": "lamp"})
    result = api.search(spec, show_progress=False, test=False)
    study = stored_study(spec)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 5 and study.user_attrs["centre"] == "lamp" and result["search_centre"] == "lamp"
    for t in done:  # Tune's searcher proposed in the centred space, and every plan was projected onto the budget
        assert t.params and all(-1.0 <= v <= 1.0 for v in t.params.values())
        assert trial_attrs(t)["feasible"] and trial_attrs(t)["macs_ratio"] <= 0.3 + 1e-9
    lamp = [t for t in done if trial_attrs(t).get("warm_start") == "lamp"]
    assert lamp and all(abs(v) < 1e-9 for v in lamp[0].params.values())  # LAMP's shape is the centre

# ------------------------------------------------------------------ code to the workers, failures that say why
USER_MODULE = """
import torch.nn as nn


class TinyNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, num_classes)  # two prunable groups: sensitivity fans out as two Ray tasks

    def forward(self, x):
        return self.head(self.conv(x))


def make():
    return TinyNet()
"""


@pytest.fixture
def driver_only_module(tmp_path, monkeypatch):
    """A user's model module on this process's sys.path only: the running Ray workers cannot import it."""
    import sys
    import time

    name = f"apr_driver_only_{os.getpid()}_{time.time_ns() % 10**9}"
    d = tmp_path / "usercode"
    d.mkdir()
    (d / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(d))
    yield name, d / f"{name}.py"
    sys.modules.pop(name, None)


def test_runtime_env_ships_local_modules_on_a_cluster_and_the_users_keys_win(make_spec, driver_only_module):
    import importlib

    import cloudpickle

    from autoprune.searching.ray_backend import code_modules, pickled_modules, runtime_env_for

    name, path = driver_only_module
    spec = make_spec("digits_cnn")
    spec["model"] = {"factory": f"{name}:make", "input_shape": [1, 8, 8]}
    assert runtime_env_for(load_spec(spec)) is None  # local Ray: nothing to ship
    spec["search"]["ray_address"] = "127.0.0.1:6379"
    env = runtime_env_for(load_spec(spec))
    mods = env["py_modules"]
    assert str(path.resolve()) in mods  # a single-file module on the driver's path only
    assert not any("site-packages" in m for m in mods)  # torch, optuna, ... are installed on the nodes
    import autoprune
    shipped_autoprune = str(Path(autoprune.__file__).parent.resolve()) in mods
    assert shipped_autoprune == ("site-packages" not in autoprune.__file__)  # a checkout is shipped, a wheel not
    # the user's runtime_env wins on conflicts: py_modules [] turns shipping off, other keys pass through
    spec["search"]["ray_runtime_env"] = {"py_modules": [], "env_vars": {"OMP_NUM_THREADS": "1"}}
    assert runtime_env_for(load_spec(spec)) == {"env_vars": {"OMP_NUM_THREADS": "1"}}
    spec["search"]["ray_runtime_env"] = {"working_dir": "."}
    assert runtime_env_for(load_spec(spec)) == {"py_modules": mods, "working_dir": "."}

    # a model whose class lives in another local module than the factory's: found through the pickle
    model = importlib.import_module(name).make()
    assert name in {m.split(".")[0] for m in pickled_modules(cloudpickle.dumps(model))}
    spec["model"]["factory"] = "autoprune.model.zoo:digits_cnn"
    assert str(path.resolve()) in code_modules(load_spec(spec), [model])
    assert str(path.resolve()) not in code_modules(load_spec(spec))


def test_describe_error_and_fast_fail_bookkeeping():
    from autoprune.searching.ray_backend import FailWatch, describe_error

    text = ("Failure # 1\nray::ImplicitFunc.__init__() (pid=1, ip=10.0.0.2)\n  File \"x.py\", line 3\n"
            "ModuleNotFoundError: No module named 'mymod'\n")
    assert describe_error(None, text) == ("ModuleNotFoundError: No module named 'mymod'",
                                          {"node_ip": "10.0.0.2", "node_id": "", "pid": 1})
    assert describe_error(RuntimeError("boom\nmore"))[0] == "RuntimeError: boom more"

    w = FailWatch(3)
    w.note("E: x", "E: x (on node a, pid 1)")
    w.note("E: x", "E: x (on node b, pid 2)")
    assert w.reason is None
    w.note("E: x", "E: x (on node a, pid 1)")
    assert w.reason == "E: x (on node a, pid 1)" and "first 3 trials all failed" in w.message()
    for outcomes in (["E: x", None, "E: x"], ["E: x", "E: y", "E: x"], [None, "E: x", "E: x", "E: x"]):
        w = FailWatch(3)
        for o in outcomes:
            w.note(o)
        assert w.reason is None, outcomes  # a success or two different errors among the first three: go on


@pytest.mark.parametrize("priors", ["none", "sensitivity"])
def test_a_module_the_workers_cannot_import_stops_the_search_at_once_with_exit_2(make_spec, driver_only_module,
                                                                                 tmp_path, capsys, priors):
    import time

    import yaml

    from autoprune.app.cli import main

    name, _ = driver_only_module
    spec = make_spec("digits_cnn", train={"epochs": 1},
                     search={"backend": "ray", "n_trials": 6, "max_concurrent_trials": 2, "priors": priors})
    spec["model"] = {"factory": f"{name}:make", "input_shape": [1, 8, 8]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(["search", str(path)])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert f"ModuleNotFoundError: No module named '{name}'" in err and "ray_runtime_env" in err
    assert "on node" in err and "pid" in err
    assert elapsed < 60, elapsed
    if priors == "none":  # the trials failed: three of them, recorded with their reason, then the search stopped
        assert "first 3 trials all failed with the same error" in err
        study = stored_study(spec)
        failed = study.get_trials(states=(TrialState.FAIL,))
        assert 3 <= len(failed) <= 4 and not study.get_trials(states=(TrialState.COMPLETE,))
        for t in failed:
            assert f"No module named '{name}'" in t.user_attrs["fail_reason"]
            assert t.user_attrs["ray_worker"]["pid"] != os.getpid()
    else:  # the sensitivity tasks fail first, with the same clear message
        assert "a Ray task failed" in err


def test_ray_search_starts_no_trial_after_its_timeout(make_spec):
    # search.timeout_s on Ray: the searcher answers FINISHED once the limit has passed, after its first trial, so
    # Tune starts nothing more and the loop that tops up missing trials stops too
    spec = make_spec("cnn1d", budget={"macs": 0.5},
                     search={"backend": "ray", "n_trials": 20, "max_concurrent_trials": 1, "priors": "none",
                             "timeout_s": 1e-3})
    result = api.search(spec, show_progress=False)
    assert result["n_trials_complete"] == 1
    assert any("stopped the search after 1 of 20 trials" in n for n in result["notes"]), result["notes"]
    states = [t.state.name for t in stored_study(spec).trials]
    assert states.count("COMPLETE") == 1 and set(states) <= {"COMPLETE", "WAITING"}, states  # none left running
