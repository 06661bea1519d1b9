"""Prunable groups: Torch-Pruning's dependency graph, one search dimension per coupled channel set.

`PrunableModel` wraps a trained model: it lists the groups (stable names = root module's qualified
name), scores channels once per criterion, and applies a `PruningPlan` to a fresh copy, returning a
physically smaller model whose output shape is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.utils.prune as nn_prune
import torch_pruning as tp

from autoprune.pruning import criteria
from autoprune.pruning.clone import clone_module, copy_tensor
from autoprune.pruning.experts import Experts, find_experts
from autoprune.pruning.attention import (QUERY_NAMES, Fused, head_sizes, head_style, keep_alibi_heads, neutral_rope,
                                         no_cache, share_cross_attention_bias, sync_attention_attributes, takes_alibi)
from autoprune.pruning.layers import ROOT_TYPES, HFConv1D, custom_pruners, in_width, out_width
from autoprune.pruning.slicing import cut, fast_kind
from autoprune.errors import AutopruneError
from autoprune.pruning.plan import PruningPlan, channels_kept
from autoprune.model.task import call_model, output_signature, tensors_of

log = logging.getLogger(__name__)
_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.PReLU, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class Member:
    """One module touched by a group: its output ('out') or input ('in') channels, and how many."""

    module: str
    role: str
    count: int


@dataclass(frozen=True)
class GroupInfo:
    name: str
    index: int
    channels: int
    members: tuple[Member, ...]
    layers: tuple[str, ...]
    prunable: bool = True
    reason: str = ""
    multiple: int = 1  # kept channels are a multiple of this (e.g. attention heads), found by probing
    min_keep: int = 1  # channels that must stay: one per concatenated branch
    conv_groups: int = 1  # conv groups of the grouped convolutions it touches: kept is a multiple, equal count per conv group
    # equal blocks that each lose the same number of whole multiples (a grouped-query attention's query heads: one
    # block of query heads per key/value head, which its key/value repeat reads in order); kept is a multiple of
    # multiple x blocks
    blocks: int = 1

    @property
    def unit(self) -> int:
        """The channels one step removes, before round_to: a multiple from each block."""
        return self.multiple * self.blocks

    def to_dict(self) -> dict:
        d = asdict(self)
        d["members"] = [asdict(m) for m in self.members]
        return d


def _lowest_in_each_block(scores: torch.Tensor, blocks: int, unit: int, n_units: int) -> list[int]:
    """Channels of the `n_units` lowest-scored aligned runs of `unit` channels (by summed score) in each of `blocks`
    equal blocks of `scores`, sorted: the same number from every block, each block its own."""
    size = scores.numel() // blocks
    per_unit = scores.detach().float().reshape(blocks, size // unit, unit).sum(2)
    out = []
    for b in range(blocks):
        for h in torch.argsort(per_unit[b], stable=True)[:n_units].tolist():
            out.extend(range(b * size + h * unit, b * size + (h + 1) * unit))
    return sorted(out)


@functools.lru_cache(maxsize=256)
def _step(round_to: int, multiple: int, conv_groups: int) -> int:
    """The channel granularity of a group (its kept count is a multiple of it); cached: ~700 calls a trial."""
    return math.lcm(max(1, round_to), multiple, conv_groups)


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def find_output_layers(model: nn.Module, example) -> list[str]:
    """Conv/linear layers whose output is the model's output (never pruned): the classifier.

    `example` is the model's inputs (a tensor, a tuple of positional arguments or a dict of keyword ones)."""
    # the outputs are kept alive until the end: an id of a freed tensor can be reused by a later one (the model's
    # output could then match a random earlier layer, which was then ignored: groups came and went between runs)
    produced: dict[int, tuple[str, object]] = {}
    order: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, ROOT_TYPES):
            def hook(_m, _i, out, name=name):
                produced[id(out)] = (name, out)
                order.append(name)
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = call_model(model, example)
    finally:
        for h in hooks:
            h.remove()
    hit = [produced[id(t)][0] for t in tensors_of(out) if id(t) in produced and produced[id(t)][1] is t]
    if hit:
        return list(dict.fromkeys(hit))
    return order[-1:]


class _EndlessWalk(Exception):
    pass


@dataclass(frozen=True)
class _Endless:
    root: nn.Module  # a root layer whose dependency walk `_bounded_walks` stopped, or that failed
    width: int  # its output channels
    error: str = ""  # why the walk failed ("" when it did not end)


_WALK = threading.local()
# a dependency walk that adds the same (layer, pruning function) more often than this never ends: a finite walk
# adds one per path with distinct indices (a concatenation's branches), a cycle with shifting indices forever
WALK_REPEATS = 64
_TP_ADD_DEP = tp.dependency.group.Group.add_dep


def _counted_add_dep(self, dep, idxs) -> None:
    limit = getattr(_WALK, "limit", None)
    if limit is not None:
        seen = self.__dict__.setdefault("_autoprune_adds", {})
        key = (id(dep.target), dep.handler)
        n = seen[key] = seen.get(key, 0) + 1
        if n > limit:
            raise _EndlessWalk(dep.target)
    _TP_ADD_DEP(self, dep, idxs)


@contextlib.contextmanager
def _bounded_walks(limit: int = WALK_REPEATS):
    """Stop Torch-Pruning's dependency walks (`get_pruning_group`) made in this block, in this thread, that do not
    end: `_EndlessWalk` instead of a hang.

    Why by hand: Torch-Pruning's walk re-adds a (layer, function) whenever the indices that reach it differ, and
    on a cycle whose index mapping shifts them (rotary position embeddings' `cat((-x2, x1))` in Llama or Qwen,
    some positional encodings) it runs forever, at 100 % CPU, with no message (VainF/Torch-Pruning#527, #337,
    #456; open). It offers no bound. Its `Group.add_dep` is wrapped, once, to count additions while a limit is
    set in this thread; elsewhere the wrapper is a pass-through."""
    if tp.dependency.group.Group.add_dep is not _counted_add_dep:
        tp.dependency.group.Group.add_dep = _counted_add_dep
    old = getattr(_WALK, "limit", None)
    _WALK.limit = limit
    try:
        yield
    finally:
        _WALK.limit = old


def _lost_track(group: Any, width: int, names: dict[int, str]) -> str:
    """What, in Torch-Pruning's full-width group `group` of a root layer `width` channels wide, shows that its walk
    lost track of the channels ("" when nothing does): an index it no longer maps to a root channel (its expand
    mapping: eager attention's repeat of keys and values, where no trace stand-in replaces it), or a root that
    comes back with more channels than it has (a fused q/k/v projection sliced in three: Phi-3's `qkv_proj`, 80
    root channels for a 64-wide layer, which then failed with an IndexError at the first cut)."""
    if len(group[0].idxs) != width:
        return f"the root layer ({len(group[0].idxs)} channels found in a {width}-wide layer)"
    for item in group:
        roots = getattr(item, "root_idxs", None)
        if roots is not None and any(r is None for r in roots):
            target = item.dep.target.module
            return names.get(id(target), getattr(item.dep.target, "name", type(target).__name__))
    return ""


def _remapped(group: Any, dg: tp.DependencyGraph, remap: dict[tuple[int, str], list[tuple[int, int]]]) -> Any:
    """Torch-Pruning's `group` with the items of the layers `remap` names ((id of the layer, "out" or "in") ->
    [(index, the root index it comes from)]) replaced by those indices."""
    for i, item in enumerate(group.items):
        fn = item.dep.handler
        role = "out" if dg.is_out_channel_pruning_fn(fn) else "in" if dg.is_in_channel_pruning_fn(fn) else None
        new = remap.get((id(item.dep.target.module), role))
        if new is not None:
            fixed = tp._helpers.GroupItem(item.dep, [v for v, _ in new])
            fixed.root_idxs = [r for _, r in new]
            group[i] = fixed
    return group


# names of the norms an attention applies to each query or key head alone (`PrunableModel._head_norms`)
HEAD_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm")


class PrunableModel:
    """The prunable groups of a model and the means to apply plans to copies of it."""

    def __init__(
        self,
        model: nn.Module,
        example_input,
        *,
        ignore: Sequence[str] = (),
        criterion: str = "l2",
        round_to: int = 1,
        max_ratio: float = 0.9,
        mode: str = "structured",
        calibration: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        seed: int = 0,
        check_groups: bool = True,
        query_heads: Iterable[str] = (),
        attention_heads: str = "auto",
    ) -> None:
        """`attention_heads` (the spec's `pruning.attention_heads`): what a grouped-query attention loses, "auto",
        "key_value" or "query" (`_query_head_groups`). `query_heads`: query projections of grouped-query attentions
        whose query heads are a group whatever their head counts, for a partly pruned copy of a model whose groups
        were so (`prune_to`, from `query_head_groups`): its fewer query heads per key/value head would otherwise
        make the copy's group whole key/value heads."""
        self.base = model.eval()
        self.example = example_input
        self.criterion = criterion
        self.round_to = round_to
        self.max_ratio = max_ratio
        self.mode = mode
        self.calibration = calibration or []
        self.seed = seed
        names = dict(model.named_modules())
        bad = [n for n in ignore if n not in names]
        if bad:
            import difflib

            hints = {b: difflib.get_close_matches(b, list(names), n=3) for b in bad}
            raise AutopruneError(
                "pruning.ignore names modules that do not exist: "
                + "; ".join(f"{b!r} (did you mean {h}?)" if h else repr(b) for b, h in hints.items())
            )
        self.output_layers = find_output_layers(model, example_input)
        self.ignored = sorted(set(ignore) | set(self.output_layers))
        self.branch_counts: dict[str, dict[tuple[str, str], list[int]]] = {}
        self._segments: dict[str, list[frozenset[int]]] = {}
        self._selection: dict[tuple[str, int, str], list[int]] = {}
        self._conv_in: dict[str, bool] = {}
        self._base_graph: tuple | None = None  # (pristine copy of the base, its traced graph, module names)
        self._group_cuts: dict[tuple[str, tuple[int, ...]], list] = {}
        self._group_maps: dict[str, tuple | bool] = {}  # see _group_map
        # the dimension each directly owned parameter is cut along (Torch-Pruning's per-parameter pruning_dim)
        self._param_dims: dict[str, int] = {}
        # groups whose walk lost track of the root's channels but that have one linear consumer: a fused layout
        # verified by `_check_groups` makes them prunable (name -> why they are intact otherwise)
        self._lost: dict[str, str] = {}
        # multi-query attentions' query projections, each a group of its own (`_query_head_groups`) -> the output
        # projection that reads their heads
        self._query_heads: dict[str, str] = {}
        self._forced_query_heads = frozenset(query_heads)
        if attention_heads not in ("auto", "key_value", "query"):
            raise AutopruneError(f"pruning.attention_heads {attention_heads!r}: use auto, key_value or query")
        self.attention_heads = attention_heads
        # mixture-of-experts layers whose experts' neurons are a group (`_find_expert_groups`): name -> layout
        self._experts: dict[str, Experts] = {}
        self.groups: list[GroupInfo] = self._find_groups()
        if check_groups:
            self._check_groups()
        self._by_name = {g.name: g for g in self.groups}
        self._scores: dict[str, dict[str, torch.Tensor]] = {}
        self._orders: dict[str, dict[str, list[int]]] = {}

    def adopt_multiples(self, other: "PrunableModel") -> None:
        """Take the channel multiples (attention heads) that `other`'s probes found for groups of the same name.

        A PrunableModel built with check_groups=False (a gradual schedule's re-scoring of a partly pruned copy)
        does not probe, so it would see heads as single channels and cut across them."""
        found = {g.name: g.multiple for g in other.groups if g.multiple > 1}
        self.groups = [replace(g, multiple=found[g.name]) if g.name in found and g.channels % found[g.name] == 0
                       else g for g in self.groups]
        # fused projections (`_infer_fused`) keep their layout, at this model's width: without it, a partly pruned
        # GPT-2's c_attn was cut as plain channels (a forward that failed) and a GLM's gate/up halves apart
        base = self._base_modules()
        fused = {}
        for name, lay in other.__dict__.get("_fused", {}).items():
            g = next((h for h in self.groups if h.name == name), None)
            out = base.get(lay.out)
            if g is None or out is None:
                continue
            width = in_width(out)
            # (a multi-query unit is a query head: the query heads per key/value head are what is left of them)
            lay = replace(lay, width=width, rep=width // lay.head if lay.query_only else lay.rep)
            if g.channels == lay.total and width % (lay.head * lay.rep) == 0 and lay.heads > 1:
                fused[name] = lay
        self._fused = fused
        # (a group Torch-Pruning's walk lost track of is prunable under its verified layout: `_check_groups`)
        self.groups = [self._fused_group(g, fused[g.name]) if g.name in fused else g for g in self.groups]
        self._by_name = {g.name: g for g in self.groups}
        self._selection.clear()
        self._group_cuts.clear()
        self._group_maps.clear()

    # ----------------------------------------------------------------- groups
    def trace(self, model: nn.Module) -> tp.DependencyGraph:
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                # Torch-Pruning warns at every trace that it will cut module-owned parameters (a ViT's class token,
                # a ConvNeXt's layer scale) along their last dimension: the probes check that cut, and a search
                # traces several copies, so the same lines came out 4-6 times
                warnings.filterwarnings("ignore", message=r"Unwrapped parameters detected")
                # the outputs' tensors only: Torch-Pruning flattens tuples, lists and dicts but hands anything else
                # (a transformers `Cache` of past keys and values, a string) back as an "output" and fails on it
                custom = custom_pruners(model)
                # per-head tables are cut per head by `_cut_head_tables`: Torch-Pruning reaches them but cuts them
                # as channels (a Swin table of 4 head columns lost all 4 to a cut of 8 channels, one head)
                tables = [model.get_parameter(t) for _, _, ts in self._head_tables().values() for t in ts]
                # a norm over each head's channels (Qwen3's, Gemma3's q_norm and k_norm: one weight of head size,
                # shared by every head) stays whole: Torch-Pruning cut it with the heads' channels
                tables += [model.get_parameter(t) for t in self._head_norms()]
                with no_cache(model), neutral_rope(model):
                    return tp.DependencyGraph().build_dependency(model, example_inputs=self.example,
                                                                 output_transform=tensors_of,
                                                                 customized_pruners=custom or None,
                                                                 ignored_params=tables or None)
        except Exception as e:
            # a layer type Torch-Pruning has no pruning function for is the usual cause
            unknown = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()
                              if next(m.parameters(recurse=False), None) is not None
                              and not type(m).__module__.startswith("torch.nn")
                              and tp.pruner.function.PrunerBox.get(tp.ops.module2type(m)) is None})
            hint = (f" (layers with their own weights that Torch-Pruning has no pruning function for: "
                    f"{', '.join(unknown[:5])})") if unknown else ""
            raise AutopruneError(f"Torch-Pruning cannot trace the model: {type(e).__name__}: {e}{hint}") from None

    def _tp_groups(self, model: nn.Module, dg: tp.DependencyGraph):
        """Torch-Pruning's `get_all_groups` (same roots, same order, same groups), except that a root whose
        dependency walk does not end yields `_Endless(root)` instead of hanging (see `_bounded_walks`)."""
        mods = dict(model.named_modules())
        names = _module_names(model)
        ignored = {id(mods[n]) for n in self.ignored} | {id(m) for m in dg.IGNORED_LAYERS_IN_TRACING}
        visited: set[int] = set()
        for m in list(dg.module2node.keys()):
            if id(m) in ignored or id(m) in visited or not isinstance(m, ROOT_TYPES):
                continue
            pruner = dg.get_pruner_of_module(m)
            width = None if pruner is None else pruner.get_out_channels(m)
            if width is None:
                continue
            try:
                with _bounded_walks():
                    group = self._walk(model, dg, names[id(m)], list(range(width)))
            except _EndlessWalk:
                yield _Endless(m, width)
                continue
            except Exception as e:  # noqa: BLE001 - Torch-Pruning's own failure (Falcon-40B's grouped-query
                # attention divided by zero in its index mapping): this root's group is left intact, the others stand
                yield _Endless(m, width, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            prunable = True
            for dep, _ in group:
                if dg.is_out_channel_pruning_fn(dep.handler):
                    visited.add(id(dep.target.module))
                    prunable = prunable and id(dep.target.module) not in ignored
            if prunable:
                yield group

    def _find_groups(self) -> list[GroupInfo]:
        work = clone_module(self.base)
        dg = self.trace(work)
        names = _module_names(work)
        # the copy is only read here: it stays the pristine traced graph `_cuts` applies plans with
        self._base_graph = (work, dg, names)
        order = {n: i for i, n in enumerate(names.values())}
        found = []
        for grp in self._tp_groups(work, dg):
            if isinstance(grp, _Endless):
                name, width = names[id(grp.root)], grp.width
                reason = ("Torch-Pruning's dependency walk from this layer does not end (its known issue with rotary "
                          "position embeddings, VainF/Torch-Pruning#527): add it to pruning.ignore to skip the walk")
                if grp.error:
                    reason = f"Torch-Pruning's dependency walk from this layer fails ({grp.error}), so it is left intact"
                log.warning("group %s cannot be pruned (%s); it is left intact", name, reason)
                found.append(GroupInfo(name, 0, width, (Member(name, "out", width),), (name,), False, reason))
                continue
            root = grp[0].dep.target.module
            root_name = names[id(root)]
            channels = len(grp[0].idxs)
            width = dg.get_pruner_of_module(root).get_out_channels(root)
            lost = _lost_track(grp, width, names)
            if lost:
                # a walk whose channel bookkeeping Torch-Pruning lost: cuts from it would take the wrong channels,
                # unless the group is a fused projection whose layout `_check_groups` verifies (Phi-3's grouped-query
                # qkv_proj, which it maps 80 root channels for 64): then `_walk` maps root and consumer itself
                reason = (f"Torch-Pruning loses track of which channels are which through {lost}, so no cut of this "
                          "group is known to be right; it is left intact")
                readers = {names[id(it.dep.target.module)]: len(it.idxs) for it in grp
                           if isinstance(it.dep.target.module, (nn.Linear, HFConv1D)) and id(it.dep.target.module) in names
                           and dg.is_in_channel_pruning_fn(it.dep.handler)}
                mem = (Member(root_name, "out", width),)
                if isinstance(root, nn.Linear) and len(readers) == 1:
                    mem += tuple(Member(n, "in", c) for n, c in readers.items())
                    self._lost[root_name] = reason
                else:
                    log.warning("group %s cannot be pruned (%s)", root_name, reason)
                found.append(GroupInfo(root_name, 0, width, mem, (root_name,), False, reason))
                continue
            members: dict[tuple[str, str], int] = {}
            per_root: dict[tuple[str, str], list[int]] = {}
            grouped: dict[tuple[str, str], int] = {}  # grouped (not depthwise) conv member -> its conv groups
            unaligned: list[str] = []  # grouped conv members whose channels are not the root's, one to one
            for item in grp:
                dep, idxs = item.dep, item.idxs
                m = dep.target.module
                if id(m) not in names or not isinstance(m, nn.Module):
                    continue
                role = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
                key = (names[id(m)], role)
                if len(idxs) > members.get(key, 0):
                    counts = [0] * channels
                    for r in item.root_idxs:
                        counts[r] += 1
                    per_root[key] = counts
                members[key] = max(members.get(key, 0), len(idxs))
                # grouped conv (Torch-Pruning's rule: depthwise when groups == out_channels, else a conv whose
                # in/out channels are split into `groups` equal blocks)
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups > 1 and m.groups != m.out_channels:
                    grouped[key] = m.groups
                    width = m.out_channels if role == "out" else m.in_channels
                    if not (width == channels == len(idxs) and list(idxs) == list(item.root_idxs) == list(range(channels))):
                        unaligned.append(names[id(m)])
            mem = tuple(Member(n, r, c) for (n, r), c in sorted(members.items(), key=lambda kv: order.get(kv[0][0], 0)))
            layers = tuple(dict.fromkeys(m.module for m in mem if m.role == "out" and isinstance(dict(work.named_modules())[m.module], ROOT_TYPES)))
            prunable, reason = True, ""
            conv_groups = math.lcm(*grouped.values()) if grouped else 1
            grouped_names = list(dict.fromkeys(n for n, _ in grouped))
            if channels <= 1:
                prunable, reason = False, "a single channel"
            elif unaligned:
                prunable, reason = False, (f"grouped convolution(s) {list(dict.fromkeys(unaligned))} see these channels through a "
                                           "concatenation or reshape (not supported)")
            elif conv_groups > 1 and (channels % conv_groups or channels <= conv_groups):
                prunable, reason = False, (f"grouped convolution(s) {grouped_names} need a multiple of {conv_groups} channels "
                                           f"and there are {channels}")
            # channels of a member that map to each root channel, where not uniform (concatenations)
            self.branch_counts[root_name] = {k: c for k, c in per_root.items() if len(set(c)) > 1}
            # out-role conv/linear members fed by only part of the root channels (branches of a concat):
            # each must keep one channel, or Torch-Pruning would remove a whole layer
            segs = [frozenset(i for i, c in enumerate(per_root[(n, "out")]) if c) for n in layers if (n, "out") in per_root]
            self._segments[root_name] = [sg for sg in dict.fromkeys(segs) if 0 < len(sg) < channels]
            min_keep = max(1, len(self._segments[root_name]))
            if channels <= min_keep and prunable:
                prunable, reason = False, "every channel is the last of its branch"
            if conv_groups > 1 and self._segments[root_name] and prunable:
                prunable, reason = False, f"grouped convolution(s) {grouped_names} in a group with concatenated branches (not supported)"
            # grouped convs reading these channels (their input) need the same offsets removed in every conv group
            # (Torch-Pruning's ConvPruner.prune_in_channels keeps the first conv group's offsets for all of them)
            self._conv_in[root_name] = any(r == "in" for _, r in grouped)
            found.append(GroupInfo(root_name, 0, channels, mem, layers, prunable, reason, 1, min_keep, conv_groups))
        found = self._query_head_groups(found, work, dg)
        found += self._find_expert_groups()
        found.sort(key=lambda g: order.get(g.name, 0))
        return [replace(g, index=i) for i, g in enumerate(found)]

    def _query_head_groups(self, found: list[GroupInfo], work: nn.Module, dg: tp.DependencyGraph) -> list[GroupInfo]:
        """`found` with the query heads of every multi-query attention (one key/value head shared by all query
        heads: Gemma 2B, Gemma-3 1B and 270M) as a group of their own: root the query projection, members it and
        the output projection's inputs, the key and value projections untouched. The key/value group, one head that
        no cut can remove, is left intact and says where its heads went.

        The same for a grouped-query attention with more query heads per key/value head than key/value heads
        (Qwen2.5-0.5B: 14 query heads on 2 key/value heads): whole key/value heads (each with its query heads) would
        give it one step (2 -> 1), query heads taken in equal numbers from every key/value head's block six (7 -> 1
        a block), so its query heads are the group (`GroupInfo.blocks`) and its key/value heads stay. Where key/value
        heads give as many steps or more (Llama-3 8B: 8 of 4 query heads each), the group stays whole key/value
        heads, which also shrinks the key/value cache.

        Why by hand: Torch-Pruning's walk from a key/value projection takes the query heads with each key/value
        head (`_kv_layout`), which under one key/value head is all of them, and its walk from the query projection
        takes key/value channels with every query channel, as in multi-head attention. `_walk` keeps the query
        projection's and the output projection's items; the probes and a cut compared with silencing check it."""
        out = list(found)
        for g in found:
            lay = self._kv_layout(g.name)
            # (a query projection that is a root of its own already, one Torch-Pruning's walk from the key/value
            # projection did not reach, stays as it is)
            if lay is None or any(h.name == lay[2] for h in out):
                continue
            n_rep, head, q_name, o_name = lay
            n_kv = self._base_modules()[g.name].out_features // head
            if n_kv > 1 and q_name not in self._forced_query_heads and (
                    self.attention_heads == "key_value" or (self.attention_heads == "auto" and n_rep <= n_kv)):
                continue  # whole key/value heads: asked for, or the finer steps; the group stays as it is
            self._query_heads[q_name] = o_name
            width = work.get_submodule(q_name).out_features
            try:
                pg = self._walk(work, dg, q_name, list(range(width)))
            except Exception:  # noqa: BLE001 - no walk, no group: the attention stays as it was
                pg = None
            if pg is None or len(pg.items) != 2:
                del self._query_heads[q_name]
                continue
            self.branch_counts[q_name], self._segments[q_name], self._conv_in[q_name] = {}, [], False
            members = (Member(q_name, "out", width), Member(o_name, "in", width))
            if n_kv == 1:
                out.append(GroupInfo(q_name, 0, width, members, (q_name,)))
                reason = (f"one key/value head (multi-query attention) that its {n_rep} query heads share; the query "
                          f"heads are pruned as group {q_name}")
            else:  # whole heads, as many from each key/value head's block, at least one head left in each
                out.append(GroupInfo(q_name, 0, width, members, (q_name,), multiple=head, min_keep=head * n_kv,
                                     blocks=n_kv))
                reason = (f"{n_kv} key/value heads of {n_rep} query heads each: the query heads are pruned instead, "
                          f"as many from each key/value head, as group {q_name} ({n_rep - 1} steps, where whole "
                          f"key/value heads give {n_kv - 1})")
            out = [replace(h, prunable=False, multiple=head, reason=reason) if h.name == g.name else h for h in out]
        return out

    def _find_expert_groups(self) -> list[GroupInfo]:
        """A group per mixture-of-experts layer: its experts' neurons, as many from each expert (`experts.py`).

        The layout (which dimensions, gate and up concatenated or interleaved) is the candidate whose cut of half of
        every expert's neurons computes what silencing them computes, checked on the example once per experts class
        and parameter shape; a layer whose layout no candidate reproduces, or that the example does not reach, is
        left intact with the reason."""
        found = find_experts(self.base, set(self.ignored))
        if not found:
            return []
        verified: dict[tuple, Experts | str] = {}
        out = []
        for name, cands in found.items():
            m = self._base_modules()[name]
            key = (type(m), tuple(m._parameters["gate_up_proj"].shape), tuple(m._parameters["down_proj"].shape))
            if key not in verified:
                verified[key] = self._verify_experts(name, cands)
            lay = verified[key]
            width = cands[0].n * cands[0].inter
            members, layers = (Member(name, "out", width),), (name,)
            if isinstance(lay, str):
                log.warning("group %s cannot be pruned (%s); it is left intact", name, lay)
                out.append(GroupInfo(name, 0, width, members, layers, False, lay))
                continue
            self._experts[name] = lay
            self.branch_counts[name], self._segments[name], self._conv_in[name] = {}, [], False
            # each expert keeps a multiple of 16 bytes of neurons: transformers' default experts implementation
            # (`torch._grouped_mm`) refuses other row strides ("strides should be multiple of 16 bytes": 33 of 36
            # trials of a Mixtral search failed); the neurons themselves are chosen one by one
            step = 16 // m._parameters["down_proj"].element_size()
            step = step if lay.inter % step == 0 and lay.inter > step else 1
            out.append(GroupInfo(name, 0, width, members, layers, multiple=step, min_keep=lay.n * step, blocks=lay.n))
        return out

    def _verify_experts(self, name: str, cands: list[Experts]) -> Experts | str:
        """The candidate layout of experts module `name` whose cut computes what silencing computes (else why not)."""
        def run(edit) -> list[torch.Tensor]:
            work = clone_module(self.base)
            edit(work.get_submodule(name))
            with torch.no_grad():
                return [t.float() for t in tensors_of(call_model(work.eval(), self.example))]

        def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
            return len(a) == len(b) and all(x.shape == y.shape and bool(
                (x - y).abs().max() <= 1e-3 * (y.abs().max() + 1e-6)) for x, y in zip(a, b))

        try:
            base = run(lambda m: None)
            silenced: dict[str, list[torch.Tensor]] = {}
            for lay in cands:
                half = [e * lay.inter + j for e in range(lay.n) for j in range(lay.inter // 2)]
                if lay.layout not in silenced:
                    silenced[lay.layout] = run(lambda m, lay=lay, half=half: lay.silence(m, half))
                if close(silenced[lay.layout], base):
                    continue  # (the example does not reach these neurons: nothing to compare)
                try:
                    got = run(lambda m, lay=lay, half=half: lay.cut(m, half))
                except Exception:  # noqa: BLE001 - a layout its forward cannot run: the next candidate
                    continue
                if close(got, silenced[lay.layout]):
                    return lay
        except Exception as e:  # noqa: BLE001 - the model's own failure, said as the reason
            return f"its experts could not be checked: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return ("a mixture-of-experts layer whose experts' gate_up_proj / down_proj layout autoprune does not know "
                "(no cut of their neurons computed what silencing them computes on the example)")

    def _check_groups(self) -> None:
        """Probe every group on copies of the model and mark the ones that break unprunable.

        Two probes per group: remove one channel (finds a required channel multiple, e.g. attention
        heads, by trying the divisors of the width) and remove about half. Probing each group on its own
        copy costs one deep copy + dependency graph + forward per group (~18 s for ResNet-20 on a loaded
        2-core machine), so all groups are first probed together on ONE copy, exactly as `apply` prunes
        them; only when that joint probe fails are groups probed one by one to find the culprits.
        """
        out_shape = self._forward_shape(self.base)

        def probe(sizes: dict[str, int]) -> str | None:
            """Prune `sizes[g]` channels of each group on one copy; None if the output shape survives."""
            work = clone_module(self.base)
            removed_q: dict[str, set[int]] = {}
            # the query projections of attentions with per-head tables: which of their channels go, the heads whose
            # bias columns go too
            qs = {id(work.get_submodule(q)): q for q, _, _ in self._head_tables().values()}
            # the output projections of attentions handed ALiBi biases: which of their inputs go, the heads whose
            # bias rows go too
            denses = {id(work.get_submodule(d)): d for d in self._alibi_outputs()}
            removed_in: dict[str, set[int]] = {}
            chosen: dict[str, list[int]] = {}
            try:
                dg = self.trace(work)
                for name, n in sizes.items():
                    g = next(h for h in self.groups if h.name == name)
                    idxs = chosen[name] = self._select(g, n, list(range(g.channels)))
                    pg = self._walk(work, dg, name, idxs)
                    for dep, ix in (pg if qs or denses else ()):
                        if id(dep.target.module) in qs and dg.is_out_channel_pruning_fn(dep.handler):
                            removed_q.setdefault(qs[id(dep.target.module)], set()).update(int(i) for i in ix)
                        if id(dep.target.module) in denses and dg.is_in_channel_pruning_fn(dep.handler):
                            removed_in.setdefault(denses[id(dep.target.module)], set()).update(int(i) for i in ix)
                    pg.prune()
                odd = self._unmapped_cut(work, chosen)
                if odd:
                    raise RuntimeError(odd)
                if self._attention_names():  # the head counts, as `apply` sets them
                    sync_attention_attributes(work, self._attention_names())
                self._cut_head_tables(work, removed_q)
                self._keep_alibi_heads(work, removed_in)
                for slots in self._tied_slots():  # a weight two modules share must stay one tensor (`_retie`)
                    if len({tuple(work.get_submodule(n)._parameters[k].shape) for n, k in slots}) > 1:
                        raise RuntimeError("the cut would untie the weight shared by "
                                           + " and ".join(f"{n}.{k}" for n, k in slots))
                shape = self._forward_shape(work)
                if shape != out_shape:
                    raise RuntimeError(f"output shape changed from {out_shape} to {shape}")
            except Exception as e:  # any failure of Torch-Pruning or of the forward
                return f"pruning fails: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return None

        def mark(i: int, **changes) -> None:
            self.groups[i] = replace(self.groups[i], **changes)
            if changes.get("prunable") is False:
                # a group that is the model's output width (a transformer's hidden size) is expected to be locked
                expected = "output shape changed" in str(changes.get("reason"))
                (log.info if expected else log.warning)("group %s cannot be pruned (%s); it is left intact",
                                                        self.groups[i].name, changes.get("reason"))

        # a fused projection (q/k/v, gate/up) loses whole units in every part at once: one head (3 x head size
        # channels) or gated neuron (2 channels) a step, and its consumer reads one channel per part (the cost
        # model's multiplier); its layout is the first of the candidates whose one-unit cut computes what zeroing
        # that unit's inputs to the consumer computes
        for i, g in enumerate(self.groups):
            if g.name in self._experts:  # checked against silencing when found (`_find_expert_groups`)
                continue
            lay = self._infer_fused(g) if g.prunable or g.name in self._lost else None
            if lay is not None:
                self.groups[i] = self._fused_group(g, lay)
            elif g.name in self._lost:
                log.warning("group %s cannot be pruned (%s)", g.name, g.reason)
        # probe 1: remove one channel (or, failing that, the smallest divisor of the width that works)
        # (a group touching grouped convs removes one channel from each conv group; a fused q/k/v one, one head)
        idx = [i for i, g in enumerate(self.groups) if g.prunable and g.name not in self._experts]
        first = {i: max(self.groups[i].conv_groups, self.groups[i].unit) for i in idx}
        if probe({self.groups[i].name: first[i] for i in idx}) is not None:
            for i in idx:
                g = self.groups[i]
                err = probe({g.name: first[i]})
                if err is None:
                    continue
                if g.multiple > 1:  # a fused q/k/v projection: no other step to try
                    mark(i, prunable=False, reason=self._fused_qkv_reason(g, err))
                    continue
                for d in self._multiples_to_try(g):
                    if g.channels - d >= g.min_keep and probe({g.name: d}) is None:
                        mark(i, multiple=d)
                        break
                else:
                    mark(i, prunable=False, reason=self._fused_qkv_reason(g, err))
        # probe 2: remove about half (rounded to the group's multiple)
        idx = [i for i, g in enumerate(self.groups) if g.prunable and g.name not in self._experts]
        half = {i: self.groups[i].channels - self._kept_count(self.groups[i], 0.5, 1) for i in idx}
        if probe({self.groups[i].name: half[i] for i in idx}) is not None:
            for i in idx:
                err = probe({self.groups[i].name: half[i]})
                if err is not None:
                    mark(i, prunable=False, reason=err)
        if not any(g.prunable for g in self.groups):
            raise AutopruneError(
                "no prunable group found: "
                + ("; ".join(f"{g.name}: {g.reason}" for g in self.groups) or "Torch-Pruning found no conv/linear layer outside pruning.ignore and the classifier")
            )

    def _unmapped_cut(self, work: nn.Module, chosen: dict[str, list[int]]) -> str:
        """What, in `work` (a copy of the base with root channels `chosen[group]` of each group cut), lost a number of
        channels other than its group's members say ("" when nothing did).

        Why: the members' counts are what the cost model and the search read, and a cut that removes something
        else is a wrong model with the right output shape. Phi-3's fused `gate_up_proj` (gate and up halves,
        multiplied) lost 124 of 128 channels, and its consumer 62 of 64 inputs, for a cut of 64 root channels: a
        garbage model that ran. Members whose channels map unevenly (concatenations) are counted per channel."""
        base = self._base_modules()
        by_name = {g.name: g for g in self.groups}
        expected: dict[tuple[str, str], int] = {}
        for name, idxs in chosen.items():
            g = by_name[name]
            uneven = self.branch_counts.get(name, {})
            for m in g.members:
                if not isinstance(base.get(m.module), ROOT_TYPES):
                    continue
                per = uneven.get((m.module, m.role))
                if per is not None:
                    n = sum(per[i] for i in idxs)
                elif (m.count * len(idxs)) % g.channels == 0:
                    n = m.count * len(idxs) // g.channels
                else:
                    continue
                expected[(m.module, m.role)] = expected.get((m.module, m.role), 0) + n
        for (module, role), n in expected.items():
            width = out_width if role == "out" else in_width
            lost = width(base[module]) - width(work.get_submodule(module))
            if lost != n:
                return (f"Torch-Pruning's cut removes {lost} {role}put channels of {module} where the group's channel "
                        f"map says {n}")
        return ""

    def _walk(self, model: nn.Module, dg: tp.DependencyGraph, gname: str, idxs: list[int]) -> Any:
        """Torch-Pruning's group for removing root channels `idxs` of the layer `gname` of `model` (traced as `dg`),
        with a fused projection's root and consumer (`_infer_fused`) and a grouped-query attention's query and
        output projections (`_kv_layout`) mapped right: every cut, probe and score reads its groups from here."""
        root = model.get_submodule(gname)
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs)
        if self._head_tables() or self._head_norms():
            tables = self._table_modules(model)
            if tables:
                group._group = [item for item in group.items if id(item.dep.target.module) not in tables]
        fused = self.__dict__.get("_fused", {}).get(gname)
        if fused is not None:
            # a fused projection cut in whole units (`_infer_fused`): the root loses exactly these channels and its
            # consumer the inputs they feed. Torch-Pruning maps GPT-2's three blocks onto the same inputs (96
            # indices into 32, so its whole-layer check refused every head cut), GPT-NeoX's per-head [q k v] back
            # onto the root (3 channels cut for 1), and a gate/up projection's halves likewise (2 for 1)
            out = model.get_submodule(fused.out)
            values = {}
            for c in idxs:
                v = fused.value_input(c)
                if v is not None:
                    values.setdefault(v, c)  # (gate and up channel i both feed input i: once)
            values = [(v, c) for v, c in sorted(values.items())]
            return _remapped(group, dg, {(id(root), "out"): [(c, c) for c in idxs], (id(out), "in"): values})
        o_name = self.__dict__.get("_query_heads", {}).get(gname)
        if o_name is not None:  # a multi-query attention's query heads (`_query_head_groups`): q and o alone
            out = model.get_submodule(o_name)
            group._group = [it for it in group.items
                            if (id(it.dep.target.module), dg.is_out_channel_pruning_fn(it.dep.handler))
                            in ((id(root), True), (id(out), False))]
            same = [(c, c) for c in idxs]
            return _remapped(group, dg, {(id(root), "out"): same, (id(out), "in"): same})
        layout = self._kv_layout(gname)
        if layout is None:
            return group
        n_rep, head, q_name, o_name = layout
        q, o = model.get_submodule(q_name), model.get_submodule(o_name)
        roots = [int(r) for r in group[0].root_idxs]
        # key/value channel c (head c // head, offset c % head) serves query heads c // head x n_rep + r
        heads = [((c // head * n_rep + r) * head + c % head, c) for c in roots for r in range(n_rep)]
        return _remapped(group, dg, {(id(q), "out"): heads, (id(o), "in"): heads})

    def _kv_layout(self, gname: str) -> tuple[int, int, str, str] | None:
        """(query heads per key/value head, head size, the query projection's name, the output projection's) when
        layer `gname` is the key or value projection of a grouped-query attention (`transformers`' Llama, Qwen2,
        Mistral, Gemma, Moshi: an attention module with `head_dim` and `num_key_value_groups` > 1, or its head
        counts, above q/k/v/o linear layers, which may sit one wrapper down); else None.

        Why by hand: Torch-Pruning maps key/value channel i to query channel i (and output-projection input i)
        through the attention, where the query heads of key/value head j are j x n_rep ... (j + 1) x n_rep - 1, so a
        cut of one key/value head took the wrong query heads and left 3 query heads to 1 key/value head, which
        scaled-dot-product attention's grouped mode accepts: a silently wrong model. Its groups here are whole
        key/value heads, each with its query heads."""
        cache = self.__dict__.setdefault("_kv_layouts", {})
        if gname in cache:
            return cache[gname]
        mods = self._base_modules()
        root = mods.get(gname)
        found = None
        parts = gname.split(".")
        for up in (1, 2):  # the attention module: the root's parent, or its grandparent (a wrapped linear layer)
            if not isinstance(root, nn.Linear) or len(parts) <= up:
                break
            attn_name = ".".join(parts[:-up])
            d = mods[attn_name].__dict__
            heads = d.get("num_heads", d.get("num_attention_heads"))
            n_rep = d.get("num_key_value_groups")
            if not isinstance(n_rep, int) and isinstance(heads, int) and isinstance(d.get("num_key_value_heads"), int) \
                    and d["num_key_value_heads"] > 0 and heads % d["num_key_value_heads"] == 0:
                n_rep = heads // d["num_key_value_heads"]
            head = d.get("head_dim")
            if not (isinstance(n_rep, int) and n_rep > 1 and isinstance(head, int) and head > 0):
                continue
            width = root.out_features
            inside = {n: m for n, m in mods.items() if n.startswith(attn_name + ".") and isinstance(m, nn.Linear)}
            # by shape, then (a square layer fits both) by name: q_proj or query, o_proj or out_proj or dense
            rel = {n: n[len(attn_name) + 1:] for n in inside}
            qs = [n for n, m in inside.items() if m.out_features == n_rep * width and m.in_features == root.in_features]
            os_ = [n for n, m in inside.items() if m.in_features == n_rep * width]
            if len(qs) > 1:
                qs = [n for n in qs if rel[n].startswith(("q_", "q.", "query"))]
            if len(os_) > 1:
                os_ = [n for n in os_ if rel[n].startswith(("o_", "o.", "out", "dense")) and n not in qs]
            if width % head == 0 and len(qs) == 1 and len(os_) == 1:
                found = (n_rep, head, qs[0], os_[0])
            break
        cache[gname] = found
        return found

    def _fused_group(self, g: GroupInfo, lay: Fused) -> GroupInfo:
        """Group `g` under fused layout `lay`, prunable in whole units: its consumer reads one channel per part (the
        cost model's multiplier; a multi-query layout's, one per query channel, and the group keeps the key and value
        blocks and one query head). The group's uneven per-channel counts are dropped: per whole unit they are
        uniform, and what Torch-Pruning's walk mapped unevenly `_walk` sets right."""
        self.branch_counts[g.name] = {}
        count = g.channels if lay.query_only else lay.width
        members = tuple(replace(m, count=count) if m.module == lay.out and m.role == "in" else m for m in g.members)
        min_keep = lay.total - lay.width + lay.head if lay.query_only else g.min_keep
        return replace(g, members=members, multiple=lay.step, min_keep=min_keep, prunable=True, reason="")

    def _fused_layout(self, g: GroupInfo) -> Fused | None:
        """Group `g`'s fused layout, when `_infer_fused` found one."""
        return self.__dict__.get("_fused", {}).get(g.name)

    def _fused_candidates(self, g: GroupInfo) -> list[Fused]:
        """Layouts group `g` may have: its root is a linear layer read by one linear layer (its consumer) whose
        input width is a half or a third of the root's width. For two parts: gated neurons (gate and up halves, both
        feeding the consumer's input i), then key/value halves in the head sizes its module names; for three:
        q/k/v in blocks or interleaved per head, in those head sizes."""
        base = self._base_modules()
        if not isinstance(base.get(g.name), (nn.Linear, HFConv1D)):
            return []
        readers = [m.module for m in g.members if m.role == "in" and isinstance(base.get(m.module), (nn.Linear, HFConv1D))]
        if len(readers) != 1:
            return []
        width = in_width(base[readers[0]])
        parts = g.channels // width if width and g.channels % width == 0 else 0
        parent = base[g.name.rpartition(".")[0]] if "." in g.name else self.base
        heads = list(dict.fromkeys(h for h in head_sizes(parent) if 0 < h < width and width % h == 0))
        found = [Fused(width, 1, 2, False, readers[0], True)] if parts == 2 else []
        for h in heads if parts in (2, 3) else ():
            found += [Fused(width, h, parts, False, readers[0]), Fused(width, h, parts, True, readers[0])]
        # grouped-query q/k/v in blocks: `num_key_value_heads` key/value heads of the module's head size; with one
        # (multi-query), a unit is a query head alone
        kv = next((v for a in ("num_key_value_heads", "num_kv_heads", "kv_heads")  # (Falcon's, GPTBigCode's names)
                   if isinstance(v := parent.__dict__.get(a), int)), None)
        for h in heads if isinstance(kv, int) and kv > 0 else ():
            if width % (kv * h) == 0 and width // (kv * h) > 1 and g.channels == width + 2 * kv * h:
                found.append(Fused(width, h, 3, False, readers[0], rep=width // (kv * h), query_only=kv == 1))
        return [f for f in found if f.heads > 1]

    def _infer_fused(self, g: GroupInfo) -> Fused | None:
        """The first of `_fused_candidates(g)` under which a cut of one unit (built as `apply` builds it) computes, on
        the example input, what the unpruned model computes with that unit's inputs to the consumer zeroed: a
        silenced head, a silenced gated neuron. None when no candidate does (the group is then probed as channels).

        Why by hand: Torch-Pruning maps a fused projection's parts onto each other (GPT-2's blocks onto the same
        inputs of c_proj, GPT-NeoX's per-head q/k/v and gate/up halves back onto the root), so such groups were
        left intact or, where the cut kept the shapes, gave wrong models. Which layout a model uses is in its
        forward, not its attributes; checking each candidate against silencing reads it from what the model
        computes, and a wrong guess is refused instead of used."""
        fused = self.__dict__.setdefault("_fused", {})
        # the same block class at the same widths computes the same way: a 32-layer decoder is checked once, not
        # 32 times (each check is two forward passes)
        verdicts = self.__dict__.setdefault("_fused_verdicts", {})
        candidates = self._fused_candidates(g)
        parent, out_parent = (n.rpartition(".")[0] for n in (g.name, candidates[0].out)) if candidates else ("", "")
        base = self._base_modules()
        for lay in candidates:
            fused[g.name] = lay
            key = (type(base[parent] if parent else self.base), g.name[len(parent):], lay.out[len(out_parent):],
                   replace(lay, out=""))
            ok = verdicts.get(key)
            try:
                if ok is None:
                    ok = verdicts[key] = self._cut_equals_silencing(g.name, lay)
            finally:
                self._group_cuts = {k: v for k, v in self._group_cuts.items() if k[0] != g.name}
            if ok:
                return lay
            del fused[g.name]
        return None

    def _cut_equals_silencing(self, gname: str, lay: Fused) -> bool:
        """Whether cutting unit 1 of group `gname` under layout `lay` (as `apply` cuts it) computes, on the example
        input, what the unpruned model computes with that unit's inputs to the consumer zeroed. Both models share
        every tensor with the base that they do not change (no copy of a large model's weights)."""
        unit = lay.head_channels(1)
        try:
            work = self._build({gname: unit}, share_rest=True)
            layer = self._base_modules()[lay.out]
            zeroed = clone_module(self.base, share=[t for t in self.base.state_dict(keep_vars=True).values()
                                                    if t is not layer.weight])
            weight = zeroed.get_submodule(lay.out).weight
            feeds = sorted({lay.value_input(c) for c in unit} - {None})
            with torch.no_grad():
                if isinstance(layer, HFConv1D):
                    weight[feeds, :] = 0
                else:
                    weight[:, feeds] = 0
                got = tensors_of(call_model(work.eval(), self.example))
                want = tensors_of(call_model(zeroed.eval(), self.example))
        except Exception:  # noqa: BLE001 - a layout whose cut fails is not the model's
            return False
        return len(got) == len(want) and all(
            a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
            for a, b in zip(got, want) if torch.is_floating_point(a))

    def _fused_heads(self, g: GroupInfo, n_prune: int, head_scores: torch.Tensor) -> list[int]:
        """The channels of the `n_prune // step` units (heads, gated neurons) with the lowest scores, in every part."""
        lay = self._fused_layout(g)
        heads = torch.argsort(head_scores, stable=True)[: n_prune // lay.step].tolist()
        return sorted(c for h in heads for c in lay.head_channels(h))

    def _fused_head_scores(self, g: GroupInfo, channel_scores: torch.Tensor) -> torch.Tensor:
        """A fused group's per-unit score: the sum over the unit's channels in every part."""
        return self._fused_layout(g).head_scores(channel_scores)

    def _fused_qkv_reason(self, g: GroupInfo, err: str) -> str:
        """`err`, said in words when the group is a fused projection (`_fused_candidates` has candidates for it) none of
        whose candidate layouts computed right."""
        cands = self._fused_candidates(g)
        if cands:
            parts = cands[0].parts
            what = "query/key/value" if parts == 3 else "gate/up or key/value"
            return (f"a fused {what} projection ({g.channels} = {parts} x {g.channels // parts} channels) whose units "
                    f"autoprune cannot cut in all {parts} parts so that the model computes what silencing them "
                    f"computes, so it is left intact ({err})")
        return err

    def _multiples_to_try(self, g: GroupInfo) -> list[int]:
        """The channel multiples the first probe tries for a group whose single-channel cut fails: the head size of
        the attention module its root projects for, first (when it divides the width), then every divisor of the
        width from 2 up. Why the head size first: an attention that reshapes to (heads, -1) accepts any cut that
        leaves the width divisible by its head count, so the smallest such divisor (DeBERTa: 4 of a head size of
        8) passed the probe and cut across heads, regrouping every head's channels."""
        if g.conv_groups != 1:
            return []
        divisors = [d for d in range(2, g.channels // 2 + 1) if g.channels % d == 0]
        parent = self.base.get_submodule(g.name.rpartition(".")[0]) if "." in g.name else self.base
        head = next((h for h in head_sizes(parent) if 1 < h < g.channels and g.channels % h == 0), None)
        return [head] + [d for d in divisors if d != head] if head else divisors

    def _kept_count(self, g: GroupInfo, ratio: float, round_to: int) -> int:
        """Channels group `g` keeps at `ratio`: rounded up to lcm(round_to, its multiple, its conv groups), at
        least min_keep (and, where the width must stay a multiple, at least one multiple)."""
        step = _step(round_to, g.unit, g.conv_groups)
        keep = channels_kept(g.channels, ratio, step)
        if keep < g.min_keep:
            keep = min(g.channels, math.ceil(g.min_keep / step) * step)
        if keep % step and math.lcm(g.unit, g.conv_groups) > 1:  # channels_kept's one channel at ratio 1
            keep = min(g.channels, math.ceil(keep / step) * step)
        return keep

    def _select(self, g: GroupInfo, n_prune: int, order: list[int]) -> list[int]:
        """The first `n_prune` channels of `order`, skipping any that would empty a concatenated branch
        (grouped convs: the same count from each conv group, ranked by position in `order`)."""
        if g.conv_groups > 1 or g.blocks > 1 or self._fused_layout(g) is not None:
            rank = torch.empty(g.channels)
            rank[torch.tensor(order[: g.channels], dtype=torch.long)] = torch.arange(g.channels, dtype=torch.float)
            if g.blocks > 1:  # as many from each block, ranked by their channels' positions
                return self._select_per_block(g, n_prune, rank, whole=g.name not in self._experts)
            if g.conv_groups == 1:  # a fused projection: whole units, ranked by their channels' positions
                return self._fused_heads(g, n_prune, self._fused_head_scores(g, rank))
            return self._select_conv_groups(g, n_prune, rank)
        segs = self._segments.get(g.name, [])
        if not segs:
            return sorted(order[:n_prune])
        left = [len(sg) for sg in segs]
        chosen: list[int] = []
        for c in order:
            if len(chosen) == n_prune:
                break
            hit = [j for j, sg in enumerate(segs) if c in sg]
            if any(left[j] <= 1 for j in hit):
                continue
            for j in hit:
                left[j] -= 1
            chosen.append(c)
        return sorted(chosen)

    def counts_suffice(self, name: str) -> bool:
        """True when group `name`'s cost depends only on how many channels it loses, not which (no
        concatenated branches): a cost estimate can then skip choosing the channels."""
        return not self.branch_counts.get(name) and not self._segments.get(name)

    def pruned_indices(self, plan: PruningPlan) -> dict[str, list[int]]:
        """Root-channel indices each group loses under `plan` (least important first, branches kept alive)."""
        kept = self.kept(plan)
        out = {}
        for g in self.groups:
            n = g.channels - kept[g.name]
            if n <= 0:
                continue
            key = (g.name, n, plan.criterion)
            if key not in self._selection:
                if g.conv_groups > 1:
                    self._selection[key] = self._select_conv_groups(g, n, self.scores(plan.criterion)[g.name])
                elif g.blocks > 1:
                    self._selection[key] = self._select_per_block(g, n, self.scores(plan.criterion)[g.name],
                                                                  whole=g.name not in self._experts)
                elif g.multiple > 1 and not self._segments.get(g.name) and n % g.multiple == 0:
                    self._selection[key] = self._select_blocks(g, n, plan.criterion)
                else:
                    self._selection[key] = self._select(g, n, self.order(plan.criterion)[g.name])
            out[g.name] = self._selection[key]
        return out

    def _select_conv_groups(self, g: GroupInfo, n_prune: int, scores: torch.Tensor) -> list[int]:
        """`n_prune` channels (rounded up to a multiple of the conv groups), the same count from each of the
        `g.conv_groups` equal blocks a grouped convolution splits them into, lowest scores first.

        Where a grouped conv reads these channels (its input), every conv group loses the same offsets, ranked
        by the score averaged over the conv groups: that is what Torch-Pruning's MetaPruner does, and what its
        `ConvPruner.prune_in_channels` assumes (it keeps the first conv group's kept offsets for every conv
        group; other indices would run but silently mix up weights). Where grouped convs only produce these
        channels (their output), each conv group loses its own least important channels."""
        G = g.conv_groups
        size = g.channels // G
        per = min(-(-n_prune // G), size - 1)
        s = scores.detach().float().reshape(G, size)
        if self._conv_in.get(g.name, True):
            offs = torch.argsort(s.mean(0), stable=True)[:per].tolist()
            return sorted(k * size + o for k in range(G) for o in offs)
        return _lowest_in_each_block(s, G, 1, per)

    def _select_per_block(self, g: GroupInfo, n_prune: int, scores: torch.Tensor, whole: bool = True) -> list[int]:
        """`n_prune` channels, the same number from each of the `g.blocks` equal blocks (rounded up to a multiple
        from each, at most all but one multiple of a block): in each block its lowest-scored heads (`whole`: aligned
        runs of `g.multiple` channels, by summed score) or channels (an experts' group: its neurons one by one, a
        multiple of them). A grouped-query attention's key/value repeat gives query heads j x n_rep ... (j + 1) x
        n_rep - 1 to key/value head j, so every key/value head must keep the same number of query heads, and those
        of its own block; experts share one tensor, so every expert keeps as many neurons."""
        unit = g.multiple if whole else 1
        n_units = min(-(-n_prune // g.unit), g.channels // g.blocks // g.multiple - 1) * (g.multiple // unit)
        return _lowest_in_each_block(scores, g.blocks, unit, n_units)

    def _select_blocks(self, g: GroupInfo, n_prune: int, criterion: str) -> list[int]:
        """Whole aligned blocks of `g.multiple` channels (attention heads: q/k/v widths must stay a multiple of the
        head size), the blocks with the lowest summed channel score first."""
        if self._fused_layout(g) is not None:  # a unit has channels in every part (q, k and v; gate and up)
            return self._fused_heads(g, n_prune, self._fused_head_scores(g, self.scores(criterion)[g.name]))
        scores = self.scores(criterion)[g.name].reshape(-1, g.multiple).sum(1)
        blocks = torch.argsort(scores, stable=True)[: n_prune // g.multiple].tolist()
        return sorted(b * g.multiple + i for b in blocks for i in range(g.multiple))

    def _forward_shape(self, model: nn.Module) -> tuple:
        """Shapes of every tensor the model returns on the example (a tensor's shape for a plain model)."""
        with torch.no_grad():
            sig = output_signature(call_model(model.eval(), self.example))
        return sig[0] if len(sig) == 1 else sig

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def query_head_groups(self) -> list[str]:
        """Groups that are an attention's query heads alone, its key/value heads intact (`_query_head_groups`)."""
        return list(self.__dict__.get("_query_heads", {}))

    @property
    def expert_groups(self) -> list[str]:
        """Groups that are a mixture-of-experts layer's neurons (`pruning/experts.py`)."""
        return list(self.__dict__.get("_experts", {}))

    @property
    def prunable_names(self) -> list[str]:
        return [g.name for g in self.groups if g.prunable]

    def group(self, name: str) -> GroupInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise AutopruneError(f"unknown group {name!r}; the groups are {self.names}") from None

    # ----------------------------------------------------------------- plans
    def plan(self, ratios: dict[str, float], *, criterion: str | None = None) -> PruningPlan:
        """A plan over this model's groups (missing groups get ratio 0)."""
        full = {g.name: 0.0 for g in self.groups if g.prunable}
        full.update({k: float(v) for k, v in ratios.items()})
        return PruningPlan(full, self.mode, criterion or self.criterion, self.round_to)

    def uniform_plan(self, ratio: float) -> PruningPlan:
        return self.plan({n: min(ratio, self.max_ratio) for n in self.prunable_names})

    def validate(self, plan: PruningPlan) -> None:
        plan.validate(self.names, self.max_ratio, self.prunable_names)

    def kept(self, plan: PruningPlan) -> dict[str, int]:
        """Channels each group keeps under `plan` (all groups, unpruned ones at full width)."""
        return {
            g.name: self._kept_count(g, plan.ratios.get(g.name, 0.0), plan.round_to) if g.prunable else g.channels
            for g in self.groups
        }

    def plan_from_kept(self, kept: dict[str, int]) -> PruningPlan:
        """The plan that reproduces given channel counts (used by ranking baselines)."""
        ratios = {}
        for g in self.groups:
            if g.prunable:
                k = kept.get(g.name, g.channels)
                ratios[g.name] = round((g.channels - k) / g.channels, 6)
        return self.plan(ratios)

    # ----------------------------------------------------------------- scores
    def scores(self, criterion: str | None = None) -> dict[str, torch.Tensor]:
        """One importance score per root channel for every prunable group (low = pruned first)."""
        crit = criterion or self.criterion
        if crit in self._scores:
            return self._scores[crit]
        work = clone_module(self.base)
        dg = self.trace(work)
        by_name = dict(work.named_modules())
        out: dict[str, torch.Tensor] = {}
        if crit == "apoz":
            hooked = {}
            for g in self.groups:
                bns = [m.module for m in g.members if m.role == "out" and isinstance(by_name[m.module], nn.modules.batchnorm._BatchNorm)]
                hooked[g.name] = by_name[bns[0] if bns else g.name]
            apoz = criteria.apoz_scores(work, hooked, self.calibration or [(self.example, torch.zeros(1, dtype=torch.long))])
            for g in self.groups:
                if g.prunable:
                    out[g.name] = apoz[g.name].reshape(-1)[: g.channels] if apoz[g.name].numel() >= g.channels else torch.ones(g.channels)
            self._scores[crit] = out
            return out
        imp = criteria.make_importance(crit)
        if criteria.needs_gradients(crit):
            if not self.calibration:
                raise AutopruneError(f"criterion {crit!r} needs calibration batches with targets")
            criteria.prepare_gradients(crit, work, imp, self.calibration[:2], getattr(self, "task", None),
                                       self.base if getattr(getattr(self, "task", None), "needs_teacher", False) else None)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            for g in self.groups:
                if not g.prunable:
                    continue
                if g.name in self._experts:  # no Torch-Pruning group: the neurons' weight magnitudes
                    out[g.name] = self._experts[g.name].scores(self.base.get_submodule(g.name), crit)
                    continue
                pg = self._walk(work, dg, g.name, list(range(g.channels)))
                s = imp(pg)
                if s is None or len(s) != g.channels:
                    s = torch.zeros(g.channels)
                out[g.name] = torch.nan_to_num(s.detach().float().cpu(), nan=0.0)
        finally:
            torch.random.set_rng_state(gen_state)
        self._scores[crit] = out
        return out

    def order(self, criterion: str | None = None) -> dict[str, list[int]]:
        """Channel indices of each group, least important first (stable); computed once per criterion, as the
        scores are."""
        crit = criterion or self.criterion
        if crit not in self._orders:
            self._orders[crit] = {n: torch.argsort(s, stable=True).tolist() for n, s in self.scores(crit).items()}
        return self._orders[crit]

    # ----------------------------------------------------------------- apply
    def apply(self, plan: PruningPlan, *, check: bool = True) -> nn.Module:
        """A new model with `plan` applied; the base model is left untouched."""
        self.validate(plan)
        if plan.mode == "unstructured":
            return self._apply_unstructured(plan)
        pruned = self.pruned_indices(plan)
        work = self._build(pruned)
        work._autoprune_plan = plan.to_dict()  # type: ignore[assignment]
        if check and pruned:
            try:
                shape = self._forward_shape(work)
            except Exception as e:
                raise AutopruneError(f"plan {plan.summary()} gives a model whose forward fails: {type(e).__name__}: {e}") from None
            want = self._forward_shape(self.base)
            if shape != want:
                raise AutopruneError(f"plan changed the output shape from {want} to {shape}")
        return work

    def _build(self, pruned: dict[str, list[int]], *, share_rest: bool = False) -> nn.Module:
        """A copy of the base with root channels `pruned[group]` of each group cut (`apply`'s model); `share_rest`:
        the tensors no cut replaces are the base's own, not copies (a throwaway model that is only run)."""
        if not pruned:
            return clone_module(self.base)
        cuts = self._cuts(pruned)
        # the tensors `cut` is about to replace are not copied first: the copy refers to the base's until its
        # cut gives it its own (one tensor operation instead of two, for most of a CNN's tensors)
        base_mods = self._base_modules()
        kinds, tensors, slow = {}, {}, set()  # a layer's tensors are shared only if `cut` slices it itself for
        for key, (handler, _i) in cuts.items():  # every cut it gets in this plan
            name, kind, _ = key
            if kind == "module":
                kinds[key], tensors[name] = self._shareable(name, handler)
                if kinds[key] is None:
                    slow.add(name)
        shared = {id(t): t for name, ts in tensors.items() if name not in slow for t in ts}
        rest = [t for t in self.base.state_dict(keep_vars=True).values()] if share_rest else []
        memo: dict[int, Any] = {id(t): t for t in rest}
        work = clone_module(self.base, share=shared.values(), memo=memo)
        with torch.no_grad():  # the cuts make new leaf tensors: nothing to record
            for key, (handler, idxs) in cuts.items():
                name, kind, _ = key
                if kind == "module":
                    cut(memo[id(base_mods[name])], handler, idxs, copy=True, kind=kinds[key])
                else:  # a parameter a module owns directly (a ViT's cls_token): the handler returns the cut one
                    # Torch-Pruning's one ParameterPruner serves every parameter: its Dependency sets the
                    # parameter's dimension before each call, and so must this (a BEiT cut its (hidden,) layer
                    # scales along the class token's dimension 2)
                    handler.__self__.pruning_dim = self._param_dims[name]
                    parent, _, leaf = name.rpartition(".")
                    owner = work.get_submodule(parent) if parent else work
                    setattr(owner, leaf, handler(getattr(owner, leaf), list(idxs)))
        if shared:  # what no cut replaced (a conv's bias when only its inputs go, a BatchNorm's step count): copied
            for name in {name for name, kind, _ in cuts if kind == "module"}:
                m = memo[id(base_mods[name])]
                for slots in (m._parameters, m._buffers):
                    for k, t in slots.items():
                        if t is not None and id(t) in shared and t is shared[id(t)]:
                            slots[k] = copy_tensor(t)
        for name, idxs in pruned.items():
            if name in self.__dict__.get("_experts", {}):
                self._experts[name].cut(work.get_submodule(name), idxs)
        self._retie(memo)
        for m in (base_mods.values() if not share_rest else ()):  # the copy's modules, without walking its tree
            for p in memo[id(m)]._parameters.values():  # again (the base's own tensors, when shared, stay as they are)
                if p is not None and not p.requires_grad:
                    p.requires_grad_(True)
        if self._attention_names():  # (a CNN has none: no walk)
            touched = {name.rpartition(".")[0] for name, kind, _ in cuts if kind == "module"}
            sync_attention_attributes(work, touched & self._attention_names())
            for n in self._attention_names() - touched:  # (an uncut T5 cross-attention reads the first one's bias)
                share_cross_attention_bias(work.get_submodule(n))
        if self._head_tables():
            self._cut_head_tables(work, {q: idxs for (q, kind, fn), (_, idxs) in cuts.items()
                                         if kind == "module" and fn == "prune_out_channels"})
        if self._alibi_outputs():
            self._keep_alibi_heads(work, {d: idxs for (d, kind, fn), (_, idxs) in cuts.items()
                                          if kind == "module" and fn == "prune_in_channels"})
        if any(m.training for m in base_mods.values()):  # the copy is in the base's mode, which is eval unless
            work.eval()                                   # someone switched it
        return work

    def removed_outputs(self, plan: PruningPlan) -> dict[str, list[int]]:
        """Output channels each layer loses under `plan`, as indices into the unpruned layer: the cuts `apply` makes
        (no tracing; a grouped-query attention's query heads mapped as `apply` maps them)."""
        pruned = self.pruned_indices(plan) if plan.mode == "structured" else {}
        if not pruned:
            return {}
        cuts = self._cuts(pruned)
        dg = self._base_graph[1]
        return {name: list(ix) for (name, kind, _), (handler, ix) in cuts.items()
                if kind == "module" and dg.is_out_channel_pruning_fn(handler)}

    def _base_modules(self) -> dict[str, nn.Module]:
        if getattr(self, "_base_mods", None) is None:
            self._base_mods = dict(self.base.named_modules(remove_duplicate=False))
        return self._base_mods

    def _tied_slots(self) -> list[list[tuple[str, str]]]:
        """[(module name, parameter name), ...] of each parameter the base holds in more than one module."""
        tied = self.__dict__.get("_tied")
        if tied is None:
            slots: dict[int, dict[tuple[int, str], tuple[str, str]]] = {}
            for name, m in self._base_modules().items():
                for k, t in m._parameters.items():
                    if t is not None:  # (a module under two names holds it once)
                        slots.setdefault(id(t), {}).setdefault((id(m), k), (name, k))
            tied = self._tied = [list(v.values()) for v in slots.values() if len(v) > 1]
        return tied

    def _retie(self, memo: dict[int, Any]) -> int:
        """Tie again, in the copy `memo` maps the base to, the parameters the base shares between modules (a language
        model's output layer and its input embedding) that the cuts gave each module a copy of; returns how many.

        Why: each layer is cut on its own (here and in Torch-Pruning), so a tied tensor came out as two equal
        tensors: the pruned model counted the table twice (a tied Llama's parameters were estimated below the
        count) and would train the two apart. A slot is re-tied only to a tensor equal to its own."""
        mods = self._base_modules()
        n = 0
        for group in self._tied_slots():
            owners = [(memo[id(mods[name])], k) for name, k in group if id(mods[name]) in memo]
            tensors = [o._parameters[k] for o, k in owners]
            first = tensors[0]
            for (o, k), t in zip(owners[1:], tensors[1:]):
                if t is not first and t is not None and first is not None and t.shape == first.shape \
                        and t.dtype == first.dtype and t.device == first.device and torch.equal(t, first):
                    o._parameters[k] = first
                    n += 1
        return n

    def _attention_names(self) -> frozenset[str]:
        """The base's modules whose head counts `sync_attention_attributes` keeps (BERT/ViT-style attention)."""
        if getattr(self, "_attn_names", None) is None:
            self._attn_names = frozenset(
                n for n, m in self._base_modules().items()
                if head_style(m) is not None)
        return self._attn_names

    def _head_tables(self) -> dict[str, tuple[str, int, list[str]]]:
        """Modules with per-head tables Torch-Pruning does not cut: the module -> (the query projection whose cut heads
        the table loses, head size, the qualified names of its tables, one column per head: Swin's
        `relative_position_bias_table`, T5's and MPNet's `relative_attention_bias`). Cut by `_cut_head_tables`."""
        if getattr(self, "_tables", None) is None:
            mods = self._base_modules()
            found: dict[str, tuple[str, int, list[str]]] = {}
            for n, m in mods.items():
                q_leaf = next((k for k in (*QUERY_NAMES, "q_proj") if isinstance(m._modules.get(k), nn.Linear)), None)
                size = next(iter(head_sizes(m)), None)
                if q_leaf is None or size is None:
                    continue
                heads = m._modules[q_leaf].out_features // size
                # Swin's `relative_position_bias_table`; T5's `relative_attention_bias` (an embedding of one column
                # per head, in the first layer, whose bias every layer adds: all layers' heads are one group there)
                tables = [f"{n}.{p}" if n else p for p, t in m.named_parameters()
                          if (p.rpartition(".")[2] == "relative_position_bias_table" or p == "relative_attention_bias.weight")
                          and t.dim() == 2 and t.shape[1] == heads]
                if tables:
                    found[n] = (f"{n}.{q_leaf}" if n else q_leaf, size, tables)
            # a table beside the layers rather than in an attention (MPNet's encoder holds the one every layer
            # adds): cut by the heads of the first attention of that many heads (they are all one group there)
            attn = [(f"{n}.{leaf}", q, size) for n, m in mods.items() if n not in found
                    and (leaf := next((k for k in QUERY_NAMES if m._modules.get(k) is not None), None))
                    and isinstance(q := m._modules[leaf], nn.Linear) and (size := next(iter(head_sizes(m)), None))]
            for n, m in mods.items():
                emb = m._modules.get("relative_attention_bias")
                if not isinstance(emb, nn.Embedding) or n in found or any(
                        f"{n}.relative_attention_bias.weight" in ts for _, _, ts in found.values()):
                    continue
                first = next(((q_name, size) for q_name, q, size in attn if q_name.startswith(n)
                              and q.out_features // size == emb.embedding_dim), None)
                if first is not None:
                    found[n] = (first[0], first[1], [f"{n}.relative_attention_bias.weight" if n else
                                                     "relative_attention_bias.weight"])
            self._tables = found
        return self._tables

    def _alibi_outputs(self) -> dict[str, str]:
        """The output projections of the base's attentions handed ALiBi biases (BLOOM's `dense`, MPT's `out_proj`)
        -> the attention."""
        if getattr(self, "_alibi_outs", None) is None:
            out = {"qkv": "dense", "mpt": "out_proj"}
            self._alibi_outs = {f"{n}.{out[style]}" if n else out[style]: n for n, m in self._base_modules().items()
                                if (style := head_style(m)) in out and takes_alibi(m)}
        return self._alibi_outs

    def _keep_alibi_heads(self, work: nn.Module, removed_inputs: dict[str, Any]) -> None:
        """In `work` (a cut copy of the base), let each attention handed ALiBi biases whose output projection lost
        `removed_inputs[projection]` read its kept heads' rows alone (`keep_alibi_heads`)."""
        base = self._base_modules()
        for dense, attn in self._alibi_outputs().items():
            if removed_inputs.get(dense):
                keep_alibi_heads(work.get_submodule(attn), base[attn], removed_inputs[dense])

    def _head_norms(self) -> list[str]:
        """Parameters of the norms an attention applies to each head alone (`HEAD_NORMS` whose weights are one head
        wide: Qwen3's and Gemma3's `q_norm`, LFM2's `q_layernorm`, HunYuan's `query_layernorm`), which no head cut
        changes."""
        if getattr(self, "_norms", None) is None:
            found = []
            for n, m in self._base_modules().items():
                size = next(iter(head_sizes(m)), None)
                if size is None or not any(isinstance(m._modules.get(k), nn.Linear) for k in ("q_proj", "query_key_value")):
                    continue
                for leaf in HEAD_NORMS:
                    norm = m._modules.get(leaf)
                    if isinstance(norm, nn.Module):
                        found += [f"{n}.{leaf}.{p}" if n else f"{leaf}.{p}" for p, t in norm.named_parameters()
                                  if tuple(t.shape) == (size,)]
            self._norms = found
        return self._norms

    def _cut_head_tables(self, work: nn.Module, removed_q: dict[str, Any]) -> None:
        """Cut, in `work`, the per-head bias columns (`_head_tables`) of the heads whose query channels went
        (`removed_q`: query projection -> removed output channels). Why by hand: Swin adds a relative-position
        bias per head to the attention scores, read from a table with one column per head, which Torch-Pruning
        cuts as if its columns were channels (a cut of one head of 8 channels took all 4 columns), so Swin's heads
        were left intact."""
        for q, size, tables in self._head_tables().values():
            idxs = removed_q.get(q)
            if not idxs:
                continue
            gone = {int(i) // size for i in idxs}
            for t in tables:
                parent, _, leaf = t.rpartition(".")
                owner = work.get_submodule(parent) if parent else work
                table = owner._parameters[leaf]
                keep = torch.tensor([h for h in range(table.shape[1]) if h not in gone], dtype=torch.long)
                owner._parameters[leaf] = nn.Parameter(table.detach().index_select(1, keep.to(table.device)),
                                                       requires_grad=table.requires_grad)
                if isinstance(owner, nn.Embedding):  # (T5's: its width is what it says it is)
                    owner.embedding_dim = len(keep)

    def _table_modules(self, model: nn.Module) -> set[int]:
        """ids of `model`'s modules that `_walk` keeps out of Torch-Pruning's groups, which cut them as layers: per-head
        tables (`_head_tables`: T5's relative-attention embedding, which `_cut_head_tables` cuts per head; the walk
        cut its 4 columns as if they were 32 channels) and per-head norms (`_head_norms`: Persimmon's q/k LayerNorms,
        which no head cut changes)."""
        out = set()
        for _q, _size, tables in self._head_tables().values():
            for t in tables:
                owner = model.get_submodule(t.rpartition(".")[0]) if "." in t else model
                if isinstance(owner, nn.Embedding):
                    out.add(id(owner))
        return out | {id(model.get_submodule(p.rpartition(".")[0])) for p in self._head_norms()}

    def _shareable(self, name: str, handler: Any) -> tuple[str | None, list[torch.Tensor]]:
        """(`cut`'s own path for layer `name` and `handler`, as `fast_kind` names it, None when Torch-Pruning's
        function cuts it; the base tensors of the layer that `apply` may then leave uncopied until they are cut,
        since `cut` replaces tensors and never writes them: each held in one slot of the whole model, a tied
        weight is copied as usual)."""
        key = (name, getattr(handler, "__name__", ""), type(getattr(handler, "__self__", None)))
        if getattr(self, "_share_cache", None) is None:
            self._share_cache: dict[tuple, tuple[str | None, list[torch.Tensor]]] = {}
            slots: dict[int, int] = {}
            for m in self._base_modules().values():
                for t in (*m._parameters.values(), *m._buffers.values()):
                    if t is not None:
                        slots[id(t)] = slots.get(id(t), 0) + 1
            self._slot_counts = slots
        if key not in self._share_cache:
            m = self._base_modules()[name]
            kind = fast_kind(m, handler, copy=True)
            self._share_cache[key] = (kind, [] if kind is None else [
                t for t in (*m._parameters.values(), *m._buffers.values())
                if t is not None and self._slot_counts.get(id(t)) == 1])
        return self._share_cache[key]

    def _cuts(self, pruned: dict[str, list[int]]) -> dict[tuple[str, str, str], tuple[Any, tuple[int, ...]]]:
        """Every (layer, pruning function) a plan touches, with the union of the indices it removes there, in the
        unpruned model's coordinates.

        Torch-Pruning's groups are computed once per (group, indices) on one graph traced from a pristine copy
        of the base model, and cached; applying a plan is then a copy and one cut per layer, with no tracing.
        (Re-tracing the copy, as `pg.prune()` needs, cost 22-35 % of a trial.) Cutting each layer once with
        the union of its indices in the original coordinates gives what pruning the groups one after another
        gives (tests compare the two), whatever the order, concatenations included."""
        if self._base_graph is None:  # dropped when pickled (see __getstate__)
            template = clone_module(self.base)
            self._base_graph = (template, self.trace(template), _module_names(template))
        template, dg, names = self._base_graph
        cuts: dict[tuple[str, str, str], tuple[Any, tuple[int, ...]]] = {}
        for gname, idxs in pruned.items():
            key = (gname, tuple(idxs))
            items = self._group_cuts.get(key)
            if items is None:
                items = self._group_cuts[key] = self._group_items(gname, list(idxs))
            for k, (handler, ix) in items:
                got = cuts.get(k)  # a layer two groups cut (concatenated branches) loses the union of both
                cuts[k] = (handler, ix) if got is None else (handler, tuple(sorted({*got[1], *ix})))
        return cuts

    def _group_items(self, gname: str, idxs: list[int]) -> list:
        """[((layer, kind, pruning function name), (function, sorted indices))] that removing root channels `idxs`
        of group `gname` cuts: from the group's map (`_group_map`) where it has one, else from Torch-Pruning."""
        if gname in self.__dict__.get("_experts", {}):
            return []  # cut by `_build` itself (`Experts.cut`)
        if gname in self.__dict__.get("_fused", {}):
            return self._tp_items(gname, idxs)  # whole units only: their cuts come from `_walk`
        gmap = self._group_maps.get(gname)
        if gmap is None:
            gmap = self._group_maps[gname] = self._group_map(gname)
        if gmap is False:
            return self._tp_items(gname, idxs)
        items, checks = gmap
        for roots, limit in checks:
            if len({i for r in idxs for i in roots.get(r, ())}) >= limit:
                raise AutopruneError(f"group {gname!r}: pruning {len(idxs)} of {self.group(gname).channels} channels "
                                     "would remove a whole layer")
        out = []
        for k, handler, roots in items:
            ix = {i for r in idxs for i in roots.get(r, ())}
            if ix:
                out.append((k, (handler, tuple(sorted(ix)))))
        return out

    def _tp_items(self, gname: str, idxs: list[int]) -> list:
        """`_group_items` by Torch-Pruning itself: its dependency walk from the group's root (~0.1-1 ms)."""
        template, dg, _ = self._base_graph
        group = self._walk(template, dg, gname, idxs)
        if not dg.check_pruning_group(group):
            raise AutopruneError(f"group {gname!r}: pruning {len(idxs)} of {self.group(gname).channels} channels "
                                 "would remove a whole layer")
        items: dict[tuple[str, str, str], tuple[Any, tuple[int, ...]]] = {}
        for dep, ix in group:
            k = self._dep_key(dep)
            if k is not None:
                items[k] = (dep.handler, tuple(sorted({int(i) for i in ix} | set(items.get(k, (0, ()))[1]))))
        return list(items.items())

    def _dep_key(self, dep: Any) -> tuple[str, str, str] | None:
        _, dg, names = self._base_graph
        t = dep.target
        if t.type == tp.ops.OPTYPE.PARAMETER:
            name, kind = dg._param_to_name[t.module], "parameter"
            self._param_dims[name] = t.pruning_dim
        elif id(t.module) in names:
            name, kind = names[id(t.module)], "module"
        else:  # functional ops (add, cat, reshape) have no weights to cut
            return None
        return name, kind, getattr(dep.handler, "__name__", repr(dep.handler))

    def _group_map(self, gname: str) -> tuple | bool:
        """Which channels of which layers each root channel of group `gname` takes with it, from one Torch-Pruning
        walk with every root channel, or False where that does not reproduce Torch-Pruning's own walk.

        Why: every new (group, channels) pair a trial meets costs a Torch-Pruning walk (its index maps are
        rebuilt each time), ~0.4 ms of a ResNet-20 trial. Torch-Pruning records, for every index it reaches, the
        root channel it came from; its maps (concatenation and split offsets, flattening) send each root channel
        on its own, so the channels a set of roots takes are the union of theirs. The map is checked against
        Torch-Pruning's walk on three random sets of channels, with its whole-layer check, and not used (False)
        if any differs."""
        import random

        template, dg, _ = self._base_graph
        g = self.group(gname)
        try:
            group = self._walk(template, dg, gname, list(range(g.channels)))
        except Exception:  # noqa: BLE001 - Torch-Pruning's per-set walk stays available
            return False
        items: dict[tuple[str, str, str], tuple[Any, dict[int, list[int]]]] = {}
        checks = []
        for item in group:
            dep, ix = item.dep, item.idxs
            roots_of = getattr(item, "root_idxs", None)
            if roots_of is None or len(roots_of) != len(ix):
                return False
            roots: dict[int, list[int]] = {}
            for i, r in zip(ix, roots_of):
                roots.setdefault(int(r), []).append(int(i))
            limit = None
            if dg.is_out_channel_pruning_fn(dep.handler):
                limit = dg.get_out_channels(dep.target.module)
            elif dg.is_in_channel_pruning_fn(dep.handler):
                limit = dg.get_in_channels(dep.target.module)
            if limit is not None:
                checks.append((roots, int(limit)))
            k = self._dep_key(dep)
            if k is not None:
                if k in items:  # merged by Torch-Pruning per (layer, function) already; one entry each
                    return False
                items[k] = (dep.handler, roots)
        gmap = ([(k, h, roots) for k, (h, roots) in items.items()], checks)
        rng = random.Random(g.channels)
        for frac in (0.25, 0.5, 0.75):
            n = max(1, min(g.channels - g.min_keep, round(frac * g.channels)))
            idxs = sorted(rng.sample(range(g.channels), n))
            try:
                want = sorted(self._tp_items(gname, idxs), key=lambda kv: kv[0])
            except AutopruneError:
                continue  # a set Torch-Pruning refuses: no comparison of cuts to make
            self._group_maps[gname] = gmap
            try:
                got = sorted(self._group_items(gname, idxs), key=lambda kv: kv[0])
            except AutopruneError:
                got = None
            finally:
                del self._group_maps[gname]
            if got != want:
                return False
        return gmap

    def __getstate__(self) -> dict:
        # the traced graph holds references that do not pickle (the Ray backend ships this object): rebuilt on use
        state = dict(self.__dict__)
        state["_base_graph"], state["_group_cuts"], state["_group_maps"] = None, {}, {}
        for k in ("_base_mods", "_share_cache", "_slot_counts", "_attn_names"):  # ids of this process's tensors
            state.pop(k, None)
        return state

    def _apply_unstructured(self, plan: PruningPlan) -> nn.Module:
        """Per-layer magnitude masks (torch.nn.utils.prune), made permanent: zeros, same shapes."""
        work = clone_module(self.base)
        mods = dict(work.named_modules())
        for g in self.groups:
            r = plan.ratios.get(g.name, 0.0)
            if r <= 0:
                continue
            for layer in g.layers:
                m = mods[layer]
                nn_prune.l1_unstructured(m, "weight", amount=float(r))
                nn_prune.remove(m, "weight")
        work._autoprune_plan = plan.to_dict()  # type: ignore[assignment]
        return work.eval()

    # ----------------------------------------------------------------- views
    def kind(self, g: GroupInfo) -> str:
        """What a group's channels are: attention heads, FFN neurons, grouped-conv or plain channels."""
        mods = dict(self.base.named_modules())
        layers = [mods[n] for n in g.layers if n in mods]
        members = [mods[m.module] for m in g.members if m.module in mods]
        if self._fused_layout(g) is not None:
            return self._fused_layout(g).describe()
        if g.name in self.__dict__.get("_experts", {}):
            e = self._experts[g.name]
            return f"experts' neurons ({e.n} experts of {e.inter}, as many from each)"
        if layers and all(isinstance(m, (nn.Linear, HFConv1D)) for m in layers):
            kv = self._kv_layout(g.name) if g.multiple > 1 else None
            if g.name in self.__dict__.get("_query_heads", {}) and g.blocks > 1:
                return f"attention heads, grouped-query ({g.channels // g.multiple} query heads of {g.multiple}, " \
                       f"as many from each of {g.blocks} key/value heads)"
            if g.name in self.__dict__.get("_query_heads", {}) and g.multiple > 1:
                return f"attention heads, multi-query ({g.channels // g.multiple} query heads of {g.multiple}, " \
                       "one key/value head for all)"
            if kv is not None:  # grouped-query attention: whole key/value heads, each with its query heads
                return f"attention heads, grouped ({g.channels // g.multiple} key/value heads of {g.multiple}, " \
                       f"{kv[0]} query heads each)"
            if g.multiple > 1 and len(layers) >= 3:
                return f"attention heads ({g.channels // g.multiple} of {g.multiple})"
            return "neurons"
        if g.conv_groups > 1:
            return f"channels, grouped conv ({g.conv_groups} conv groups)"
        if any(isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.out_channels for m in members):
            return "channels, depthwise conv"
        return "channels"

    def table(self, costs: "Iterable[dict] | None" = None) -> pd.DataFrame:
        rows = [
            {
                "group": g.name,
                "kind": self.kind(g),
                "channels": g.channels,
                "layers": len(g.layers),
                "members": ", ".join(g.layers),
                "prunable": g.prunable,
                "multiple": g.multiple,
                "reason": g.reason,
            }
            for g in self.groups
        ]
        return pd.DataFrame(rows)
