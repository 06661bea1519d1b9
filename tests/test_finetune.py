"""Schedules reach exactly the plan's architecture; sparsity training shrinks BN scales."""

import pytest
import torch

from autoprune.app import api
from autoprune.pruning.schedules import Schedule, finetune, widths
from autoprune.model.training import train_model
from autoprune.model.zoo import resnet1d


def test_schedule_fractions():
    poly = Schedule("polynomial", steps=90, frequency=10)
    assert poly.end == 60
    assert poly.fraction(0) == 0.0 and poly.fraction(60) == 1.0 and poly.fraction(90) == 1.0
    fr = [poly.fraction(s) for s in poly.pruning_steps()]
    assert fr == sorted(fr) and len(fr) == 7
    agp = Schedule("agp", steps=90, frequency=10, initial=0.5)  # AGP always starts from zero
    assert agp.fraction(30) == pytest.approx(1 - 0.5 ** 3)
    assert Schedule("oneshot", steps=10).pruning_steps() == [0]
    # TF-MOT polynomial from an initial fraction, linear ramp between begin and end step
    lin = Schedule("polynomial", steps=100, frequency=10, initial=0.2, power=1.0, begin_step=20, end_step=60)
    assert lin.fraction(10) == 0.0 and lin.fraction(20) == pytest.approx(0.2)
    assert lin.fraction(40) == pytest.approx(0.6) and lin.fraction(60) == 1.0
    assert lin.pruning_steps() == [20, 30, 40, 50, 60]
    # the defaults (initial 0, power 3) are AGP's curve
    assert all(Schedule("polynomial", steps=90).fraction(t) == Schedule("agp", steps=90).fraction(t) for t in range(91))
    with pytest.raises(Exception, match="unknown"):
        Schedule("linear")


@pytest.mark.parametrize("kind", ["oneshot", "polynomial", "agp"])
def test_schedule_reaches_plan_architecture(make_spec, kind):
    s = api.session(make_spec("resnet1d"), show_progress=False)
    pm = s.pruner
    plan = pm.plan({n: r for n, r in zip(pm.prunable_names, [0.3, 0.6, 0.45, 0.7, 0.2, 0.5, 0.65, 0.4, 0.55])})
    model = finetune(pm, plan, s.target.datasets, schedule=Schedule(kind, steps=24, frequency=6), lr=1e-3,
                     batch_size=64)
    assert widths(model) == widths(pm.apply(plan, check=False))
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)
    assert s.evaluator.score(model, "val") > 0.2


def test_unstructured_schedule_exact_sparsity(make_spec):
    s = api.session(make_spec("cnn1d", pruning={"mode": "unstructured"}, budget={"params": 0.5}), show_progress=False)
    pm = s.pruner
    plan = pm.plan({n: 0.5 for n in pm.prunable_names})
    model = finetune(pm, plan, s.target.datasets, schedule=Schedule("polynomial", steps=12, frequency=4), lr=1e-3)
    mods = dict(model.named_modules())
    for g in pm.groups:
        if g.prunable:
            w = mods[g.name].weight
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_sparsity_l1_drives_bn_scales_down(make_spec):
    s = api.session(make_spec("resnet1d"), show_progress=False)
    data = s.target.datasets["train"]

    def mean_scale(lam: float) -> float:
        torch.manual_seed(0)
        m = resnet1d()
        train_model(m, data, epochs=3, lr=0.01, sparsity_l1=lam, seed=0, show_progress=False)
        g = torch.cat([b.weight.detach().abs() for b in m.modules() if isinstance(b, torch.nn.BatchNorm1d)])
        return g.mean().item()

    plain, sparse = mean_scale(0.0), mean_scale(1e-2)
    # measured: 1.003 without the penalty, 0.786 with it (3 epochs, Adam); BN scales start at 1
    assert sparse < 0.85 * plain, (plain, sparse)


def test_finetune_cli_polynomial_reaches_the_best_plan(make_spec, tmp_path, capsys):
    """`autoprune finetune SPEC --schedule polynomial --initial --power ...` end to end: exported, exact widths."""
    import json

    import yaml

    from autoprune.app.cli import main
    from autoprune.exporting.files import load_pruned

    spec = make_spec("cnn1d", budget={"macs": 0.5}, search={"n_trials": 4, "priors": "none"})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = api.search(str(path), show_progress=False, test=False)
    argv = ["finetune", str(path), "--schedule", "polynomial", "--steps", "12", "--frequency", "4",
            "--initial", "0.2", "--power", "1", "--end-step", "8", "--out", str(tmp_path / "ft")]
    try:
        main(argv)
    except SystemExit as e:
        assert not e.code
    out = json.loads(capsys.readouterr().out)
    assert out["schedule"] == "polynomial" and out["steps"] == 12
    assert out["costs"]["macs_ratio"] == pytest.approx(result["best"]["macs_ratio"], abs=1e-9)
    assert 0.1 < out["metrics"]["test"] <= 1.0
    model = load_pruned(tmp_path / "ft")
    s = api.session(str(path), show_progress=False)
    assert widths(model) == widths(s.pruner.apply(api.plan_of(s.run_dir)))


def test_finetune_trains_on_the_evaluation_device_and_returns_a_cpu_model(make_spec, monkeypatch):
    """Every training step of a schedule gets the device it is given (the spec's `evaluation.device` through the
    API); pruning steps and the returned model are on the CPU. The device is recorded, and the real training runs
    on the CPU (this machine has no GPU: `benchmarks/gpu_check.py` runs it on one)."""
    from autoprune.model import training

    s = api.session(make_spec("resnet1d"), show_progress=False)
    pm = s.pruner
    plan = pm.plan({n: 0.5 for n in pm.prunable_names})
    seen = []
    real = training.train_model

    def recording(model, *a, device="cpu", **kw):
        seen.append(device)
        return real(model, *a, device="cpu", **kw)

    monkeypatch.setattr(training, "train_model", recording)
    model = finetune(pm, plan, s.target.datasets, schedule=Schedule("polynomial", steps=12, frequency=4), lr=1e-3,
                     batch_size=64, device="cuda:7")
    assert seen and set(seen) == {"cuda:7"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert widths(model) == widths(pm.apply(plan, check=False))

    passed = {}
    monkeypatch.setattr(api, "_finetune", lambda *a, **kw: passed.update(kw) or pm.apply(plan, check=False))
    monkeypatch.setattr(api, "plan_of", lambda *a, **kw: plan)
    api.finetune(s.spec, steps=5, show_progress=False)
    assert passed["device"] == s.spec.evaluation.device == "cpu"


def test_plain_cuda_names_the_device_a_model_moved_there_reports(monkeypatch):
    # `evaluation.device: cuda`: a model moved there reports cuda:0, which never equalled torch.device("cuda"), so
    # every score copied the model to the GPU again and `prepare` moved it again
    from autoprune.model.training import on_device, resolve_device, same_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1) and resolve_device("cuda:0") == torch.device("cuda", 0)
    assert same_device(torch.device("cuda", 1), resolve_device("cuda"))
    assert not same_device(torch.device("cuda", 0), resolve_device("cuda"))
    assert same_device(torch.device("cpu"), resolve_device("cpu"))
    assert not same_device(torch.device("cpu"), resolve_device("cuda"))
    model = torch.nn.Linear(2, 2)
    assert on_device(model, "cpu") is model
