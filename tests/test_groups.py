"""Engine tests over every zoo model: groups, plans applied in both modes, architecture, error messages."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

from autoprune.costs.counting import CostModel, cost_report, count_macs, count_nonzero, count_params
from autoprune.errors import AutopruneError
from autoprune.pruning.groups import PrunableModel
from autoprune.pruning.plan import PruningPlan
from autoprune.model.zoo import ZOO

SHAPES = {"cnn1d": (1, 40), "resnet1d": (1, 40), "digits_cnn": (1, 8, 8), "resnet20": (1, 8, 8), "resnext20": (1, 8, 8), "mobilenetv2": (1, 8, 8)}
_CACHE: dict = {}


def build(name: str, **kw) -> PrunableModel:
    key = (name, tuple(sorted(kw.items())))
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = PrunableModel(ZOO[name]().eval(), torch.randn(1, *SHAPES[name]), **kw)
    return _CACHE[key]


def random_plans(pm: PrunableModel, n: int, seed: int) -> list[PruningPlan]:
    rng = random.Random(seed)
    return [pm.plan({g: rng.uniform(0, pm.max_ratio) for g in pm.prunable_names}) for _ in range(n)]


def conv_widths(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_structured_random_plans(name: str) -> None:
    pm = build(name)
    assert len(pm.prunable_names) >= 4
    cm = CostModel(pm)
    assert cm.exact
    x = torch.randn(3, *SHAPES[name])
    with torch.no_grad():
        want = pm.base(x).shape
    for i, plan in enumerate(random_plans(pm, 3, seed=1)):
        small = pm.apply(plan)
        with torch.no_grad():
            assert small(x).shape == want
        macs, params = count_macs(small, pm.example), count_params(small)
        assert macs < cm.base_macs and params < cm.base_params
        assert cm.estimate(plan) == (macs, params)  # analytic estimate == counter on the pruned model
        # re-applying the plan (via JSON) to a freshly built base model gives the same architecture
        again = PruningPlan.from_json(plan.to_json())
        assert again == plan
        if i:
            continue
        torch.manual_seed(0)
        fresh = PrunableModel(ZOO[name]().eval(), torch.randn(1, *SHAPES[name]))
        rebuilt = fresh.apply(again)
        assert conv_widths(rebuilt) == conv_widths(small)
        for k, v in small.state_dict().items():
            assert torch.equal(v, rebuilt.state_dict()[k]), k
        # the output layer is never pruned
        assert small.fc.out_features == pm.base.fc.out_features
    # the base model is left untouched, and shares no memory with a pruned model (apply lets the copy refer to the
    # base's tensors until it cuts them: every one must have been replaced), even when that model is trained
    assert count_params(pm.base) == cm.base_params
    before = {k: v.clone() for k, v in pm.base.state_dict().items()}
    base_ptrs = {t.data_ptr() for t in before.values() if t.numel()} | {
        t.data_ptr() for t in pm.base.state_dict().values() if t.numel()}
    small = pm.apply(random_plans(pm, 1, seed=3)[0])
    assert not base_ptrs & {t.data_ptr() for t in small.state_dict().values() if t.numel()}
    with torch.no_grad():
        for t in small.state_dict().values():
            t.add_(1)
    assert all(torch.equal(v, before[k]) for k, v in pm.base.state_dict().items())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_cost_estimate_of_one_group_changes_equals_the_counter(name: str) -> None:
    # the budget projection's top-up changes one group at a time, and the estimate then recomputes only the
    # layers that group touches: a walk of one- and two-group changes must still equal the counted model, step
    # by step, and a fresh cost model's full recomputation
    pm = build(name)
    cm = CostModel(pm)
    rng = random.Random(5)
    ratios = {g: rng.uniform(0, pm.max_ratio) for g in pm.prunable_names}
    for step in range(8):
        for g in rng.sample(pm.prunable_names, 1 + step % 2):
            ratios[g] = rng.uniform(0, pm.max_ratio)
        plan = pm.plan(ratios)
        small = pm.apply(plan, check=False)
        assert cm.estimate(plan) == (count_macs(small, pm.example), count_params(small)), step
        assert cm.estimate(plan) == CostModel(pm, cm.base_macs, cm.base_params).estimate(plan)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_costs_monotone_in_one_group(name: str) -> None:
    pm = build(name)
    rng = random.Random(2)
    for g in rng.sample(pm.prunable_names, 1):
        rest = {h: 0.3 for h in pm.prunable_names if h != g}
        counted = []
        for r in (0.0, 0.3, 0.6, 0.9):
            m = pm.apply(pm.plan({**rest, g: r}), check=False)
            counted.append((count_macs(m, pm.example), count_params(m)))
        for (m0, p0), (m1, p1) in zip(counted, counted[1:]):
            assert m1 <= m0 and p1 <= p0, (g, counted)
        assert counted[-1][0] < counted[0][0] and counted[-1][1] < counted[0][1]


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "cnn1d"])
def test_round_to_and_at_least_one_channel(name: str) -> None:
    pm = build(name, round_to=8)
    for plan in random_plans(pm, 1, seed=3) + [pm.uniform_plan(0.9)]:
        kept = pm.kept(plan)
        small = pm.apply(plan)
        mods = dict(small.named_modules())
        for g in pm.groups:
            assert kept[g.name] >= 1
            assert kept[g.name] == g.channels or kept[g.name] % 8 == 0, (g.name, kept[g.name])
            root = mods[g.name]
            width = root.out_channels if isinstance(root, (nn.Conv1d, nn.Conv2d)) else root.out_features
            assert width == kept[g.name]
    # one channel at most: with round_to=1 the extreme ratio still keeps >= 1 channel per group
    pm1 = build(name, max_ratio=1.0)
    small = pm1.apply(pm1.uniform_plan(1.0))
    for g in pm1.groups:
        assert pm1.kept(pm1.uniform_plan(1.0))[g.name] == 1
    with torch.no_grad():
        assert small(torch.randn(2, *SHAPES[name])).shape == (2, 10)


def test_ignored_modules_are_never_pruned() -> None:
    torch.manual_seed(0)
    model = ZOO["resnet20"]().eval()
    pm = PrunableModel(model, torch.randn(1, 1, 8, 8), ignore=["layer3.0.conv1", "stem.0"])
    assert "layer3.0.conv1" not in pm.prunable_names
    small = pm.apply(pm.uniform_plan(0.9))
    assert small.layer3[0].conv1.out_channels == model.layer3[0].conv1.out_channels == 64
    assert small.stem[0].out_channels == 16  # the stem's residual group is left whole
    assert small.fc.out_features == 10
    assert small.layer2[0].conv1.out_channels < 32  # others are pruned
    with pytest.raises(AutopruneError, match="'layer9.conv' .*does not exist|'layer9.conv'"):
        PrunableModel(model, torch.randn(1, 1, 8, 8), ignore=["layer9.conv"])


def test_bad_plans_name_the_entry() -> None:
    pm = build("resnet20")
    g = pm.prunable_names[0]
    with pytest.raises(AutopruneError, match=r"unknown group 'layer1\.0\.conv9'"):
        pm.apply(pm.plan({"layer1.0.conv9": 0.2}))
    with pytest.raises(AutopruneError, match=rf"group '{g}' is 0\.95.*\[0, 0\.9\]"):
        pm.apply(pm.plan({g: 0.95}))
    with pytest.raises(AutopruneError, match=rf"group '{g}' is -0\.1"):
        pm.apply(pm.plan({g: -0.1}))
    with pytest.raises(AutopruneError, match="mode 'sparse'"):
        pm.apply(PruningPlan({g: 0.1}, mode="sparse"))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_unstructured_random_plans(name: str) -> None:
    pm = build(name, mode="unstructured")
    cm = CostModel(pm)
    base = cost_report(pm.base, pm.example)
    assert base.sparsity < 0.05  # only the zero-initialised BatchNorm shifts
    x = torch.randn(2, *SHAPES[name])
    for plan in random_plans(pm, 2, seed=4):
        assert plan.mode == "unstructured"
        sparse = pm.apply(plan)
        with torch.no_grad():
            assert sparse(x).shape == (2, 10)
        assert conv_widths(sparse) == conv_widths(pm.base)  # same shapes, zeros inside
        assert not any(hasattr(m, "weight_mask") for m in sparse.modules())  # masks made permanent
        rep = cost_report(sparse, pm.example, base)
        assert rep.macs == base.macs and rep.params == base.params  # dense MACs unchanged
        assert rep.nonzero_params == count_nonzero(sparse) < base.params
        assert rep.sparsity == pytest.approx(1 - rep.nonzero_params / rep.params)
        assert any("dense" in n for n in rep.notes)
        assert rep.params_ratio == pytest.approx(rep.nonzero_params / base.params)
        assert cm.estimate(plan) == (base.macs, rep.nonzero_params)
        # each pruned layer holds the requested fraction of zeros
        mods = dict(sparse.named_modules())
        for g in pm.groups:
            for layer in g.layers:
                w = mods[layer].weight
                assert int((w == 0).sum()) == round(plan.ratios[g.name] * w.numel())
    # more sparsity in one group: fewer non-zeros
    g = pm.prunable_names[0]
    nz = [count_nonzero(pm.apply(pm.plan({g: r}))) for r in (0.1, 0.5, 0.9)]
    assert nz[0] > nz[1] > nz[2]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_clone_module_is_a_deepcopy(name: str) -> None:
    # every trial copies the model with clone_module (copy.deepcopy is 3-10x slower): same weights, buffers,
    # structure and output, and nothing shared with the original
    import copy

    from autoprune.pruning.clone import clone_module

    torch.manual_seed(0)
    base = ZOO[name]().eval()
    x = torch.randn(2, *SHAPES[name])
    new, ref = clone_module(base), copy.deepcopy(base)
    assert [n for n, _ in new.named_modules()] == [n for n, _ in ref.named_modules()]
    assert [type(m) for m in new.modules()] == [type(m) for m in ref.modules()]
    sd, sd_ref = new.state_dict(), base.state_dict()
    assert list(sd) == list(sd_ref) and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    ptrs = {t.data_ptr() for t in base.state_dict().values() if t.numel()}
    assert not ptrs & {t.data_ptr() for t in sd.values() if t.numel()}
    assert all(type(a) is type(b) and a.requires_grad == b.requires_grad for a, b in zip(new.parameters(), base.parameters()))
    with torch.no_grad():
        assert torch.equal(new(x), base(x))
        next(new.parameters()).add_(1.0)  # independent: changing the copy leaves the original alone
        assert torch.equal(base(x), ref(x))


def test_clone_module_keeps_sharing_and_falls_back_where_it_must() -> None:
    import copy

    from autoprune.pruning.clone import clone_module

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.emb.weight  # tied weights
            self.shared = nn.ReLU()
            self.again = self.shared  # one submodule under two names
            self.meta = {"sizes": [1, 2], "cfg": type("Cfg", (), {})()}  # an arbitrary object: deepcopied

    class Own(nn.Linear):
        def __deepcopy__(self, memo):  # a class with its own copy protocol keeps it
            out = nn.Linear.__new__(Own)
            out.__dict__ = copy.deepcopy(self.__dict__, memo)
            out.copied_by_own = True
            return out

    m = Tied()
    m.own = Own(2, 2)
    m.emb.weight.grad = torch.ones(5, 4)  # a gradient: whatever deepcopy does with it
    c, ref = clone_module(m), copy.deepcopy(m)
    assert c.out.weight is c.emb.weight and c.emb.weight is not m.emb.weight
    assert c.again is c.shared and c.shared is not m.shared
    assert c.meta == {"sizes": [1, 2], "cfg": c.meta["cfg"]} and c.meta["cfg"] is not m.meta["cfg"]
    assert c.meta["sizes"] is not m.meta["sizes"]
    assert getattr(c.own, "copied_by_own", False)
    assert (c.emb.weight.grad is None) == (ref.emb.weight.grad is None)


def _same_modules(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k
    for (n, ma), mb in zip(a.named_modules(), b.modules()):
        public = lambda m: {k: v for k, v in vars(m).items() if not k.startswith("_")}  # noqa: E731
        assert type(ma) is type(mb) and public(ma) == public(mb), n  # out_channels, num_features, normalized_shape
    assert all(type(p) is nn.Parameter for p in a.parameters())


@pytest.mark.parametrize("name", sorted(ZOO) + ["tiny_bert"])
def test_slicing_cut_equals_torch_pruning(name: str, monkeypatch) -> None:
    # apply cuts plain layers (conv, linear, BatchNorm, LayerNorm) by its own slicing (pruning.slicing.cut) and the
    # rest with Torch-Pruning's functions: the model must be exactly what Torch-Pruning's functions alone give
    import autoprune.pruning.groups as groups_mod
    from autoprune.pruning import slicing

    if name == "tiny_bert":
        from tests.test_transformers import bert_inputs, tiny_bert

        pm = PrunableModel(tiny_bert(), bert_inputs(), ignore=["pooler.dense"])
    else:
        pm = build(name)
    fast: list[str] = []

    def counting(m, handler, idxs, copy=False, kind=slicing._UNKNOWN):
        before = handler.__self__.__class__.__name__, type(m).__name__
        fast.append(before)
        slicing.cut(m, handler, idxs, copy, kind)

    for plan in random_plans(pm, 3, seed=7):
        monkeypatch.setattr(groups_mod, "cut", counting)
        ours = pm.apply(plan)
        monkeypatch.setattr(groups_mod, "cut", lambda m, handler, idxs, copy=False, kind=None: handler(m, list(idxs)))
        theirs = pm.apply(plan)
        _same_modules(ours, theirs)
    kinds = {k for k in fast}
    assert any(k[1] in ("Conv1d", "Conv2d", "Linear") for k in kinds), kinds  # the fast paths were taken
