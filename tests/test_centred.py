"""A search centred on a reference plan (search.centre): proposals are multiples of LAMP's (or uniform's) kept
widths, projected onto the budget by one common scale."""

from __future__ import annotations

import math
import random

import pytest
import torch
from optuna.trial import TrialState

from autoprune.app.session import Session
from autoprune.costs.budgets import Budget
from autoprune.costs.counting import CostModel, count_macs
from autoprune.errors import AutopruneError
from autoprune.model.zoo import ZOO
from autoprune.pruning.groups import PrunableModel
from autoprune.pruning.plan import channels_kept
from autoprune.searching import strategies
from autoprune.searching.objective import trial_attrs
from autoprune.searching.space import SearchSpace
from autoprune.searching.studies import build_space, resolve_centre
from autoprune.searching.study import run_search
from autoprune.spec import load_spec

SHAPES = {"resnet1d": [1, 40], "resnet20": [1, 8, 8], "mobilenetv2": [1, 8, 8]}


def _space(name: str, frac: float) -> tuple[PrunableModel, Budget, SearchSpace, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(1, *SHAPES[name])
    pm = PrunableModel(ZOO[name](), x)
    cm = CostModel(pm)
    b = Budget("macs", frac, frac * cm.base_macs, cm.base_macs, lambda p: cm.estimate(p)[0], lambda m: count_macs(m, x))
    space = SearchSpace.build(pm, b, None, 0.05)
    lamp = strategies.ranked_plan(space, "lamp")
    space.centre = {n: max(1.0 - lamp.ratios.get(n, 0.0), 1e-3) for n in space.dims}
    space.centre_name = "lamp"
    return pm, b, space, x


@pytest.mark.parametrize("name", list(SHAPES))
def test_centred_projection_meets_the_budget_and_keeps_the_proposed_shape(name):
    pm, b, space, x = _space(name, 0.3)
    assert space.param_range(space.dims[0]) == (-1.0, 1.0)
    rng = random.Random(0)
    for k in range(6):
        u = {n: 0.0 for n in space.dims} if k == 0 else {n: rng.uniform(-1, 1) for n in space.dims}
        plan, ok = space.project_centred(u)
        assert ok
        est = b.estimate(plan)
        assert count_macs(pm.apply(plan, check=False), x) == est <= b.limit
        assert est >= 0.97 * b.limit, (name, est / b.limit)  # the common scale, then the top-up, use the budget
        # the shape: two groups strictly inside their range keep widths in the proposed proportion (whole
        # channels, and the top-up's last channels, aside)
        kept = {n: 1.0 - plan.ratios.get(n, 0.0) for n in space.dims}
        inside = [n for n in space.dims if 1.0 - space.bounds[n] + 0.05 < kept[n] < 0.95 and pm.group(n).channels >= 32]
        for a, c in zip(inside, inside[1:]):
            want = space.centre[a] * space.span ** u[a] / (space.centre[c] * space.span ** u[c])
            got = kept[a] / kept[c]
            slack = 1 / pm.group(a).channels + 1 / pm.group(c).channels + 0.1
            assert abs(math.log(got / want)) < slack * 4, (name, a, c, got, want)


def test_the_centre_itself_is_proposal_zero_and_a_plan_maps_back_to_its_shape():
    pm, b, space, _ = _space("resnet20", 0.3)
    lamp = strategies.ranked_plan(space, "lamp")
    assert space.point(lamp) == pytest.approx({n: 0.0 for n in space.dims}, abs=1e-9)
    # a plan twice as wide as LAMP's in one group (relative to the rest) reads as +1 there, 0 elsewhere
    g = next(n for n in space.dims if space.centre[n] <= 0.45)
    ratios = {**lamp.ratios, g: 1.0 - 2 * space.centre[g]}
    pt = space.point(pm.plan(ratios))
    assert pt[g] == pytest.approx(1.0, abs=0.05)
    assert all(abs(v) < 1e-9 for n, v in pt.items() if n != g)


def test_a_centred_search_proposes_multipliers_meets_the_budget_and_refuses_another_centre_on_resume(make_spec):
    spec = make_spec("cnn1d", budget={"macs": 0.3}, search={"n_trials": 8, "priors": "none", "centre": "lamp"})
    run = run_search(Session(load_spec(spec), show_progress=False), show_progress=False)
    study = run.study
    assert study.user_attrs["centre"] == "lamp" and run.space.centre_name == "lamp"
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 8
    for t in done:
        assert all(-1.0 <= v <= 1.0 for v in t.params.values())
        assert set(t.params) == set(run.space.dims)
        a = trial_attrs(t)
        assert a["feasible"] and a["macs_ratio"] <= 0.3 + 1e-9
        if "warm_start" not in a:
            assert a["macs_ratio"] >= 0.3 * 0.95
    warm = {trial_attrs(t)["warm_start"]: t for t in done if "warm_start" in trial_attrs(t)}
    assert sorted(warm) == ["global", "lamp", "uniform"]  # no sweep (priors: none), so no sensitivity-greedy
    assert warm["lamp"].params == pytest.approx({n: 0.0 for n in run.space.dims}, abs=1e-9)
    # the proposals are not all the centre: the sampler explores around it
    assert len({tuple(round(v, 6) for v in t.params.values()) for t in done}) >= 6
    from autoprune.app.api import summarize
    assert summarize(run, test=False)["search_centre"] == "lamp"
    # resuming the study with proposals that mean something else is refused, naming both settings
    other = {**spec, "search": {**spec["search"], "centre": "none", "n_trials": 10}}
    with pytest.raises(AutopruneError, match="search.centre: lamp.*would use none"):
        run_search(Session(load_spec(other), show_progress=False), show_progress=False)


def test_centre_only_where_one_scale_onto_the_budget_makes_sense(make_spec):
    single = load_spec(make_spec("cnn1d", search={"centre": "lamp"}))
    assert resolve_centre(single, "optuna") == "lamp"
    assert resolve_centre(single, "random") == "none"  # the random baseline stays a ratio per group
    multi = load_spec(make_spec("cnn1d", search={"centre": "lamp", "objectives": ["accuracy", "macs"]}))
    assert resolve_centre(multi, "optuna") == "none"  # a Pareto search spreads over the costs
    s = Session(multi, show_progress=False)
    space, _ = build_space(s, "optuna")
    assert space.centre is None and space.param_range(space.dims[0]) == (0.0, space.bounds[space.dims[0]])
