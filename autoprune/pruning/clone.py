"""A copy of a module tree that means what `copy.deepcopy` means, in a fraction of its time.

Why by hand: every trial applies its plan to a fresh copy of the trained model, and `copy.deepcopy` walks each
module's ~18 bookkeeping containers (hook dicts, buffer sets) through `__reduce_ex__`: 14-20 ms for ResNet-20,
a quarter of a whole trial whose evaluation takes 57 ms. Neither torch nor Torch-Pruning offers a faster
structural copy (`torch.func.stack_module_state` / `functional_call` share the module objects). `clone_module`
walks the same tree with the same memo (shared parameters and submodules stay shared, tied weights stay tied)
and takes fast paths only for the types it knows: modules that keep nn.Module's own pickling protocol, tensors
(their own `__deepcopy__`), plain containers and atomic values. Everything else (a `transformers` config, a
module class with its own `__deepcopy__` or `__reduce_ex__`, a ScriptModule) goes to `copy.deepcopy` with the
same memo, so the result is a deepcopy wherever this file does not know better.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Iterable

import torch
import torch.nn as nn

_ATOMIC = frozenset({type(None), bool, int, float, complex, str, bytes, type, torch.dtype, torch.device,
                     torch.layout, torch.memory_format, range, type(Ellipsis), type(NotImplemented)})
# what decides how deepcopy rebuilds an object; a module's own __getstate__/__setstate__ (Conv2d has one) is
# called here exactly as deepcopy calls it, so only these make a module class take the slow, exact path
_OWN_PROTOCOL = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getnewargs__", "__getnewargs_ex__", "__slots__")
_plain: dict[type, bool] = {}
_MODULE_SETSTATE = nn.Module.__setstate__


def _plain_module(cls: type) -> bool:
    """True when `cls` copies exactly like nn.Module (no class between them overrides the pickling protocol)."""
    ok = _plain.get(cls)
    if ok is None:
        ok = issubclass(cls, nn.Module) and not issubclass(cls, torch.jit.ScriptModule) and all(
            getattr(cls, name, None) is getattr(nn.Module, name, None) for name in _OWN_PROTOCOL)
        _plain[cls] = ok
    return ok


def clone_module(module: nn.Module, share: Iterable[torch.Tensor] = (), memo: dict[int, Any] | None = None) -> nn.Module:
    """`copy.deepcopy(module)`, faster on the module tree itself (see the module docstring).

    `share`: tensors the copy refers to as they are instead of copying them (wherever they appear), for a caller
    that replaces every one of them right after (`PrunableModel.apply` cuts them); the caller owns that promise.
    `memo`: a dict that receives, as `copy.deepcopy`'s does, ``id(original) -> copy`` for everything copied."""
    memo = {} if memo is None else memo
    memo.update((id(t), t) for t in share)
    return _clone(module, memo)


def copy_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor's copy as `clone_module` makes it (a parameter stays a parameter, with its requires_grad)."""
    return _clone(t, {})


def _clone(v: Any, memo: dict[int, Any]) -> Any:
    cls = type(v)
    if cls in _ATOMIC:
        return v
    hit = memo.get(id(v), memo)
    if hit is not memo:
        return hit
    if cls is dict or cls is OrderedDict:
        if not v:
            return cls()
        out = cls()
        memo[id(v)] = out
        for k, x in v.items():
            out[k if type(k) is str else _clone(k, memo)] = _clone(x, memo)
        return out
    if cls is nn.Parameter:  # exactly Parameter.__deepcopy__ (which keeps neither .grad nor attributes), inlined
        out = nn.Parameter(v.data.clone(memory_format=torch.preserve_format), v.requires_grad)
        memo[id(v)] = out
        return out
    if cls is torch.Tensor:
        # a buffer: 3x faster than Tensor.__deepcopy__; anything unusual (a .grad, attributes set on the tensor,
        # a non-leaf, sparse or quantized storage) goes to torch's own deepcopy
        if v.grad is None and v.is_leaf and v.layout is torch.strided and not v.is_quantized and not v.__dict__:
            out = v.detach().clone().requires_grad_(v.requires_grad)
            memo[id(v)] = out
            return out
        return v.__deepcopy__(memo)
    if _plain_module(cls):
        new = cls.__new__(cls)
        memo[id(v)] = new
        copy._keep_alive(v, memo)  # type: ignore[attr-defined]  # as deepcopy does: `v` outlives the memo
        state = {}
        for k, x in v.__getstate__().items():  # ~18 entries a module, most empty hook dicts or plain values
            t = type(x)
            if t in _ATOMIC:
                state[k] = x
            elif (t is OrderedDict or t is dict or t is set) and not x:
                state[k] = t()
            elif t is tuple and all(type(i) in _ATOMIC for i in x):  # (kernel_size, stride, ...): kept, as below
                state[k] = x
            else:
                state[k] = _clone(x, memo)
        if cls.__setstate__ is _MODULE_SETSTATE:  # what it does, minus checks for attributes old pickles lacked
            new.__dict__.update(state)
        else:
            new.__setstate__(state)
        return new
    if cls is tuple:  # (kernel_size, stride, ...): deepcopy returns the tuple itself when every item is kept
        items = [_clone(x, memo) for x in v]
        out = v if all(a is b for a, b in zip(items, v)) else tuple(items)
        memo[id(v)] = out
        return out
    if cls is list:
        out = []
        memo[id(v)] = out
        out.extend(_clone(x, memo) for x in v)
        return out
    if (cls is set or cls is frozenset) and all(type(x) in _ATOMIC for x in v):
        return cls(v)
    return copy.deepcopy(v, memo)
