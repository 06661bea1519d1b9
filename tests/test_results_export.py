"""result.json contents, load() DataFrames, export files and exact reload."""

from __future__ import annotations

import json

import onnx
import torch

from autoprune.app import api
from autoprune.exporting.files import load_pruned


def test_result_json_export_and_reload(make_spec, tmp_path):
    spec = make_spec("cnn1d", budget={"macs": 0.5}, search={"n_trials": 6})
    result = api.search(spec, show_progress=False)
    from autoprune.spec import load_spec

    run_dir = load_spec(spec).run_dir
    on_disk = json.loads((run_dir / "result.json").read_text())
    for key in ("budget", "baseline", "best", "pareto", "n_trials_complete", "n_trials_failed", "strategy"):
        assert key in on_disk
    assert on_disk["n_trials_complete"] == 6 and on_disk["n_trials_failed"] == 0
    assert set(on_disk["baseline"]) >= {"macs", "params", "metric"}
    best = on_disk["best"]
    assert set(best) >= {"plan", "macs", "macs_ratio", "params", "metric", "trial"}
    assert best["measured_cost"] == best["macs"] <= on_disk["budget"]["limit"]
    assert on_disk["pareto"] and all(p["macs_ratio"] <= 0.5 + 1e-9 for p in on_disk["pareto"])
    assert max(p["metric"] for p in on_disk["pareto"]) == best["metric"]

    runs = api.load(run_dir)
    assert len(runs.trials[runs.trials.state == "COMPLETE"]) == 6
    assert runs.summary().loc[0, "metric_val"] == best["metric_val"]

    # resume with a larger --n-trials: the complete count reaches n
    result2 = api.search(spec, n_trials=9, show_progress=False, test=False)
    assert result2["n_trials_complete"] == 9

    out = api.export(spec, out=tmp_path / "exp", onnx=True, show_progress=False)
    for f in ("model.pt", "manifest.json", "costs.json", "model.onnx"):
        assert (out / f).exists()
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    costs = json.loads((out / "costs.json").read_text())
    assert costs["macs"] <= result["budget"]["limit"]
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    model = load_pruned(out)
    # the exported weights are exactly those of the model rebuilt from the plan
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(5, 1, 40)
    session = api.session(spec, show_progress=False)
    from autoprune.pruning.plan import PruningPlan

    ref = session.pruner.apply(PruningPlan.from_dict(json.loads((out / "manifest.json").read_text())["plan"]))
    session.evaluator.prepare(ref)
    assert torch.allclose(model(x), ref.eval()(x), atol=1e-6)
