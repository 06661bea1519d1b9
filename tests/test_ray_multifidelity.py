"""Multi-fidelity on the Ray backend: Tune's ASHA stops trials at the recovery rungs, and the Optuna storage
records them exactly as the optuna backend's successive halving does (PRUNED with plan, costs, rung_metrics)."""

from __future__ import annotations

import os

import pytest
from optuna.trial import TrialState

from autoprune.app import api
from autoprune.errors import AutopruneError
from autoprune.searching.objective import trial_attrs
from autoprune.spec import load_spec
from conftest import stored_study

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("ray_runtime")


def test_recovery_rungs_are_accepted_on_ray_but_still_need_one_objective(make_spec):
    spec = load_spec(make_spec("cnn1d", search={"backend": "ray", "recovery_rungs": [5, 20]}))
    assert spec.search.recovery_rungs == [5, 20] and spec.search.backend == "ray"
    with pytest.raises(AutopruneError, match="needs one objective"):
        load_spec(make_spec("cnn1d", search={"backend": "ray", "recovery_rungs": [5],
                                             "objectives": ["accuracy", "macs"]}))


@pytest.mark.slow
def test_asha_stops_trials_at_the_rungs_and_the_storage_records_them_like_the_optuna_backend(make_spec):
    # 9 trials, rungs of 5 and 20 fine-tune steps, reduction 3: ASHA (rungs at recovery_step 1, 3, 9) stops
    # trials whose rung value falls below the best third of that rung so far; the rest recover to the end
    spec = make_spec("cnn1d", budget={"macs": 0.4},
                     search={"backend": "ray", "n_trials": 9, "priors": "none", "recovery_rungs": [5, 20],
                             "rung_reduction": 3, "max_concurrent_trials": 2, "cpus_per_trial": 1})
    result = api.search(spec, show_progress=False)
    study = stored_study(spec)
    trials = study.trials
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 9, [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    assert not [t for t in trials if t.state == TrialState.FAIL]
    pruned = [t for t in done if t.state == TrialState.PRUNED]
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert pruned and complete

    for t in done:  # every trial keeps its plan, costs, constraint and the metric of each rung it reached
        a = trial_attrs(t)
        rm = a["rung_metrics"]
        assert a["plan"] and a["macs_ratio"] <= 0.4 + 1e-9 and t.constraints["budget"] <= 1e-9
        assert 1 <= len(rm) <= 3 and all(0.0 <= m <= 1.0 for m in rm)
        # the intermediate values sit at the optuna backend's steps (reduction**k), one per rung reached
        assert sorted(t.intermediate_values) == [1, 3, 9][:len(rm)]
        assert [t.intermediate_values[s] for s in sorted(t.intermediate_values)] == rm
        assert a["metric"] == rm[-1]  # the record follows the last rung reached
        assert a["ray_worker"]["pid"] != os.getpid()
    for t in complete:  # reached the last rung; the value is the metric after 20 recovery steps
        rm = trial_attrs(t)["rung_metrics"]
        assert len(rm) == 3 and t.value == rm[-1]
    # stopped trials have fewer rungs than every completed one; the recovery changed the metric
    assert max(len(trial_attrs(t)["rung_metrics"]) for t in pruned) < 3
    assert any(trial_attrs(t)["rung_metrics"][-1] != trial_attrs(t)["rung_metrics"][0] for t in complete)
    # distinct seeds per trial: the Optuna trial number reached the worker (not every trial the same number)
    assert len({t.number for t in done}) == 9

    # the results stage reads it like a local multi-fidelity run
    assert (result["n_trials_complete"], result["n_trials_pruned"]) == (len(complete), len(pruned))
    assert result["best"]["trial"] in {t.number for t in complete}
    assert result["best"]["macs_ratio"] <= 0.4 + 1e-9
    assert result["best"]["measured_cost"] <= result["budget"]["limit"]
    assert result["best"]["metric_val"] == max(t.value for t in complete)  # every trial here is on budget
    assert any("ASHA" in n for n in result["notes"])

    # resuming with the same n_trials runs nothing: stopped trials count as done, like the local loop
    api.search(spec, show_progress=False)
    assert len(stored_study(spec).trials) == len(trials)


@pytest.mark.slow
def test_a_trial_failing_in_a_rung_is_failed_with_its_reason_and_the_search_goes_on(make_spec, tmp_path):
    from autoprune.app.session import Session

    spec = make_spec("cnn1d", budget={"macs": 0.5},
                     search={"backend": "ray", "n_trials": 3, "priors": "none", "recovery_rungs": [5],
                             "max_concurrent_trials": 1})
    s = Session(spec, show_progress=False)
    real = s.evaluator
    s.cost_model  # built with the real evaluator's calibration batches
    marker = str(tmp_path / "diverged-once")

    class DivergesOnce:  # the first score after a rung's fine-tune (in any actor) is NaN, later ones are real
        def score(self, model, split="val"):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return real.score(model, split)
            return float("nan")

        def __call__(self, model, split="val"):
            return real(model, split)

        def __getattr__(self, name):
            return getattr(real, name)

    s.__dict__["evaluator"] = DivergesOnce()
    result = api.search(s, show_progress=False)
    study = stored_study(spec)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].number == 0  # the first trial to climb a rung (max 1 at a time)
    a = trial_attrs(failed[0])
    assert a["fail_reason"].startswith("TrialFailed: metric after 5 recovery steps is nan (on node ")
    assert a["plan"] and a["rung_metrics"] == [failed[0].intermediate_values[1]]  # what it reached before
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(done) == 3 and result["n_trials_complete"] + result["n_trials_pruned"] == 3
