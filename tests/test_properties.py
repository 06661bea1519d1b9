"""Property-based tests (hypothesis) over random plans on zoo models.

For any plan: applying it keeps the output shape; raising one group's ratio never raises MACs or params
(estimated, and measured on the pruned model); a plan's JSON round-trips exactly. The models are untrained
(these properties do not depend on the weights), so nothing is trained here.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoprune.model import zoo
from autoprune.costs.counting import CostModel, count_macs, count_params, cost_report
from autoprune.pruning.groups import PrunableModel
from autoprune.pruning.plan import PruningPlan, channels_kept

MODELS = {
    "cnn1d": (zoo.cnn1d, (1, 40)),
    "resnet1d": (zoo.resnet1d, (1, 40)),
    "resnet20": (zoo.resnet20, (1, 8, 8)),
    "resnext20": (zoo.resnext20, (1, 8, 8)),
    "mobilenetv2": (zoo.mobilenetv2, (1, 8, 8)),
}
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@functools.lru_cache(maxsize=None)
def _pm(name: str, round_to: int = 1) -> tuple[PrunableModel, CostModel]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    example = torch.randn(1, *shape)
    pm = PrunableModel(model, example, round_to=round_to, max_ratio=0.9)
    base = cost_report(model, example)
    return pm, CostModel(pm, base.macs, base.params)


ratio = st.floats(min_value=0.0, max_value=0.9, allow_nan=False, allow_infinity=False)


@st.composite
def plans(draw, name: str, round_to: int = 1) -> PruningPlan:
    pm, _ = _pm(name, round_to)
    return pm.plan({n: draw(ratio) for n in pm.prunable_names})


@pytest.mark.parametrize("name", list(MODELS))
def test_applying_a_plan_never_changes_the_output_shape(name):
    pm, cm = _pm(name)
    want = tuple(pm.base(pm.example).shape)

    @SETTINGS
    @given(plan=plans(name))
    def check(plan: PruningPlan) -> None:
        model = pm.apply(plan, check=False)
        x = torch.randn(3, *pm.example.shape[1:])  # another batch size too
        with torch.no_grad():
            assert tuple(model(pm.example).shape) == want
            assert tuple(model(x).shape) == (3, *want[1:])
        # the analytic estimate is the pruned model's real cost
        assert cm.estimate(plan) == (count_macs(model, pm.example), count_params(model))

    check()


@pytest.mark.parametrize("name", ["cnn1d", "resnet20", "mobilenetv2"])
def test_costs_never_go_up_when_a_ratio_goes_up(name):
    pm, cm = _pm(name)

    @SETTINGS
    @given(data=st.data())
    def check(data) -> None:
        plan = data.draw(plans(name))
        group = data.draw(st.sampled_from(pm.prunable_names))
        higher = data.draw(st.floats(min_value=plan.ratios[group], max_value=0.9))
        bigger = pm.plan({**plan.ratios, group: higher})
        m0, p0 = cm.estimate(plan)
        m1, p1 = cm.estimate(bigger)
        assert m1 <= m0 and p1 <= p0
        if pm.kept(bigger)[group] < pm.kept(plan)[group]:  # a channel really went: strictly cheaper
            assert m1 < m0 and p1 < p0
        measured = [count_macs(pm.apply(p, check=False), pm.example) for p in (plan, bigger)]
        assert measured[1] <= measured[0]

    check()


@SETTINGS
@given(channels=st.integers(1, 512), r0=ratio, r1=ratio, round_to=st.sampled_from([1, 2, 4, 8, 16]))
def test_channels_kept_is_monotone_and_in_range(channels, r0, r1, round_to):
    lo, hi = sorted((r0, r1))
    k_lo, k_hi = channels_kept(channels, lo, round_to), channels_kept(channels, hi, round_to)
    assert 1 <= k_hi <= k_lo <= channels
    assert channels_kept(channels, 0.0, round_to) == channels


@pytest.mark.parametrize("name", ["resnet1d", "mobilenetv2"])
def test_plan_json_round_trips_exactly(name, tmp_path):
    pm, _ = _pm(name, 8)

    @SETTINGS
    @given(plan=plans(name, 8), criterion=st.sampled_from(["l1", "l2", "fpgm", "taylor"]))
    def check(plan: PruningPlan, criterion: str) -> None:
        plan = PruningPlan(plan.ratios, plan.mode, criterion, plan.round_to)
        again = PruningPlan.from_json(plan.to_json())
        assert again == plan
        assert all(again.ratios[k] == v and math.copysign(1, again.ratios[k]) == math.copysign(1, v)
                   for k, v in plan.ratios.items())  # bit-exact floats, not just close
        assert PruningPlan.from_json(plan.to_json(indent=None)) == plan
        path = tmp_path / "plan.json"
        plan.save(path)
        loaded = PruningPlan.load(path)
        assert loaded == plan and pm.kept(loaded) == pm.kept(plan)

    check()
