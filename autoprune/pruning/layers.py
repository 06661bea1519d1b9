"""Layer types Torch-Pruning has no pruning functions for, and autoprune's functions for them.

Torch-Pruning takes a layer type's pruning functions from the caller (`customized_pruners`); these are written
here because it ships none for them and no other library does:

- `HFConv1D`: `transformers`' `Conv1D`, GPT-2's linear layer (weight stored [in, out]); GPT-2 could not be traced.
- `FrozenBatchNorm`: a frozen BatchNorm whose per-channel tensors are buffers (DETR's backbone, torchvision's
  `FrozenBatchNorm2d`); every conv feeding one was left intact.

Both are matched by class (name and module), without importing `transformers` or torchvision."""

from __future__ import annotations

import abc

import torch
import torch.nn as nn
import torch_pruning as tp


class HFConv1D(abc.ABC):
    """`transformers.pytorch_utils.Conv1D` (GPT-2's linear layer, weight stored [in, out]), matched by class
    without importing `transformers` (`isinstance(m, HFConv1D)`)."""

    @classmethod
    def __subclasshook__(cls, C):
        return any(k.__name__ == "Conv1D" and k.__module__ == "transformers.pytorch_utils" for k in C.__mro__) \
            or NotImplemented


class Conv1DPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning's pruning functions for `HFConv1D`, which it has none for: a linear layer whose weight is
    stored transposed ([in, out]), its widths in `nx` (in) and `nf` (out). Written here because Torch-Pruning
    takes a layer type's functions from the caller (`customized_pruners`) and ships none for it."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[1])) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if hasattr(layer, "nx"):
            layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]


class FrozenBatchNorm(abc.ABC):
    """A frozen BatchNorm (`transformers`' DETR-family `*FrozenBatchNorm2d`, torchvision's `FrozenBatchNorm2d`): its
    per-channel `weight`, `bias`, `running_mean` and `running_var` are buffers, not parameters. Matched by class
    name, without importing either library."""

    @classmethod
    def __subclasshook__(cls, C):
        return any(k.__name__.endswith("FrozenBatchNorm2d") for k in C.__mro__) or NotImplemented


class FrozenBatchNormPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning's pruning functions for `FrozenBatchNorm`, which it has none for: a detector's backbone (DETR's
    ResNet) was locked whole, every conv feeding one left intact. In and out channels are the same channels."""

    _BUFFERS = ("weight", "bias", "running_mean", "running_var")

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = torch.tensor(sorted(set(range(self.get_out_channels(layer))) - set(idxs)), dtype=torch.long)
        for b in self._BUFFERS:  # new tensors, never written in place (the base's stay as they were)
            t = layer._buffers.get(b)
            if t is not None:
                layer._buffers[b] = t.index_select(0, keep.to(t.device))
        if isinstance(getattr(layer, "num_features", None), int):
            layer.num_features = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.running_mean.shape[0]

    get_in_channels = get_out_channels


def custom_pruners(model: nn.Module) -> dict[type, tp.pruner.function.BasePruningFunc]:
    """`customized_pruners` for Torch-Pruning's `build_dependency`: this module's functions for each such layer
    type in `model`."""
    out: dict[type, tp.pruner.function.BasePruningFunc] = {}
    for m in model.modules():
        if isinstance(m, HFConv1D):
            out.setdefault(type(m), Conv1DPruner())
        elif isinstance(m, FrozenBatchNorm) and isinstance(m._buffers.get("running_mean"), torch.Tensor):
            out.setdefault(type(m), FrozenBatchNormPruner())
    return out


# the layers a group can be rooted at (their output channels are the group's)
ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, HFConv1D)


def out_width(m: nn.Module) -> int:
    """The output channels of a `ROOT_TYPES` layer."""
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, HFConv1D):
        return m.weight.shape[1]
    return m.out_channels


def in_width(m: nn.Module) -> int:
    """The input channels of a `ROOT_TYPES` layer."""
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, HFConv1D):
        return m.weight.shape[0]
    return m.in_channels
