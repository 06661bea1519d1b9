"""Recovery fine-tunes distil from the unpruned model (`evaluation.recovery_distill`): the KD term, where it
applies (classification logits, MSE on other outputs, skipped when outputs differ, ignored by a distillation
task), its wiring (session -> evaluator -> rungs, `finetune`) and that the proxy never uses the teacher."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import autoprune
from autoprune.app import api
from autoprune.model import training
from autoprune.model.task import Classification, Distillation, Regression
from autoprune.model.training import distill_loss, train_model
from autoprune.pruning.schedules import Schedule, finetune
from autoprune.sensitivity.evaluate import Evaluator


def _data(n: int = 64, d: int = 6, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g))


def _linear(seed: int, d: int = 6, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, classes))


def _params(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_distill_loss_is_hinton_kd_on_logits_and_mse_elsewhere():
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    T = 4.0
    expected = (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert distill_loss(Classification(), s, t, T).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distill_loss(Classification(), t, t, T).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(Regression(), s, t).item() == pytest.approx(F.mse_loss(s, t).item())
    assert distill_loss(Classification(), s, torch.randn(5, 4)) is None  # other shapes: cannot be compared
    assert distill_loss(Classification(), s, (t,)) is None


def test_kd_term_is_zero_for_the_teacher_itself_and_positive_for_another_model():
    data = _data()
    kw = dict(epochs=1, lr=0.0, batch_size=16, seed=0, show_progress=False)  # lr 0: the losses of fixed weights
    student = _linear(0)
    plain = train_model(student, data, **kw)
    same = train_model(student, data, teacher=copy.deepcopy(student), distill=1.0, **kw)
    other = train_model(student, data, teacher=_linear(1), distill=1.0, **kw)
    heavier = train_model(student, data, teacher=_linear(1), distill=3.0, **kw)
    assert same == pytest.approx(plain, abs=1e-6)
    assert other[0] > plain[0] + 1e-4
    assert heavier[0] - plain[0] == pytest.approx(3 * (other[0] - plain[0]), rel=1e-4)  # linear in the weight
    # no teacher, or distill 0 with one: the task's loss alone
    assert train_model(student, data, distill=1.0, **kw) == pytest.approx(plain)
    assert train_model(student, data, teacher=_linear(1), distill=0.0, **kw) == pytest.approx(plain)


def test_distill_changes_the_weights_with_seeds_fixed():
    data, teacher = _data(), _linear(1)
    kw = dict(epochs=2, lr=1e-2, batch_size=16, seed=0, show_progress=False)
    a, b, c = _linear(0), _linear(0), _linear(0)
    train_model(a, data, teacher=teacher, distill=0.0, **kw)
    train_model(b, data, teacher=teacher, distill=1.0, **kw)
    train_model(c, data, teacher=teacher, distill=1.0, **kw)
    assert not torch.allclose(_params(a), _params(b))
    assert torch.equal(_params(b), _params(c))  # deterministic


def test_distillation_task_ignores_distill():
    data, teacher = _data(), _linear(1)
    kw = dict(epochs=1, lr=1e-2, batch_size=16, seed=0, show_progress=False, task=Distillation(), teacher=teacher)
    a, b = _linear(0), _linear(0)
    la = train_model(a, data, distill=0.0, **kw)
    lb = train_model(b, data, distill=5.0, **kw)
    assert la == lb and torch.equal(_params(a), _params(b))


def test_outputs_that_cannot_be_compared_skip_kd_with_one_warning(caplog):
    data = _data()
    kw = dict(epochs=2, lr=1e-2, batch_size=16, seed=0, show_progress=False)
    a, b = _linear(0), _linear(0)
    training._KD_SKIPPED.discard("classification")
    with caplog.at_level(logging.WARNING, logger="autoprune.model.training"):
        la = train_model(a, data, teacher=_linear(1, classes=5), distill=1.0, **kw)  # 5 outputs vs 4
    lb = train_model(b, data, **kw)
    assert la == lb and torch.equal(_params(a), _params(b))
    assert sum("distillation skipped" in r.message for r in caplog.records) == 1


def test_regression_distils_by_mse():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=g), torch.randn(64, 1, generator=g))
    kw = dict(epochs=1, lr=0.0, batch_size=16, seed=0, show_progress=False, task=Regression())
    m, t = _linear(0, classes=1), _linear(1, classes=1)
    plain = train_model(m, data, **kw)
    kd = train_model(m, data, teacher=t, distill=1.0, **kw)
    with torch.no_grad():
        x = data.tensors[0]
        gap = F.mse_loss(m(x), t(x)).item()
    assert kd[0] > plain[0]
    assert kd[0] - plain[0] == pytest.approx(gap, rel=0.05)  # the mean over the batches of the MSE to the teacher


# ------------------------------------------------------------------ the wiring, on a trained zoo model
@pytest.fixture
def cnn(make_spec):
    # trained once per test session (the checkpoint cache), then reused
    return make_spec("cnn1d", evaluation={"recovery_distill": 1.0})


def test_session_gives_the_evaluator_a_teacher_only_when_distilling(cnn):
    s1 = api.session(cnn, show_progress=False)
    assert s1.evaluator.teacher is s1.target.model and s1.evaluator.recovery_distill == 1.0
    off = {**cnn, "evaluation": {k: v for k, v in cnn["evaluation"].items() if k != "recovery_distill"}}
    s0 = api.session(off, show_progress=False)  # the default: off (benchmarks/results/recovery-distill-2026-11-26.md)
    assert s0.spec.evaluation.recovery_distill == 0.0
    assert s0.evaluator.teacher is None and s0.evaluator.recovery_distill == 0.0


def test_teacher_does_not_change_the_proxy_and_is_not_run(cnn):
    s = api.session(cnn, show_progress=False)
    pm, data = s.pruner, s.target.datasets
    plan = pm.plan({n: 0.5 for n in pm.prunable_names})
    calls = []

    class Spy(nn.Module):  # a teacher that records being run
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            calls.append(1)
            return self.m(x)

    for steps in (0, 3):  # the proxy: BN recalibration, and the optional short fine-tune
        kw = dict(batch_size=64, calibration_batches=4, finetune_steps=steps, max_val_samples=300, seed=0)
        without = Evaluator(data, **kw).evaluate_plan(pm, plan)
        with_teacher = Evaluator(data, teacher=Spy(copy.deepcopy(s.target.model)), recovery_distill=1.0, **kw)
        assert with_teacher.evaluate_plan(pm, plan) == without
    assert not calls


def test_rung_and_finetune_distil_with_the_evaluator_weight(cnn):
    s = api.session(cnn, show_progress=False)
    ev, pm = s.evaluator, s.pruner
    plan = pm.plan({n: 0.5 for n in pm.prunable_names})
    base = ev.prepare(pm.apply(plan, check=False), plan, pm)

    def rung(distill: float) -> torch.Tensor:  # what Objective._climb_rungs runs, with distill=ev.recovery_distill
        m = copy.deepcopy(base)
        train_model(m, ev.datasets["train"], epochs=1, lr=1e-3, batch_size=ev.batch_size, seed=0, max_steps=4,
                    show_progress=False, task=ev.task, teacher=ev.teacher, device=ev.device, distill=distill)
        return _params(m)

    assert ev.recovery_distill > 0
    assert not torch.allclose(rung(0.0), rung(ev.recovery_distill))
    assert torch.equal(rung(ev.recovery_distill), rung(ev.recovery_distill))

    def ft(distill: float) -> torch.Tensor:
        return _params(finetune(pm, plan, s.target.datasets, schedule=Schedule("oneshot", steps=4), lr=1e-3,
                                batch_size=64, seed=0, distill=distill))

    assert not torch.allclose(ft(0.0), ft(1.0))
    assert torch.equal(ft(1.0), ft(1.0))


def test_api_finetune_passes_the_spec_weight(cnn, monkeypatch):
    seen = {}

    def fake(pm, plan, datasets, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(api, "_finetune", fake)
    monkeypatch.setattr(api, "plan_of", lambda run_dir, strategy="optuna": None)
    spec = {**cnn, "evaluation": {**cnn["evaluation"], "recovery_distill": 2.5}}
    with pytest.raises(RuntimeError, match="stop"):
        api.finetune(spec, show_progress=False)
    assert seen["distill"] == 2.5


@pytest.mark.parametrize("search_lr, expected", [(None, "train"), (3e-4, 3e-4)])
def test_api_finetune_lr_defaults_to_the_spec_recovery_lr(cnn, monkeypatch, search_lr, expected):
    seen = {}

    def fake(pm, plan, datasets, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(api, "_finetune", fake)
    monkeypatch.setattr(api, "plan_of", lambda run_dir, strategy="optuna": None)
    spec = {**cnn, "search": {**cnn.get("search", {}), "recovery_lr": search_lr}}
    with pytest.raises(RuntimeError, match="stop"):
        api.finetune(spec, show_progress=False)
    want = autoprune.load_spec(spec).train.lr / 10 if expected == "train" else expected
    assert seen["lr"] == pytest.approx(want)
    with pytest.raises(RuntimeError, match="stop"):  # an explicit lr wins
        api.finetune(spec, lr=0.05, show_progress=False)
    assert seen["lr"] == 0.05
