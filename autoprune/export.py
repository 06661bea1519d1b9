"""Export stage: a physically smaller model as safe files, and loading it back.

An export directory holds ``model.pt`` (a state dict, loadable with ``weights_only=True``),
``manifest.json`` (factory, kwargs, input shape, pruning settings and the plan), ``costs.json`` and,
optionally, ``model.onnx``. `load_pruned(dir)` rebuilds the base model from its factory, re-applies the
plan's structure, and loads the weights: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autoprune.costs import cost_report
from autoprune.errors import AutopruneError
from autoprune.groups import PrunableModel
from autoprune.plan import PruningPlan
from autoprune.target import build_model

MANIFEST_VERSION = 1


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    plan: PruningPlan,
    model_spec: dict[str, Any],
    pruning: dict[str, Any],
    base_costs=None,
    metrics: dict[str, float] | None = None,
    onnx: bool = True,
) -> dict[str, Any]:
    """Write a pruned model and its manifest; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    example = torch.randn(1, *model_spec["input_shape"])
    torch.save(model.state_dict(), out / "model.pt")
    costs = cost_report(model, example, base_costs).to_dict()
    manifest = {
        "version": MANIFEST_VERSION,
        "model": {k: model_spec[k] for k in ("factory", "kwargs", "input_shape")},
        "pruning": {k: pruning[k] for k in ("ignore", "round_to", "mode", "criterion")},
        "plan": plan.to_dict(),
        "costs": costs,
        "metrics": metrics or {},
        "files": ["model.pt", "manifest.json", "costs.json"],
    }
    (out / "costs.json").write_text(json.dumps(costs, indent=2))
    if onnx:
        export_onnx(model, example, out / "model.onnx")
        manifest["files"].append("model.onnx")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """ONNX via the TorchScript exporter (dynamo=False needs no onnxscript); a clear error on unsupported ops."""
    try:
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17)
    except Exception as e:
        raise AutopruneError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             "export without ONNX (--no-onnx) or replace the unsupported op") from None
    return Path(path)


def load_pruned(export_dir: str | Path) -> nn.Module:
    """Rebuild a pruned model from an export directory (factory + plan structure + state dict)."""
    d = Path(export_dir)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except FileNotFoundError:
        raise AutopruneError(f"{d} is not an autoprune export (no manifest.json)") from None
    m, p = manifest["model"], manifest["pruning"]
    base = build_model(m["factory"], m["kwargs"])
    example = torch.randn(1, *m["input_shape"])
    plan = PruningPlan.from_dict(manifest["plan"])
    pm = PrunableModel(base, example, ignore=p["ignore"], criterion="l1", round_to=p["round_to"],
                       mode=p["mode"], check_groups=False, max_ratio=0.999)
    # which channels go does not matter here: the saved weights replace them; only the widths must match
    model = pm.apply(PruningPlan(plan.ratios, plan.mode, "l1", plan.round_to), check=False)
    state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise AutopruneError(f"weights in {d / 'model.pt'} do not fit the plan's architecture: {str(e).splitlines()[0]}") from None
    return model.eval()
