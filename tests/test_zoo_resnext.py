"""The zoo's ResNeXt-20 (bottleneck blocks whose 3x3 convs are grouped, 4 conv groups, not depthwise): every group
is prunable, a search's plan at 50 % MACs applies, keeps the output shape and whole conv groups in every grouped
conv, and its counted MACs meet the budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autoprune.app import api
from autoprune.costs.counting import count_macs
from autoprune.model.zoo import ZOO, resnet20, resnext20
from autoprune.pruning.plan import PruningPlan

GROUPED = [f"layer{i}.{j}.conv2" for i in (1, 2, 3) for j in (0, 1)]


def _flop_macs(model: nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(x)
    return fc.get_total_flops() / 2


def test_resnext20_is_in_the_zoo_with_grouped_3x3_convs_and_about_resnet20_macs() -> None:
    assert ZOO["resnext20"] is resnext20
    model = resnext20().eval()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    grouped = {n: m for n, m in convs.items() if m.groups > 1}
    assert sorted(grouped) == sorted(GROUPED)
    for m in grouped.values():  # grouped, not depthwise
        assert m.groups == 4 and m.kernel_size == (3, 3) and m.in_channels == m.out_channels > m.groups
    # 18 block convs + stem + fc = 20 layers (the two projection shortcuts aside)
    assert len(convs) == 1 + 18 + 2
    x = torch.zeros(1, 1, 8, 8)
    ratio = _flop_macs(model, x) / _flop_macs(resnet20(), x)
    assert 0.9 < ratio < 1.15, ratio
    assert resnext20(cardinality=8).layer1[0].conv2.groups == 8
    with pytest.raises(ValueError):
        resnext20(cardinality=0)


@pytest.fixture(scope="module")
def session(runs_root):
    from tests.conftest import ZOO_SPECS

    spec = {**ZOO_SPECS["resnext20"], "name": "zoo-resnext20", "output": str(runs_root), "budget": {"macs": 0.5},
            "search": {"n_trials": 6}, "evaluation": {"calibration_batches": 2, "max_val_samples": 128}}
    spec["train"] = {"epochs": 0, "lr": 0.01}  # the search's plan, not its accuracy, is under test
    return api.session(spec, show_progress=False)


def test_every_group_is_prunable_and_grouped_convs_prune_in_conv_groups(session) -> None:
    pm = session.pruner
    assert len(pm.groups) == 15 and pm.prunable_names == pm.names  # nothing locked by the grouped convs
    grouped = [g for g in pm.groups if g.conv_groups > 1]
    # per block: the 1x1 reduce's outputs (= the grouped conv's inputs) and the grouped conv's outputs
    assert len(grouped) == 12 and all(g.conv_groups == 4 and g.channels % 4 == 0 for g in grouped)
    g = next(g for g in grouped if g.channels == 48)
    kept = {pm.kept(pm.plan({g.name: r / 20}))[g.name] for r in range(19)}
    assert kept and all(k % 4 == 0 for k in kept)


def test_a_plan_at_half_the_macs_applies_and_meets_the_budget(session) -> None:
    res = api.search(session, strategy="uniform", show_progress=False, test=False)
    best = res["best"]
    assert best is not None and best["macs_ratio"] <= 0.5 + 1e-9
    plan = PruningPlan.from_dict(best["plan"])
    pm = session.pruner
    small = pm.apply(plan)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert small.eval()(x).shape == pm.base.eval()(x).shape == (3, 10)
    mods = dict(small.named_modules())
    for name in GROUPED:
        conv, base = mods[name], pm.base.get_submodule(name)
        assert conv.groups == 4 and conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0
        assert conv.out_channels < base.out_channels  # uniform: every grouped conv lost channels
    ex = session.target.example_input
    counted = count_macs(small, ex)
    base_macs = session.base_costs.macs
    assert counted <= 0.5 * base_macs and counted == session.cost_model.estimate(plan)[0]
    assert counted / base_macs > 0.4  # the uniform plan lands close under the budget
    # an independent counter agrees (conv + linear only, as benchmarks/peers.py counts)
    assert _flop_macs(small, ex) / _flop_macs(pm.base, ex) <= 0.5 + 1e-9


def test_fpgm_criterion_on_grouped_convs() -> None:
    """Torch-Pruning 1.6's FPGM crashes on a grouped conv's input channels; autoprune's criterion scores those
    groups from their other layers, and the plan differs from l2's (it is a different criterion)."""
    from autoprune.pruning.groups import PrunableModel

    torch.manual_seed(0)
    pm = PrunableModel(resnext20().eval(), torch.randn(1, 1, 8, 8), check_groups=False)
    ratios = {n: 0.5 for n in pm.prunable_names}
    fpgm, l2 = pm.plan(ratios, criterion="fpgm"), pm.plan(ratios, criterion="l2")
    small = pm.apply(fpgm)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    grouped = [m for m in small.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(grouped) == 6 and all(m.groups == 4 and m.in_channels % 4 == 0 for m in grouped)
    assert fpgm.to_json() != l2.to_json()
