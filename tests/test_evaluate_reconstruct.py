"""`evaluation.reconstruct: true`: candidates are refit by least squares before BN recalibration, on every path that
evaluates them (the evaluator itself, the search objective, the sensitivity sweep), and sensitivity tables with and
without reconstruction are cached apart."""

from __future__ import annotations

import copy

import pytest
import torch

from autoprune.app import api
from autoprune.searching.objective import evaluate_plan
from autoprune.searching.space import Budget, SearchSpace
from autoprune.sensitivity.sweep import _key, run_sensitivity


@pytest.fixture
def sessions(make_spec):
    """The same cnn1d (one trained checkpoint) with reconstruction off and on.

    One torch thread while these tests run: on the shared 2-core machines two intra-op threads competing with other
    processes made this file take 104 s instead of 7 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = make_spec("cnn1d")
    off = api.session(spec, show_progress=False)
    on_spec = copy.deepcopy(spec)
    on_spec["name"] += "-rec"
    on_spec["evaluation"]["reconstruct"] = True
    on = api.session(on_spec, show_progress=False)
    yield off, on
    torch.set_num_threads(threads)


def test_reconstruction_changes_the_proxy_and_every_path_uses_it(sessions):
    off, on = sessions
    assert not off.evaluator.reconstruct and on.evaluator.reconstruct
    pm = on.pruner
    assert on.evaluator.pruner is pm  # the session hands its pruner to the evaluator
    plan = pm.plan({n: 0.5 for n in pm.prunable_names})

    val_off = off.evaluator(off.pruner.apply(plan))
    val_on = on.evaluator(pm.apply(plan))  # the plan comes from the tag PrunableModel.apply puts on the model
    # measured (torch 2.13 CPU, seed 0): 0.398 without, 0.890 with reconstruction; the margin is noise room
    assert val_on != val_off
    assert val_on >= val_off - 0.02, (val_on, val_off)
    assert val_on > val_off + 0.2, (val_on, val_off)

    # the unpruned layers' outputs were captured once and are reused, for the same result
    kept = on.evaluator._base_outputs
    assert kept is not None and kept._outs and kept._refs[0] is pm.base
    before = dict(kept._outs)
    # the explicit API and the search objective's path give the same number
    assert on.evaluator.evaluate_plan(pm, plan) == pytest.approx(val_on, abs=1e-6)
    assert all(kept._outs[n] is t for n, t in before.items())
    space = SearchSpace.build(pm, Budget.from_spec(on.spec, pm, on.cost_model), None, 0.05)
    assert evaluate_plan(space, on.evaluator, on.cost_model, plan).metric == pytest.approx(val_on, abs=1e-6)

    # a model that does not carry a plan of this pruner is only recalibrated, not refit
    untagged = pm.apply(plan)
    del untagged._autoprune_plan
    assert on.evaluator(untagged) == pytest.approx(val_off, abs=1e-6)


def test_sensitivity_tables_with_and_without_reconstruction_never_mix(sessions, tmp_path):
    off, on = sessions
    ratios, stop = [0.5], 0.5
    assert _key(off.pruner, off.evaluator, ratios, stop, None) != _key(on.pruner, on.evaluator, ratios, stop, None)
    cache = tmp_path / "sensitivity"
    res_off = run_sensitivity(off.pruner, off.evaluator, off.cost_model, ratios=ratios, stop_drop=stop,
                              cache_dir=cache, show_progress=False)
    res_on = run_sensitivity(on.pruner, on.evaluator, on.cost_model, ratios=ratios, stop_drop=stop,
                             cache_dir=cache, show_progress=False)
    assert res_off.cache_path != res_on.cache_path
    assert res_on.evaluations > 0  # not served from the table computed without reconstruction
    assert res_on.baseline_metric == pytest.approx(res_off.baseline_metric)  # nothing to refit when nothing is pruned
    # the sweep itself reconstructs: pruning one group at 50 % loses less (or as much) with the refit
    assert (res_on.table.metric.to_numpy() >= res_off.table.metric.to_numpy() - 0.02).all()
    assert (res_on.table.metric.to_numpy() != res_off.table.metric.to_numpy()).any()
