"""Export stage: a physically smaller model as safe files, and loading it back.

An export directory holds ``model.pt`` (a state dict, loadable with ``weights_only=True``),
``manifest.json`` (factory, kwargs, input shape, pruning settings and the plan), ``costs.json`` and,
optionally, ``model.onnx``; a `transformers` model also gets ``hf/``, a `save_pretrained` directory that
`from_pretrained` reloads (see `autoprune.exporting.hf`). `load_pruned(dir)` rebuilds the base model from its factory, re-applies the
plan's structure, and loads the weights: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autoprune.exporting import hf as hfexport
from autoprune.costs.counting import cost_report
from autoprune.model.onnx import export_onnx
from autoprune.errors import AutopruneError
from autoprune.pruning.groups import PrunableModel
from autoprune.pruning.plan import PruningPlan
from autoprune.model.loading import build_model
from autoprune.model.task import to_device

MANIFEST_VERSION = 1
log = logging.getLogger(__name__)


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
    example: Any = None,
    task: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a pruned model and its manifest; returns the manifest.

    `example` is one batch of the model's inputs (a tensor, tuple or dict, from the data); it is saved as
    `example.pt` (tensors only, loadable with weights_only=True) so `load_pruned` can trace the model again.
    Without it the example is a random tensor of `model_spec["input_shape"]`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    if example is None:
        example = torch.randn(1, *model_spec["input_shape"])
    example = to_device(example, "cpu")
    torch.save(model.state_dict(), out / "model.pt")
    torch.save(example, out / "example.pt")
    costs = cost_report(model, example, base_costs).to_dict()
    manifest = {
        "version": MANIFEST_VERSION,
        "model": {k: model_spec.get(k) for k in ("factory", "kwargs", "input_shape")},
        "task": task or {},
        "pruning": {k: pruning[k] for k in ("ignore", "round_to", "mode", "criterion", "attention_heads") if k in pruning},
        "plan": plan.to_dict(),
        # which of the model's heads each attention kept where it reads per-head rows the model makes (BLOOM's
        # ALiBi): the state dict does not say, and the plan re-applied at load picks its heads on other weights
        "kept_heads": {n: {a: m.__dict__[a] for a in hfexport.KEPT_HEADS} for n, m in model.named_modules()
                       if "autoprune_heads" in m.__dict__},
        "costs": costs,
        "metrics": metrics or {},
        "files": ["model.pt", "example.pt", "manifest.json", "costs.json"],
    }
    (out / "costs.json").write_text(json.dumps(costs, indent=2))
    if onnx:
        notes: list[str] = []
        export_onnx(model, example, out / "model.onnx", notes)
        manifest["files"].append("model.onnx")
        if notes:
            manifest["notes"] = notes
            for n in notes:
                log.warning(n)
    if hfexport.is_hf(model):  # also a save_pretrained directory that from_pretrained reloads
        hfexport.save_pretrained(model, out / "hf")
        manifest["files"].append("hf/")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def load_pruned(export_dir: str | Path) -> nn.Module:
    """Rebuild a pruned model from an export directory (factory + plan structure + state dict)."""
    d = Path(export_dir)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except FileNotFoundError:
        raise AutopruneError(f"{d} is not an autoprune export (no manifest.json)") from None
    m, p = manifest["model"], manifest["pruning"]
    base = build_model(m["factory"], m["kwargs"])
    if (d / "example.pt").exists():
        example = torch.load(d / "example.pt", map_location="cpu", weights_only=True)
    else:  # exports from before example.pt
        example = torch.randn(1, *m["input_shape"])
    plan = PruningPlan.from_dict(manifest["plan"])
    # probed as the search probed it (heads, fused projections): the widths a plan gives depend on the multiples and
    # layouts the probes find, which do not depend on the weights; a GLM's reload failed without them
    pm = PrunableModel(base, example, ignore=p["ignore"], criterion="l1", round_to=p["round_to"],
                       mode=p["mode"], max_ratio=0.999, check_groups=p["mode"] == "structured",
                       attention_heads=p.get("attention_heads", "auto"))
    # which channels go does not matter here: the saved weights replace them; only the widths must match
    model = pm.apply(PruningPlan(plan.ratios, plan.mode, "l1", plan.round_to), check=False)
    for name, attrs in manifest.get("kept_heads", {}).items():
        model.get_submodule(name).__dict__.update(attrs)
    state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise AutopruneError(f"weights in {d / 'model.pt'} do not fit the plan's architecture: {str(e).splitlines()[0]}") from None
    return model.eval()
