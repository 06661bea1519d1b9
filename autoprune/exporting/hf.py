"""Export stage, Hugging Face side: a pruned `transformers` model that `save_pretrained` / `from_pretrained`
round-trip.

Transformers 5 has no per-layer head counts or widths in its configs (`prune_heads` and `config.pruned_heads`
are gone), so a pruned model's weights no longer fit the stock class. `save_pretrained(model, dir)` writes the
usual files plus the pruned widths in `config.json` (`autoprune_shapes`: module -> constructor sizes, and
attention attributes such as `num_attention_heads`) and a small `modeling_autoprune.py` whose class is the stock
class that resizes those modules after building; `auto_map` points the Auto classes at it. So

    AutoModel.from_pretrained(dir, trust_remote_code=True)      # any transformers install, no autoprune
    autoprune.exporting.hf.from_pretrained(dir)                      # no remote code: autoprune resizes the stock class

both give the pruned model with its weights. This is the `trust_remote_code` mechanism transformers documents
for custom architectures; nothing is pickled. Written by hand because neither transformers nor Torch-Pruning
record per-layer widths (Torch-Pruning's HF examples save whole pickled models).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autoprune._progress import bars_shown
from autoprune.errors import AutopruneError
from autoprune.pruning.attention import (LayerConfig, _alibi_of_kept_heads, _one_bias_for_all_heads,
                                         read_kept_alibi_rows, share_cross_attention_bias)
from autoprune.pruning.layers import FrozenBatchNorm, HFConv1D, in_width, out_width

SHAPES_KEY = "autoprune_shapes"
CODE_FILE = "modeling_autoprune.py"
# which of the model's heads an attention kept, where it reads per-head rows the model makes (`keep_alibi_heads`)
KEPT_HEADS = ("autoprune_heads", "autoprune_total_heads")
# integer attributes of attention (and similar) modules that follow the pruned widths (an experts module's
# intermediate size too: `pruning/experts.py`)
ATTRIBUTES = ("num_attention_heads", "all_head_size", "attention_head_size", "num_heads", "head_dim", "embed_dim",
              "num_key_value_heads", "num_key_value_groups", "hidden_size", "intermediate_size", "inner_dim",
              "split_size", "n_heads", "num_kv_heads", "intermediate_dim", "expert_dim")


def is_hf(model: nn.Module) -> bool:
    """Whether `model` is a `transformers.PreTrainedModel` (without importing transformers when absent)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def _module_sizes(m: nn.Module) -> dict[str, Any] | None:
    """The constructor sizes of a resizable layer, or None for anything else."""
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    if isinstance(m, nn.modules.conv._ConvNd):
        return {"type": type(m).__name__, "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {"type": type(m).__name__, "num": m.num_features}
    if isinstance(m, nn.LayerNorm):
        return {"type": "LayerNorm", "shape": list(m.normalized_shape)}
    if isinstance(m, nn.Embedding):
        return {"type": "Embedding", "num": m.num_embeddings, "dim": m.embedding_dim}
    if isinstance(m, HFConv1D):  # GPT-2's linear layer, weight [in, out]
        return {"type": "Conv1D", "in": in_width(m), "out": out_width(m)}
    if isinstance(m, FrozenBatchNorm):  # a detector backbone's BatchNorm, its per-channel tensors buffers
        return {"type": "FrozenBatchNorm", "num": m.running_mean.shape[0]}
    return None


def pruned_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module whose sizes or attention attributes differ from the stock model its config builds."""
    with torch.device("meta"):
        stock = type(model)(model.config)
    ref = dict(stock.named_modules())
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        r = ref.get(name)
        if r is None:
            raise AutopruneError(f"module {name!r} of the pruned model is not in a stock {type(model).__name__}; "
                                 "the pruned model cannot be described by its config")
        entry: dict[str, Any] = {}
        sizes = _module_sizes(m)
        if sizes is not None and sizes != _module_sizes(r):
            entry["sizes"] = sizes
        if sizes is None:  # parameters a module owns directly (a ViT's cls_token, position_embeddings)
            own = {k: list(v.shape) for k, v in m.named_parameters(recurse=False)}
            ref_own = {k: list(v.shape) for k, v in r.named_parameters(recurse=False)}
            if own != ref_own:
                entry["parameters"] = {k: v for k, v in own.items() if ref_own.get(k) != v}
        attrs = {a: getattr(m, a) for a in ATTRIBUTES
                 if isinstance(getattr(m, a, None), int) and getattr(m, a) != getattr(r, a, None)}
        attrs.update({a: m.__dict__[a] for a in KEPT_HEADS if a in m.__dict__})  # (BLOOM's heads' ALiBi rows)
        if attrs:
            entry["attributes"] = attrs
        layer_config = m.__dict__.get("config")
        if isinstance(layer_config, LayerConfig):  # a layer's own head counts (Phi-3's attention)
            entry["config"] = dict(layer_config._own)
        if entry:
            out[name] = entry
    return out


def apply_shapes(model: nn.Module, shapes: dict) -> nn.Module:
    """Resize `model`'s modules to `shapes` (written by autoprune's `pruned_shapes`): its layers resized in place
    to the pruned sizes, directly owned parameters of the pruned shapes (values come from the checkpoint), the
    attention attributes, and a layer's own config values (`LayerConfig`); T5-style cross-attentions take a position
    bias of another head count (`share_cross_attention_bias`), ALiBi attentions their kept heads' rows
    (`read_kept_alibi_rows`). Copied into modeling_autoprune.py, with `LayerConfig` and those two."""
    import torch.nn as nn  # the copy in modeling_autoprune.py runs without autoprune

    for name, entry in shapes.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, leaf) if leaf else model
        s = entry.get("sizes")
        if s:
            # resized in place, not rebuilt: a subclass keeps what it adds and its own constructor's meaning
            # (ConvNeXt's channels-first LayerNorm, OPT's position embedding with its offset and own forward,
            # which a plain nn.Embedding had replaced)
            def fresh(t, shape):  # values come from the checkpoint
                if t is None or shape is None:
                    return t
                new_t = t.new_empty(shape)
                return nn.Parameter(new_t, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new_t

            kind = s["type"]  # told apart by class, not name: EfficientNet's depthwise conv is a Conv2d subclass
            if isinstance(old, nn.Linear):
                old.in_features, old.out_features = s["in"], s["out"]
                want = {"weight": [s["out"], s["in"]], "bias": [s["out"]]}
            elif isinstance(old, nn.modules.conv._ConvNd):
                old.in_channels, old.out_channels, old.groups = s["in"], s["out"], s["groups"]
                w = [s["in"], s["out"] // s["groups"]] if old.transposed else [s["out"], s["in"] // s["groups"]]
                want = {"weight": w + list(old.kernel_size), "bias": [s["out"]]}
            elif isinstance(old, nn.modules.batchnorm._BatchNorm) or kind == "FrozenBatchNorm":  # (frozen: buffers)
                if isinstance(getattr(old, "num_features", None), int):
                    old.num_features = s["num"]
                want = {k: [s["num"]] for k in ("weight", "bias", "running_mean", "running_var")}
            elif isinstance(old, nn.LayerNorm):
                old.normalized_shape = tuple(s["shape"])
                want = {"weight": list(s["shape"]), "bias": list(s["shape"])}
            elif isinstance(old, nn.Embedding):
                old.num_embeddings, old.embedding_dim = s["num"], s["dim"]
                want = {"weight": [s["num"], s["dim"]]}
            elif kind == "Conv1D":  # transformers' GPT-2 linear layer: weight [in, out], widths nx and nf
                old.nx, old.nf = s["in"], s["out"]
                want = {"weight": [s["in"], s["out"]], "bias": [s["out"]]}
            else:
                raise ValueError(f"cannot resize {name} ({kind})")
            for tname, shape in want.items():
                slots = old._parameters if tname in old._parameters else old._buffers
                if tname in slots:
                    slots[tname] = fresh(slots[tname], shape)
        target = model.get_submodule(name) if name else model
        for pname, shape in entry.get("parameters", {}).items():
            old_p = getattr(target, pname)
            setattr(target, pname, nn.Parameter(old_p.new_empty(shape), requires_grad=old_p.requires_grad))
        for attr, value in entry.get("attributes", {}).items():
            setattr(target, attr, value)
        if entry.get("config"):  # the layer reads these from its config (Phi-3's query head count)
            target.config = LayerConfig(target.config, **entry["config"])
    for m in model.modules():
        if isinstance(m.__dict__.get("n_heads"), int):  # T5's later cross-attentions read the first one's bias
            share_cross_attention_bias(m)
        if "autoprune_heads" in m.__dict__:  # BLOOM's attentions read their kept heads' ALiBi rows
            read_kept_alibi_rows(m)
    return model


_TEMPLATE = '''"""A pruned {base} written by autoprune: the stock class with the per-layer widths in config.json
("{key}"). Load with AutoModel.from_pretrained(<dir>, trust_remote_code=True) or {cls}.from_pretrained(<dir>)."""

from typing import Any

import torch
import torch.nn as nn
import transformers

_Base = getattr(transformers, "{base}")


{layer_config}

{shared_bias}

{apply}

class {cls}(_Base):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_shapes(self, getattr(config, "{key}", None) or {{}})
'''


def _auto_classes(model: nn.Module) -> list[str]:
    """The Auto classes that build `model`'s class (AutoModel, AutoModelForCausalLM, ...), with AutoModel always
    among them: each Auto class of transformers whose mapping names this model type's class as `model`'s.

    Read from the Auto classes' own mappings, not spelled from the mapping constants' names: "FOR_CAUSAL_LM"
    spelled "AutoModelForCausalLm", which does not exist, so a pruned Llama's auto_map had no
    AutoModelForCausalLM and `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` built the stock
    class and refused the pruned weights."""
    import transformers

    want, kind = type(model).__name__, model.config.model_type
    found = ["AutoModel"]
    for name in dir(transformers):
        if not name.startswith("AutoModel") or name in found:
            continue
        try:
            names = getattr(getattr(transformers, name), "_model_mapping")._model_mapping
        except Exception:  # noqa: BLE001 - not an Auto class with a mapping
            continue
        got = names.get(kind) if isinstance(names, dict) else None
        if got == want or (isinstance(got, (tuple, list)) and want in got):
            found.append(name)
    return found


@contextlib.contextmanager
def _hf_bars():
    """transformers' own progress bars ("Writing model shards", "Loading weights") follow autoprune's: shown on a
    terminal or with AUTOPRUNE_PROGRESS=1, never in a log or under AUTOPRUNE_PROGRESS=0."""
    from transformers.utils import logging as hf_logging

    hide = hf_logging.is_progress_bar_enabled() and not bars_shown()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def save_pretrained(model: nn.Module, out_dir: str | Path) -> Path:
    """`model.save_pretrained(out_dir)` with the pruned widths in its config and the class that rebuilds them."""
    if not is_hf(model):
        raise AutopruneError(f"{type(model).__name__} is not a transformers PreTrainedModel; export it with "
                             "autoprune.exporting.files (model.pt + manifest) instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = type(model).__name__
    cls = f"Autopruned{base}"
    shapes = pruned_shapes(model)
    code = _TEMPLATE.format(base=base, cls=cls, key=SHAPES_KEY, apply=inspect.getsource(apply_shapes),
                            layer_config=inspect.getsource(LayerConfig),
                            shared_bias="\n\n".join(inspect.getsource(f) for f in (
                                _one_bias_for_all_heads, share_cross_attention_bias, _alibi_of_kept_heads,
                                read_kept_alibi_rows)))
    (out / CODE_FILE).write_text(code)
    config = model.config
    old = {k: getattr(config, k, None) for k in (SHAPES_KEY, "auto_map")}
    setattr(config, SHAPES_KEY, shapes)
    config.auto_map = {auto: f"{CODE_FILE[:-3]}.{cls}" for auto in _auto_classes(model)}
    try:
        with _hf_bars():
            model.save_pretrained(out)
    finally:
        for k, v in old.items():
            if v is None and hasattr(config, k):
                delattr(config, k)
            elif v is not None:
                setattr(config, k, v)
    return out


def from_pretrained(path: str | Path, **kwargs) -> nn.Module:
    """Load a directory written by `save_pretrained` without remote code: the stock class from the config's
    `architectures`, resized to the recorded widths, then the weights."""
    import transformers

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise AutopruneError(f"{path} has no config.json; is it a save_pretrained directory?")
    arch = (json.loads(cfg_file.read_text()).get("architectures") or [None])[0]
    cls = getattr(transformers, str(arch).removeprefix("Autopruned"), None)
    if cls is None:
        raise AutopruneError(f"{path}/config.json names architecture {arch!r}, which transformers does not have")
    if not list(path.glob("*.safetensors")):
        raise AutopruneError(f"{path} has no .safetensors weights")

    def __init__(self, config, *args, **kw):  # the stock class, resized as soon as it is built
        cls.__init__(self, config, *args, **kw)
        apply_shapes(self, getattr(config, SHAPES_KEY, None) or {})

    # transformers' own loading (checkpoint key conversions, tied weights, dtype), on the resized class
    resized = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    with _hf_bars():
        model, info = resized.from_pretrained(path, output_loading_info=True, **kwargs)
    bad = {k: list(v)[:3] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise AutopruneError(f"{path}: the weights do not fit the recorded widths ({bad})")
    model.__class__ = cls  # the subclass only added the resize at build time
    return model.eval()
