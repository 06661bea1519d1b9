"""A model to ONNX, with tensor, tuple or dict inputs: what the export writes and what the device agent runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autoprune.errors import AutopruneError


def export_onnx(model: nn.Module, example: Any, path: str | Path) -> Path:
    """ONNX via the TorchScript exporter (dynamo=False needs no onnxscript); a clear error on unsupported ops.
    A dict example becomes named ONNX inputs (its keys), a tuple positional ones."""
    try:
        if isinstance(example, torch.Tensor):
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17)
        elif isinstance(example, dict):
            names = list(example)
            torch.onnx.export(model, (), str(path), kwargs=dict(example), dynamo=False, input_names=names,
                              dynamic_axes={n: {0: "batch"} for n in names}, opset_version=17)
        else:
            torch.onnx.export(model, tuple(example), str(path), dynamo=False, opset_version=17)
    except Exception as e:
        raise AutopruneError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             "export without ONNX (--no-onnx) or replace the unsupported op") from None
    return Path(path)
