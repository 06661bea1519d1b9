"""BN recalibration as the evaluator does it every trial: exact statistics, modes left as `model.eval()` leaves
them, and a module that overrides `train` still obeyed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from autoprune import PruningPlan
from autoprune.sensitivity.evaluate import recalibrate_bn


class Frozen(nn.Module):
    """Overrides `train`: its BatchNorm stays in eval mode whatever the model is switched to (a common way to
    freeze statistics); recalibration must go through it, not around it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def train(self, mode: bool = True) -> "Frozen":
        super().train(mode)
        self.bn.training = False
        return self

    def forward(self, x):
        return self.bn(x)


def _batches(seed: int = 0) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g) * 3 + 1, None) for _ in range(3)]


def test_recalibration_gives_the_exact_average_and_leaves_everything_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.ReLU(), nn.Linear(5, 2))
    model.train()
    batches = _batches()
    with torch.no_grad():
        feats = [model[0](x) for x, _ in batches]
    out = recalibrate_bn(model, batches)
    assert out is model
    bn = model[1]
    # momentum None: the running mean is the plain average of the batch means, the variance of the unbiased ones
    assert torch.allclose(bn.running_mean, torch.stack([f.mean(0) for f in feats]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([f.var(0, unbiased=True) for f in feats]).mean(0), atol=1e-5)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1  # the momentum is restored
    assert not any(m.training for m in model.modules())
    # a second recalibration starts from scratch, not from the first one's statistics
    recalibrate_bn(model, _batches(1))
    assert int(bn.num_batches_tracked) == 3


def test_a_module_that_overrides_train_is_obeyed():
    model = nn.Sequential(nn.Linear(4, 3), Frozen(), nn.BatchNorm1d(3))
    before = model[1].bn.running_mean.clone()
    recalibrate_bn(model, _batches())
    # the overriding module kept its BatchNorm in eval mode during the passes: its statistics were reset only
    assert torch.equal(model[1].bn.running_mean, torch.zeros(3)) and torch.equal(before, torch.zeros(3))
    assert int(model[1].bn.num_batches_tracked) == 0
    assert int(model[2].num_batches_tracked) == 3 and model[2].running_mean.abs().sum() > 0
    assert not any(m.training for m in model.modules())


def test_plan_to_dict_is_dataclasses_asdict():
    plan = PruningPlan({"a": 0.25, "b": 0.5}, criterion="l1", round_to=4)
    d = plan.to_dict()
    assert d == dataclasses.asdict(plan)  # a field added to the plan must reach its dict (and its JSON)
    d["ratios"]["a"] = 0.9
    assert plan.ratios["a"] == 0.25  # a copy, as asdict makes
    assert PruningPlan.from_dict(plan.to_dict()) == plan


def test_scoring_switches_a_model_in_train_mode_to_eval_and_obeys_an_overridden_train():
    """`Evaluator.score` scores in eval mode (dropout off, running statistics used) whatever mode the model was
    left in, through a module's own `train` where it has one."""
    from torch.utils.data import TensorDataset

    from autoprune.sensitivity.evaluate import Evaluator

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    ds = TensorDataset(x, y)
    ev = Evaluator({"train": ds, "val": ds}, batch_size=16, calibration_batches=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[2].running_mean.fill_(5.0)  # eval-mode BN shifts every logit of class c by the same amount
    want = float((model.eval()(x).argmax(1) == y).float().mean())
    model.train()
    assert ev.score(model) == pytest.approx(want) and not any(m.training for m in model.modules())
    frozen = nn.Sequential(nn.Linear(4, 3), Frozen())
    frozen.train()
    ev.score(frozen)
    assert not any(m.training for m in frozen.modules())
