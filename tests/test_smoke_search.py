"""End-to-end smoke test of the main path: search at a budget, result file, export, reload."""

import json

import torch

from autoprune.app import api
from autoprune.exporting.files import load_pruned


def test_search_meets_budget_and_exports(make_spec, tmp_path):
    spec = make_spec("cnn1d", budget={"macs": 0.5}, search={"n_trials": 6})
    result = api.search(spec, show_progress=False)
    best = result["best"]
    assert result["n_trials_complete"] == 6
    assert best["macs_ratio"] <= 0.5
    assert best["measured_cost"] <= result["budget"]["limit"]
    assert 0.1 < best["metric_val"] <= 1.0
    out = api.export(spec, out=tmp_path / "exp", onnx=False, show_progress=False)
    model = load_pruned(out)
    y = model(torch.randn(3, 1, 40))
    assert y.shape == (3, 10)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["costs"]["macs"] <= result["budget"]["limit"]
