"""A model to ONNX, with tensor, tuple or dict inputs: what the export writes and what the device agent runs."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autoprune.errors import AutopruneError
from autoprune.model.task import tensors_of


def export_onnx(model: nn.Module, example: Any, path: str | Path, notes: list[str] | None = None) -> Path:
    """ONNX via the TorchScript exporter (dynamo=False needs no onnxscript); a clear error on unsupported ops.
    A dict example becomes named ONNX inputs (its keys), a tuple positional ones.

    Given `notes` (the export), a bfloat16 model the exporter fails on is exported in float32 instead (a copy), and
    `notes` says so: the TorchScript exporter fails on a bfloat16 BERT ("ScalarType ComplexDouble is an unexpected
    tensor scalar type"), and transformers 5 loads a checkpoint in its stored dtype, often bfloat16, by default.
    Without `notes` (the agent, which times the file) the error stands: a float32 file would time another model."""
    why = _attempt(model, example, path)
    if why is not None and notes is not None and any(p.dtype == torch.bfloat16 for p in model.parameters()):
        why_float = _attempt(copy.deepcopy(model).float(), _bf16_to_float(example), path)
        if why_float is None:
            notes.append(f"model.onnx is in float32: the bfloat16 model's export failed ({why})")
            return Path(path)
        why = why_float  # float32 fails too: its own error
    if why is not None:
        raise AutopruneError(f"ONNX export failed ({why}); export without ONNX (--no-onnx) or replace the "
                             "unsupported op")
    return Path(path)


def _bf16_to_float(obj: Any) -> Any:
    """`obj` (a tensor, or a dict, tuple or list of them) with its bfloat16 tensors in float32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype == torch.bfloat16 else obj
    if isinstance(obj, dict):
        return {k: _bf16_to_float(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_bf16_to_float(v) for v in obj)
    return obj


@contextlib.contextmanager
def _eager_grouped_attention(model: nn.Module):
    """A `transformers` model with grouped-query attention (Llama, Qwen2, Mistral with fewer key/value heads than
    query heads) run by SDPA is switched to its eager attention meanwhile (keys and values repeated per query head:
    the same computation), and back. The TorchScript exporter has no conversion of SDPA's grouped mode
    ("conversion of scaled_dot_product_attention not implemented if enable_gqa is True"), unpruned or pruned."""
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    grouped = any(isinstance(getattr(m, "num_key_value_groups", None), int) and m.num_key_value_groups > 1
                  for m in model.modules())
    if old != "sdpa" or not grouped or not callable(getattr(model, "set_attn_implementation", None)):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def _attempt(model: nn.Module, example: Any, path: str | Path) -> str | None:
    """Write `model` as ONNX to `path` (grouped-query attention switched to eager meanwhile); None when it worked,
    else why not (the exception's type and first line)."""
    try:
        with _eager_grouped_attention(model):
            _export(model, example, path)
    except Exception as e:  # noqa: BLE001 - said by the caller, with what to do about it
        return f"{type(e).__name__}: {_first_line(e)}"
    return None


def _export(model: nn.Module, example: Any, path: str | Path) -> None:
    if isinstance(example, torch.Tensor):
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17)
    elif isinstance(example, dict):
        names = list(example)
        axes = {n: {0: "batch"} for n in names}
        try:
            torch.onnx.export(model, (), str(path), kwargs=dict(example), dynamo=False, input_names=names,
                              dynamic_axes=axes, opset_version=17)
        except Exception as first:  # noqa: BLE001 - retried below, raised if the retry fails too
            # the exporter passes keyword inputs positionally, which a forward whose decorators add keywords of
            # their own rejects (GPT-2: "got multiple values for argument 'use_cache'"), and it takes no
            # `Cache` among the outputs (GPT-2's LM head model): the same inputs by name through a wrapper, its
            # outputs' tensors as a tuple
            try:
                torch.onnx.export(_ByName(model, names), tuple(example.values()), str(path), dynamo=False,
                                  input_names=names, dynamic_axes=axes, opset_version=17)
            except Exception as second:  # noqa: BLE001 - both errors are said: the second is often the op
                raise RuntimeError(f"{type(first).__name__}: {_first_line(first)}; and through a wrapper taking "
                                   f"the inputs by name: {type(second).__name__}: {_first_line(second)}") from None
    else:
        torch.onnx.export(model, tuple(example), str(path), dynamo=False, opset_version=17)


class _ByName(nn.Module):
    """`model(**dict(zip(names, args)))`, returning the output's tensors as a tuple (a `transformers` output with a
    key/value cache flattened): what the TorchScript exporter can trace for a model that takes keyword inputs only."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names
        # in the model's mode: the exporter restores the wrapper's mode afterwards, and with it the model's
        # (a new module is in training mode, which left the exported model with its dropout on)
        self.training = model.training

    def forward(self, *args):
        return tuple(tensors_of(self.model(**dict(zip(self.names, args)))))


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""
