"""Every criterion prunes every zoo model; least-squares reconstruction lowers held-out layer error."""

import copy

import pytest
import torch

from autoprune.pruning.criteria import CRITERION_HELP
from autoprune.sensitivity.evaluate import stack_batches
from autoprune.pruning.groups import PrunableModel
from autoprune.pruning.reconstruct import kept_outputs, layer_error, reconstruct_plan
from autoprune.model.zoo import ZOO

SHAPES = {"cnn1d": (1, 40), "resnet1d": (1, 40), "digits_cnn": (1, 8, 8), "resnet20": (1, 8, 8), "mobilenetv2": (1, 8, 8),
          "resnext20": (1, 8, 8)}


def _calibration(shape, n=2, batch=16):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("model_name", list(SHAPES))
def test_every_criterion_prunes_every_zoo_model(model_name):
    torch.manual_seed(0)
    model = ZOO[model_name]()
    shape = SHAPES[model_name]
    pm = PrunableModel(model, torch.randn(1, *shape), calibration=_calibration(shape), check_groups=False)
    for crit in CRITERION_HELP:
        plan = pm.plan({n: 0.5 for n in pm.prunable_names}, criterion=crit)
        pruned = pm.apply(plan)
        assert pruned(torch.randn(2, *shape)).shape == (2, 10), crit
        fewer = sum(p.numel() for p in pruned.parameters())
        assert fewer < 0.7 * sum(p.numel() for p in model.parameters()), crit
        scores = pm.scores(crit)
        assert set(scores) == set(pm.prunable_names) and all(torch.isfinite(s).all() for s in scores.values()), crit


def test_reconstruction_lowers_held_out_error(make_spec):
    from autoprune.app import api

    s = api.session(make_spec("resnet1d"), show_progress=False)
    pm = s.pruner
    plan = pm.plan({n: 0.5 for n in pm.prunable_names})
    fit = stack_batches(s.target.datasets["train"], 64, 4, seed=0)
    held = stack_batches(s.target.datasets["val"], 64, 2, seed=1)
    pruned = pm.apply(plan)
    before = copy.deepcopy(pruned)
    report = reconstruct_plan(pm, plan, pruned, fit)
    assert report.count >= 3
    kept = kept_outputs(pm, plan)
    improved = [name for name in report.layers
                if layer_error(pruned, pm.base, name, held, kept) < layer_error(before, pm.base, name, held, kept)]
    assert len(improved) >= 0.8 * report.count, (improved, list(report.layers))
