"""Where the sensitivity bounds bind: `SearchSpace.bound_contacts`, and result.json's `bounds_binding` and note."""

from __future__ import annotations

import json

import pytest
import torch

from autoprune.app.api import summarize
from autoprune.app.session import Session
from autoprune.costs.budgets import Budget
from autoprune.costs.counting import CostModel, count_macs
from autoprune.model.zoo import ZOO
from autoprune.pruning.groups import PrunableModel
from autoprune.pruning.plan import PruningPlan
from autoprune.searching.objective import trial_attrs
from autoprune.searching.space import SearchSpace
from autoprune.searching.study import run_search
from autoprune.spec import load_spec


def test_bound_contacts_lists_the_groups_a_plan_prunes_up_to_or_past_their_bound():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8)
    pm = PrunableModel(ZOO["resnet20"](), x)
    cm = CostModel(pm)
    b = Budget("macs", 0.5, 0.5 * cm.base_macs, cm.base_macs, lambda p: cm.estimate(p)[0], lambda m: count_macs(m, x))
    a, c, d = pm.prunable_names[:3]
    bounds = {n: pm.max_ratio for n in pm.prunable_names}
    # a group swept out (bound 0) and two held at 0.5
    space = SearchSpace(pm, b, {**bounds, a: 0.5, c: 0.5, d: 0.0})
    ch = pm.group(a).channels
    got = space.bound_contacts(pm.plan({a: 0.5, c: 0.75, "layer3.0.conv1": 0.9}))
    assert got == {a: {"bound": 0.5, "ratio": 0.5, "past": False},
                   c: {"bound": 0.5, "ratio": pytest.approx(1 - pm.kept(pm.plan({c: 0.75}))[c] / pm.group(c).channels),
                       "past": True},
                   d: {"bound": 0.0, "ratio": 0.0, "past": False}}
    assert got[c]["ratio"] > 0.5
    # a group pruned less than its bound is not listed; a group bounded only by max_ratio never is
    assert set(space.bound_contacts(pm.plan({a: 0.5 - 1.5 / ch, d: 0.0}))) == {d}
    assert SearchSpace(pm, b, bounds).bound_contacts(pm.plan({n: pm.max_ratio for n in bounds})) == {}


def test_result_says_where_the_bounds_bind_and_which_heuristics_go_past_them(make_spec):
    # MNIST-1D's ResNet at 30 % MACs with a tight tolerance: the sweep bounds several groups at 0.25 or 0.5
    spec = make_spec("resnet1d", budget={"macs": 0.3}, search={"n_trials": 8, "tolerance": 0.02})
    run = run_search(Session(load_spec(spec), show_progress=False), show_progress=False)
    res = summarize(run, test=False)
    pm, bounds = run.space.pm, res["search_bounds"]
    bounded = [n for n, v in bounds.items() if v < pm.max_ratio]
    assert bounded
    at_bound = pm.kept(pm.plan({n: bounds[n] for n in bounded}))
    binding = res["bounds_binding"]
    kept = pm.kept(PruningPlan.from_dict(res["best"]["plan"]))
    # exactly the bounded groups the best plan keeps no more channels of than its bound allows; never past it
    assert set(binding["best"]) == {n for n in bounded if kept[n] <= at_bound[n]}
    assert all(not c["past"] and kept[n] == at_bound[n] for n, c in binding["best"].items())
    # the heuristics' own plans (warm starts) can go past the bounds; each one listed does, in the groups listed
    attrs = [trial_attrs(t) for t in run.study.trials]
    plans = {a["warm_start"]: a["plan"] for a in attrs if "warm_start" in a}
    assert set(plans) == {"sensitivity-greedy", "uniform", "global", "lamp"}
    for label, plan in plans.items():
        k = pm.kept(PruningPlan.from_dict(plan))
        past = {n for n in bounded if k[n] < at_bound[n]}
        assert set(binding["warm_starts"].get(label, {}).get("groups", {})) == past, label
    assert "sensitivity-greedy" not in binding["warm_starts"]  # it allocates within the bounds
    assert binding["warm_starts"], "this model's LAMP plan cuts the last stage's shortcut past its bound"
    note = [n for n in res["notes"] if "sensitivity bound" in n or "past the bounds" in n]
    assert len(note) == 1 and "search.priors: none" in note[0]
    for label in binding["warm_starts"]:
        assert f"the {label} warm start" in note[0]
    on_disk = json.loads((run.session.run_dir / "result.json").read_text())
    assert on_disk["bounds_binding"] == json.loads(json.dumps(binding))


def test_no_bounds_no_note(make_spec):
    spec = make_spec("cnn1d", budget={"macs": 0.3}, search={"n_trials": 5, "priors": "none"})
    run = run_search(Session(load_spec(spec), show_progress=False), show_progress=False)
    res = summarize(run, test=False)
    assert res["bounds_binding"] == {}
    assert not [n for n in res["notes"] if "bound" in n]

