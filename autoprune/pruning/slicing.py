"""Cutting one layer's channels: Torch-Pruning's own pruning function, with a shorter path for the plain layers.

Why by hand: applying a plan cuts every layer it touches (~40 cuts for ResNet-20, every trial). Torch-Pruning's
functions are exact but general: each builds its kept-index list through Python sets and a fresh index tensor
per parameter (a BatchNorm builds three, and indexes its running stats with a Python list), and sets every new
tensor through `nn.Module.__setattr__`. For the layer types below, when Torch-Pruning's own pruner class would
handle them, `cut` does the same slicing with one index tensor and direct parameter/buffer slots: the same
shapes, values and attributes (tests compare both on every zoo model), about twice as fast. Anything else (grouped
and depthwise convs, transposed convs, parametrized or gradient-carrying weights, subclasses, other pruners) goes
to Torch-Pruning's function unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

_F = tp.pruner.function
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _keep(n: int, idxs: Sequence[int]) -> torch.Tensor:
    return _keep_cached(n, tuple(idxs))


@functools.lru_cache(maxsize=4096)
def _keep_cached(n: int, idxs: tuple[int, ...]) -> torch.Tensor:
    """The kept positions of a width-`n` layer that loses `idxs`: a layer keeps its cut from trial to trial as
    long as its group's does, so most trials rebuild nothing. The tensor is shared: index_select only reads it."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[list(idxs)] = False
    return mask.nonzero().flatten()


def _plain_params(m: nn.Module, names: tuple[str, ...], copy: bool = False) -> bool:
    """Every named parameter is a plain, gradient-free nn.Parameter in the module's own slot (no parametrization).
    `copy`: the module is a copy, whose parameters carry no gradient (`clone_module` drops them) or stand for
    the copies it would have made (`PrunableModel.apply`): their `.grad` is not looked at."""
    for k in names:
        p = m._parameters.get(k)
        if p is not None and (type(p) is not nn.Parameter or (p.grad is not None and not copy)):
            return False
    # (torch keeps a parametrization's modules in `_modules`: looked up there, without nn.Module.__getattr__'s
    # AttributeError for the usual module that has none)
    return not (m._modules.get("parametrizations") or m.__dict__.get("parametrizations"))


def _slice(m: nn.Module, name: str, keep: torch.Tensor, dim: int) -> None:
    p = m._parameters[name]
    if p is not None:
        src = p.detach() if torch.is_grad_enabled() else p  # (no view needed where no graph is recorded)
        m._parameters[name] = nn.Parameter(src.index_select(dim, keep), requires_grad=p.requires_grad)


def fast_kind(module: nn.Module, handler: Any, copy: bool = False) -> str | None:
    """Which of `cut`'s own paths slices `module` for Torch-Pruning's `handler` ("dense", "bn", "ln"), or None
    when Torch-Pruning's function does. On these paths every tensor the cut touches is replaced by a new one,
    never written in place (what lets `PrunableModel.apply` skip copying them first). `copy`: see `_plain_params`."""
    owner, fn = type(getattr(handler, "__self__", None)), getattr(handler, "__name__", "")
    if fn not in ("prune_out_channels", "prune_in_channels"):
        return None
    t = type(module)
    if (owner is _F.ConvPruner and t in _CONV and module.groups == 1 and not module.transposed) or \
            (owner is _F.LinearPruner and t is nn.Linear):
        return "dense" if _plain_params(module, ("weight", "bias"), copy) else None
    if owner is _F.BatchnormPruner and t in _BN and _plain_params(module, ("weight", "bias"), copy):
        return "bn"
    if owner is _F.LayernormPruner and t is nn.LayerNorm and len(module.normalized_shape) == 1 \
            and getattr(handler.__self__, "pruning_dim", -1) == -1 and _plain_params(module, ("weight", "bias"), copy):
        return "ln"
    return None


_UNKNOWN = object()


def cut(module: nn.Module, handler: Any, idxs: Sequence[int], copy: bool = False, kind: Any = _UNKNOWN) -> None:
    """Remove channels `idxs` of `module` the way Torch-Pruning's `handler` (a bound pruning function) would
    (`copy`: `module` is a copy being made, see `_plain_params`; `kind`: `fast_kind(module, handler, copy)` when
    the caller knows it already)."""
    if not idxs:
        kind = None
    elif kind is _UNKNOWN:
        kind = fast_kind(module, handler, copy)
    if kind == "dense":
        out = handler.__name__ == "prune_out_channels"
        width = ("out_channels" if out else "in_channels") if type(module) in _CONV else \
            ("out_features" if out else "in_features")
        keep = _keep(getattr(module, width), idxs)
        _slice(module, "weight", keep, 0 if out else 1)  # (out, in, *kernel): a conv and a linear alike
        if out:
            _slice(module, "bias", keep, 0)
        module.__dict__[width] = len(keep)  # a plain int attribute: what nn.Module.__setattr__ ends up doing
    elif kind == "bn":
        keep = _keep(module.num_features, idxs)  # in and out channels are the same for a BatchNorm
        module.__dict__["num_features"] = len(keep)
        if module.track_running_stats:
            for b in ("running_mean", "running_var"):
                module._buffers[b] = module._buffers[b].index_select(0, keep)
        if module.affine:
            _slice(module, "weight", keep, 0)
            _slice(module, "bias", keep, 0)
    elif kind == "ln":
        keep = _keep(module.normalized_shape[0], idxs)
        if module.elementwise_affine:
            _slice(module, "weight", keep, 0)
            _slice(module, "bias", keep, 0)
        module.__dict__["normalized_shape"] = (len(keep),)
    else:
        handler(module, list(idxs))
