"""Mixture-of-experts layers (`autoprune/pruning/experts.py`): the experts' neurons are a group, as many from each
expert, in the layouts transformers uses (Mixtral: gate_up [E, 2I, H] with [gate | up]; gpt-oss: [E, H, 2I] with gate
and up interleaved, and biases). A cut must compute what silencing the same neurons computes, costs are counted
exactly, and the pruned model saves, reloads and rebuilds."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from autoprune.costs.counting import CostModel, count_macs, count_params  # noqa: E402
from autoprune.pruning.groups import PrunableModel  # noqa: E402

_BASE = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=40)


def tiny_mixtral() -> nn.Module:
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **_BASE, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)).eval()


def tiny_gpt_oss() -> nn.Module:
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **_BASE, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"] * 2)).eval()


def _tokens(n: int) -> dict:
    return {"input_ids": torch.randint(1, 100, (n, 12), generator=torch.Generator().manual_seed(n))}


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


@pytest.mark.parametrize("build, layout", [(tiny_mixtral, ("rows", False)), (tiny_gpt_oss, ("cols", True))])
def test_experts_neurons_are_a_group_cut_as_many_from_each_expert_as_silencing_them(build, layout, tmp_path) -> None:
    from autoprune.exporting import hf as hfexport

    pm = PrunableModel(build(), _tokens(1))
    names = [f"model.layers.{i}.mlp.experts" for i in (0, 1)]
    assert pm.expert_groups == names
    g = pm.group(names[0])
    # each expert keeps a multiple of 16 bytes (4 float32 neurons): transformers' grouped_mm refuses other strides
    assert (g.prunable, g.channels, g.blocks, g.multiple, g.min_keep) == (True, 4 * 64, 4, 4, 16)
    assert pm.kept(pm.plan({names[0]: 0.1}))[names[0]] == 4 * 60  # 6.4 of 64 neurons an expert: 4 go
    assert pm.kind(g) == "experts' neurons (4 experts of 64, as many from each)"
    lay = pm._experts[names[0]]
    assert (lay.layout, lay.interleaved) == layout
    plan = pm.plan({names[0]: 0.5, names[1]: 0.25})
    gone = pm.pruned_indices(plan)
    for name, per in ((names[0], 32), (names[1], 16)):  # as many from each expert, each its own
        assert [sum(c // 64 == e for c in gone[name]) for e in range(4)] == [per] * 4
    assert len({tuple(c % 64 for c in gone[names[0]] if c // 64 == e) for e in range(4)}) > 1
    small = pm.apply(plan)
    experts = small.model.layers[0].mlp.experts
    assert experts.down_proj.shape[0] == 4 and 32 in experts.down_proj.shape and 48 in small.model.layers[1].mlp.experts.down_proj.shape
    silenced = copy.deepcopy(pm.base)
    for name in names:
        pm._experts[name].silence(silenced.get_submodule(name), gone[name])
    x = _tokens(3)
    want = _logits(small, x)
    assert not torch.allclose(want, _logits(pm.base, x), atol=1e-4)  # the cut changed something
    assert torch.allclose(want, _logits(silenced, x), atol=1e-5)
    # costs: every token goes through top-k experts, so the count is linear in the neurons kept
    cm = CostModel(pm)
    assert cm.exact and cm.params_exact
    assert cm.estimate(plan) == (count_macs(small, pm.example), count_params(small)) and cm.estimate(plan)[0] < cm.base_macs
    hfexport.save_pretrained(small, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert torch.allclose(_logits(back, x), want, atol=1e-5)


def test_a_pruned_mixtral_rebuilds_from_its_plan_and_prunes_gradually(tmp_path) -> None:
    from autoprune.exporting.files import export_model, load_pruned
    from autoprune.pruning.schedules import prune_to

    pm = PrunableModel(tiny_mixtral(), _tokens(1))
    plan = pm.plan({n: 0.5 for n in pm.prunable_names})
    small = pm.apply(plan)
    export_model(small, tmp_path, plan=plan, model_spec={"factory": "test_experts:tiny_mixtral", "kwargs": {}},
                 pruning={"ignore": [], "round_to": 1, "mode": "structured", "criterion": "l2"}, example=_tokens(1),
                 onnx=False)
    x = _tokens(2)
    assert torch.allclose(_logits(load_pruned(tmp_path), x), _logits(small, x), atol=1e-6)
    model = pm.base
    for fraction in (0.5, 1.0):
        model = prune_to(pm, model, plan, fraction)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == \
        {n: tuple(p.shape) for n, p in small.named_parameters()}


class Shuffled(nn.Module):
    """An experts module whose gate and up channels come in pairs of pairs ([g g u u g g u u ...]): no layout
    autoprune knows, so its neurons must stay."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 6) * 0.5)  # 2 experts, 4 neurons, hidden 6
        self.down_proj = nn.Parameter(torch.randn(2, 6, 4) * 0.5)

    def forward(self, x):  # every token through both experts
        out = 0
        for e in range(2):
            h = (x @ self.gate_up_proj[e].T).reshape(*x.shape[:-1], 2, 2, 2)
            gate, up = h[..., 0, :].flatten(-2), h[..., 1, :].flatten(-2)
            out = out + (torch.relu(gate) * up) @ self.down_proj[e].T
        return out


class MoENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)  # (its 8 neurons are a group; the experts' hidden 6 is not cut)
        self.mid = nn.Linear(8, 6)
        self.experts = Shuffled()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.experts(self.mid(torch.relu(self.inp(x)))))


def test_an_experts_layout_that_no_cut_reproduces_is_left_intact_with_the_reason() -> None:
    pm = PrunableModel(MoENet().eval(), torch.randn(4, 5))
    g = pm.group("experts")
    assert not g.prunable and "layout" in g.reason and pm.expert_groups == []


def test_the_counter_counts_the_experts_macs_in_both_of_transformers_implementations() -> None:
    # transformers runs experts with `aten._grouped_mm` by default, which FlopCounterMode has no formula for: the
    # experts (most of a mixture-of-experts model's compute) counted 0 MACs, and a MACs budget ignored them
    model = tiny_mixtral()
    x = _tokens(1)  # 12 tokens, each through 2 experts of 64 neurons on 32 channels, in 2 layers
    grouped = count_macs(model, x)
    model.set_experts_implementation("eager")
    eager = count_macs(model, x)
    assert grouped == eager
    pm = PrunableModel(tiny_mixtral(), x)
    half = pm.apply(pm.plan({n: 0.5 for n in pm.expert_groups}))
    assert grouped - count_macs(half, x) == 2 * 12 * 2 * 3 * 32 * 32  # layers x tokens x top-k x (gate, up, down)
    # the groups table's MACs share of a layer's experts: tokens x top-k x 3 x hidden x neurons over the total (it
    # read 0 when only the modelled layers counted)
    shares = CostModel(pm).macs_shares()
    assert shares["model.layers.0.mlp.experts"] == pytest.approx(12 * 2 * 3 * 32 * 64 / grouped)


def test_the_latency_table_refuses_experts_neurons_so_a_latency_budget_measures_them() -> None:
    # an experts module computes inside one call with its 3-d parameters: no per-layer entry follows its neurons,
    # and a table without them would predict a pruned mixture-of-experts model at its unpruned experts' time
    from autoprune.costs.latency import build_table
    from autoprune.errors import AutopruneError

    pm = PrunableModel(tiny_mixtral(), _tokens(1))
    with pytest.raises(AutopruneError, match="model.layers.0.mlp.experts.* mixture-of-experts layer's neurons"):
        build_table(pm, points_1d=2, points_2d=2, calib_plans=2, valid_plans=1)
