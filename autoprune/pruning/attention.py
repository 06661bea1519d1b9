"""`transformers` attention, as pruning sees it: the head counts an attention module keeps beside its projections
(synced after a cut), its head size, tracing without the key/value cache or the rotary embedding, and the layouts
of fused projections (q/k/v or gate/up in one layer). `groups` reads these; nothing here knows Torch-Pruning."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from autoprune.pruning.layers import ROOT_TYPES, out_width


def sync_attention_attributes(model: nn.Module, only: Iterable[str] | None = None) -> int:
    """After heads were removed, set the head counts that `transformers` attention modules keep as attributes
    (BERT/ViT style: `num_attention_heads`, `attention_head_size`, `all_head_size` next to `query`/`key`/`value`
    Linear layers; BART style: `num_heads` next to `q_proj` and `head_dim`, and `num_key_value_heads` next to `k_proj`;
    Phi-3 style: the query head count in the layer's own `LayerConfig`; Llama style: `num_key_value_groups`, the
    query heads per key/value head, beside `q_proj` and `k_proj`; BLOOM, Falcon and Persimmon: `num_heads` (and
    Falcon's `num_kv_heads`) beside a fused `query_key_value`; MPT: `n_heads` beside `Wqkv`; GPTBigCode with one
    key/value head: `embed_dim`, where it splits its `c_attn`) from the pruned widths, so that the
    modules compute with the heads they have (Whisper and OPT reshape with `num_heads`, StableLM its keys and values
    with `num_key_value_heads`, Phi-3 slices its qkv_proj at its config's count) and their repr tells the
    truth; returns how many modules were updated. Torch-Pruning prunes the weights but does not know these
    attributes. `only`: the qualified names of the modules to look at (default: all)."""
    n = 0
    for m in (model.modules() if only is None else (model.get_submodule(x) for x in only)):
        style = head_style(m, pruned=True)
        if style == "bert":
            q, size = query_of(m), m.attention_head_size
            if getattr(m, "all_head_size", None) != q.out_features:
                m.all_head_size = q.out_features
                m.num_attention_heads = q.out_features // size
                n += 1
        elif style == "bigcode":  # GPTBigCode's multi-query c_attn, [q | k | v], split at `embed_dim` (the query width)
            width = m.c_proj.in_features
            want = {"embed_dim": width, "split_size": width, "num_heads": width // m.head_dim}
            if isinstance(m.__dict__.get("num_key_value_groups"), int):
                want["num_key_value_groups"] = width // m.head_dim
            n += _set_stale(m, want)
        elif style == "gpt2":  # a fused q/k/v projection split in three by `split_size`
            split = out_width(m.c_attn) // 3
            if m.split_size != split:
                m.split_size, m.num_heads = split, split // m.head_dim
                n += 1
        elif style == "t5":  # `n_heads` beside `q` and `key_value_proj_dim` (T5's reshape reads -1 heads)
            heads = m.q.out_features // m.key_value_proj_dim
            if m.n_heads != heads:
                m.n_heads, m.inner_dim = heads, m.q.out_features
                n += 1
            share_cross_attention_bias(m)
        elif style == "phi3":  # a fused qkv_proj sliced at the config's query head count (Phi-3)
            head = m.head_dim
            heads = m.o_proj.in_features // head
            kv = (m.qkv_proj.out_features - heads * head) // (2 * head)
            if m.config.num_attention_heads != heads or m.num_key_value_heads != kv:
                m.config = LayerConfig(m.config, num_attention_heads=heads, num_key_value_heads=kv)
                m.num_key_value_heads = kv
                if isinstance(m.__dict__.get("num_key_value_groups"), int) and kv:  # (a multi-query cut changes it)
                    m.num_key_value_groups = heads // kv
                n += 1
        elif style == "bart":  # BART/Whisper style: `q_proj`, `head_dim`, `num_heads` (its key/value reshape reads it)
            attr = "num_heads" if isinstance(m.__dict__.get("num_heads"), int) else "num_attention_heads"
            want = {attr: m.q_proj.out_features // m.head_dim}
            k = m._modules.get("k_proj")  # StableLM views its keys and values at `num_key_value_heads` too
            if isinstance(m.__dict__.get("num_key_value_heads"), int) and isinstance(k, nn.Linear):
                want["num_key_value_heads"] = k.out_features // m.head_dim
            if _kv_groups(m) is not None:
                want["num_key_value_groups"] = _kv_groups(m)
            n += _set_stale(m, want)
        elif style == "qkv":  # BLOOM, Falcon, Persimmon: a fused query_key_value viewed at `num_heads`; Falcon its keys
            heads = m.dense.in_features // m.head_dim  # at `num_kv_heads` (all heads' without grouped queries)
            want = {"num_heads": heads}
            if isinstance(m.__dict__.get("num_kv_heads"), int) and m.query_key_value.out_features == 3 * heads * m.head_dim:
                want["num_kv_heads"] = heads
            n += _set_stale(m, want)
        elif style == "mpt":  # MPT: a fused Wqkv ([q | k | v]) viewed at `n_heads`
            heads = m.out_proj.in_features // m.head_dim
            if m.n_heads != heads:
                m.n_heads = heads
                n += 1
        elif style == "grouped":  # Llama style: query heads per key/value head, which `repeat_kv` reads
            groups = _kv_groups(m)
            if groups is not None and m.num_key_value_groups != groups:
                m.num_key_value_groups = groups
                n += 1
    return n


def _set_stale(m: nn.Module, want: dict[str, int]) -> bool:
    """Set the attributes of `m` that differ from `want`; whether any did."""
    stale = {a: v for a, v in want.items() if getattr(m, a) != v}
    for a, v in stale.items():
        setattr(m, a, v)
    return bool(stale)


def _kv_groups(m: nn.Module) -> int | None:
    """Query heads per key/value head of an attention with `num_key_value_groups` beside `q_proj` and `k_proj`, from
    their widths (a multi-query attention's query-head cut changes it); None for any other module."""
    q, k = m._modules.get("q_proj"), m._modules.get("k_proj")
    if not (isinstance(m.__dict__.get("num_key_value_groups"), int) and isinstance(q, nn.Linear)
            and isinstance(k, nn.Linear) and k.out_features and q.out_features % k.out_features == 0):
        return None
    return q.out_features // k.out_features


def _one_bias_for_all_heads(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of a T5-style attention (`share_cross_attention_bias`): a cross-attention call handed a
    position bias made for another head count gets its first head's, broadcast over its own heads."""
    bias = kwargs.get("position_bias")
    if kwargs.get("key_value_states") is None or not isinstance(bias, torch.Tensor) or bias.dim() != 4 \
            or bias.shape[1] in (1, module.n_heads):
        return None
    return args, {**kwargs, "position_bias": bias[:, :1]}


def _alibi_of_kept_heads(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of an attention handed ALiBi biases (`keep_alibi_heads`): the rows of the heads it kept,
    in the biases (BLOOM's, a row per (sequence, head); MPT's, one per head) or in a mask they were folded into
    (Falcon's, a head dimension)."""
    heads, total = module.autoprune_heads, module.autoprune_total_heads
    alibi, mask, new = kwargs.get("alibi"), kwargs.get("attention_mask"), {}
    if isinstance(alibi, torch.Tensor) and alibi.dim() == 3 and alibi.shape[0] % total == 0:
        batch = alibi.shape[0] // total
        kept = torch.tensor(heads, dtype=torch.long, device=alibi.device)
        rows = alibi.reshape(batch, total, *alibi.shape[1:]).index_select(1, kept)
        new["alibi"] = rows.reshape(batch * len(heads), *alibi.shape[1:])
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == total > 1:
        new["attention_mask"] = mask.index_select(1, torch.tensor(heads, dtype=torch.long, device=mask.device))
    bias = kwargs.get("position_bias")  # MPT's: one per head, (heads, query, key)
    if isinstance(bias, torch.Tensor) and bias.dim() == 3 and bias.shape[0] == total > 1:
        new["position_bias"] = bias.index_select(0, torch.tensor(heads, dtype=torch.long, device=bias.device))
    return (args, {**kwargs, **new}) if new else None


def keep_alibi_heads(m: nn.Module, before: nn.Module, removed_inputs: Iterable[int]) -> None:
    """Record on attention `m` (cut from `before`, whose output projection lost `removed_inputs`) which of the model's
    heads it kept, and let it read their ALiBi rows alone (a forward pre-hook, `_alibi_of_kept_heads`, registered
    once): BLOOM builds its ALiBi biases once per model, one row per (sequence, head) at the configured head count
    (Falcon-RW folds them into its mask, MPT makes one per head), and every layer adds them to its scores, so a
    layer with fewer heads failed (and its heads were left intact), and one that took the first rows would have
    given its kept heads the wrong slopes.

    Why by hand: the biases are a tensor the model builds from its config, not a dependency Torch-Pruning traces."""
    count = before.__dict__.get("num_heads", before.__dict__.get("n_heads"))  # (MPT: n_heads)
    total = before.__dict__.get("autoprune_total_heads", count)
    heads = before.__dict__.get("autoprune_heads", list(range(count)))
    gone = {int(i) // before.head_dim for i in removed_inputs}
    m.autoprune_total_heads = total
    m.autoprune_heads = [h for j, h in enumerate(heads) if j not in gone]
    read_kept_alibi_rows(m)


def read_kept_alibi_rows(m: nn.Module) -> None:
    """Register `_alibi_of_kept_heads` on `m` (an attention whose `autoprune_heads` are set), once."""
    if not m.__dict__.get("_autoprune_alibi_hook"):
        m.register_forward_pre_hook(_alibi_of_kept_heads, with_kwargs=True)
        m._autoprune_alibi_hook = True


def share_cross_attention_bias(m: nn.Module) -> None:
    """Let T5-style cross-attention `m` (no relative position bias of its own) run with the position bias an
    earlier layer hands it, whatever that layer's head count: T5's decoder makes its cross-attention bias once, in
    the first layer, as zeros of that layer's head count (plus the mask, the same for every head), and hands it
    to every later layer, so a cut that left the layers different head counts failed, and the cross-attention
    heads were left intact. The bias is the same for every head, so a layer may take the first head's, broadcast.
    A forward pre-hook (`_one_bias_for_all_heads`), registered once; it changes nothing while the counts agree.

    Why by hand: the coupling is a tensor T5 builds from an attribute, not a dependency Torch-Pruning can trace."""
    if getattr(m, "has_relative_attention_bias", True) or m.__dict__.get("_autoprune_shared_bias"):
        return
    m.register_forward_pre_hook(_one_bias_for_all_heads, with_kwargs=True)
    m._autoprune_shared_bias = True


def head_style(m: nn.Module, pruned: bool = False) -> str | None:
    """Which head-count attributes an attention module keeps: "phi3" (`num_key_value_heads` and `head_dim` beside a
    fused `qkv_proj` and `o_proj`, the query head count read from its `config`), "gpt2" (`split_size`, `num_heads` and `head_dim` beside a
    fused `c_attn`), "bert" (`num_attention_heads`, `attention_head_size`, `all_head_size` beside a `QUERY_NAMES`
    projection), "t5" (`n_heads` and `key_value_proj_dim` beside `q`), "bart" (`num_heads`, or Swin's `num_attention_heads`, and
    `head_dim` beside `q_proj`, as in BART, OPT, Whisper, where the head count times `head_dim` is the q
    projection's width, until heads are cut: `pruned`), "grouped" (`num_key_value_groups` and `head_dim` beside
    `q_proj` and `k_proj`, as in Llama, Gemma and Qwen2, whose query view reads -1 heads), "bigcode" (GPTBigCode
    with `multi_query`: `embed_dim`, `kv_dim`, `num_heads`, `head_dim` beside `c_attn`), "mpt" (`n_heads` and
    `head_dim` beside `Wqkv` and `out_proj`), "qkv" (`num_heads` and `head_dim` beside `query_key_value` and `dense`:
    BLOOM, Falcon, Persimmon), or None."""
    d = m.__dict__
    c_attn = m._modules.get("c_attn")
    if d.get("multi_query") is True and isinstance(c_attn, nn.Linear) and isinstance(m._modules.get("c_proj"), nn.Linear) \
            and all(isinstance(d.get(a), int) for a in ("embed_dim", "head_dim", "num_heads", "kv_dim")):
        return "bigcode"
    if isinstance(c_attn, ROOT_TYPES) and all(isinstance(d.get(a), int) for a in ("split_size", "head_dim", "num_heads")) \
            and (pruned or out_width(c_attn) == 3 * d["split_size"]):
        return "gpt2"
    size = d.get("attention_head_size")
    if isinstance(query_of(m), nn.Linear) and isinstance(size, int) and size > 0 and "num_attention_heads" in d:
        return "bert"
    if isinstance(m._modules.get("q"), nn.Linear) and all(isinstance(d.get(a), int) for a in ("n_heads", "key_value_proj_dim")):
        return "t5"
    qkv, head, kv = m._modules.get("qkv_proj"), d.get("head_dim"), d.get("num_key_value_heads")
    heads = getattr(d.get("config"), "num_attention_heads", None)
    if isinstance(qkv, nn.Linear) and isinstance(m._modules.get("o_proj"), nn.Linear) and isinstance(head, int) \
            and head > 0 and isinstance(kv, int) and isinstance(heads, int) \
            and (pruned or qkv.out_features == (heads + 2 * kv) * head):
        return "phi3"
    q = m._modules.get("q_proj")
    heads = d.get("num_heads", d.get("num_attention_heads"))  # Swin's attention names it the BERT way
    if isinstance(q, nn.Linear) and isinstance(head, int) and isinstance(heads, int) and head > 0 \
            and (pruned or q.out_features == head * heads):
        return "bart"
    k, groups = m._modules.get("k_proj"), d.get("num_key_value_groups")
    if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(head, int) and head > 0 \
            and isinstance(groups, int) and groups > 0 and (pruned or q.out_features == groups * k.out_features):
        return "grouped"
    wqkv, out, n_heads = m._modules.get("Wqkv"), m._modules.get("out_proj"), d.get("n_heads")
    if isinstance(wqkv, nn.Linear) and isinstance(out, nn.Linear) and isinstance(head, int) and head > 0 \
            and isinstance(n_heads, int) and (pruned or wqkv.out_features == 3 * n_heads * head):
        return "mpt"
    qkv, dense, heads = m._modules.get("query_key_value"), m._modules.get("dense"), d.get("num_heads")
    if isinstance(qkv, nn.Linear) and isinstance(dense, nn.Linear) and isinstance(head, int) and head > 0 \
            and isinstance(heads, int) and (pruned or qkv.out_features == (heads + 2 * d.get("num_kv_heads", heads)) * head):
        return "qkv"
    return None


def takes_alibi(m: nn.Module) -> bool:
    """Whether attention module `m` is handed ALiBi position biases, made by the model for its configured head
    count (BLOOM, Falcon: `forward(..., alibi, ...)`; MPT: `forward(..., position_bias, ...)`)."""
    try:
        params = inspect.signature(type(m).forward).parameters
    except (TypeError, ValueError):
        return False
    return "alibi" in params or (head_style(m, pruned=True) == "mpt" and "position_bias" in params)


class LayerConfig:
    """A `transformers` config as one layer sees it: the model's shared config, except for the attributes this
    layer keeps its own values of (its head counts after a cut); everything else is read from, and written to,
    the shared config (an attention implementation a user switches to reaches every layer).

    Why by hand: Phi-3's attention slices its fused `qkv_proj` at `self.config.num_attention_heads`, the model's
    count, and a `transformers` config has one count for all layers, so a head cut in one layer needs its own;
    `transformers` has no per-layer config."""

    def __init__(self, shared: Any, **own: Any) -> None:
        while isinstance(shared, LayerConfig):
            own = {**shared._own, **own}
            shared = shared._shared
        self.__dict__["_shared"] = shared
        self.__dict__["_own"] = dict(own)

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if name.startswith("__") or "_own" not in d:  # copy and pickle look up protocol names on a bare instance
            raise AttributeError(name)
        return d["_own"][name] if name in d["_own"] else getattr(d["_shared"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._own:
            self._own[name] = value
        else:
            setattr(self._shared, name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({type(self._shared).__name__}, {self._own})"


@contextlib.contextmanager
def no_cache(model: nn.Module):
    """A `transformers` model traced without its key/value cache (`config.use_cache = False` meanwhile): GPT-2
    concatenates the cache's past keys with the new ones, a concatenation whose channel count Torch-Pruning cannot
    infer (its index mapping failed), and the cache is not part of what pruning changes."""
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


# a BERT-style attention's query projection: BERT's and ViT's, DeBERTa's, MPNet's
QUERY_NAMES = ("query", "query_proj", "q")


def query_of(m: nn.Module) -> nn.Module | None:
    """The query projection of a BERT-style attention module: `query` (BERT, ViT), `query_proj` (DeBERTa), `q`
    (MPNet)."""
    return next((m._modules[k] for k in QUERY_NAMES if m._modules.get(k) is not None), None)


# attributes by which `transformers` attention modules name their head size
HEAD_SIZE_ATTRIBUTES = ("attention_head_size", "head_dim", "head_size", "key_value_proj_dim")


def head_sizes(m: nn.Module) -> list[int]:
    """The positive head sizes module `m` names (`HEAD_SIZE_ATTRIBUTES`, in that order)."""
    return [h for h in (getattr(m, a, None) for a in HEAD_SIZE_ATTRIBUTES) if isinstance(h, int) and h > 0]


def _takes(fn: Any, names: list[str]) -> bool:
    """Whether `fn`'s first parameters are `names`."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return params[: len(names)] == names


def _identity_rotation(q, k, *args, **kwargs):
    return q, k


def _repeat_interleaved(hidden_states, n_rep):
    if n_rep == 1:
        return hidden_states
    heads = torch.arange(hidden_states.shape[1], device=hidden_states.device).repeat_interleave(n_rep)
    return hidden_states.index_select(1, heads)


# what a trace sees instead of a `transformers` modeling function: name -> (its first parameters, the stand-in)
_TRACE_STAND_INS = {
    # the rotation mixes channels only within a head: Torch-Pruning's walk never ended on its cat((-x2, x1))
    "apply_rotary_pos_emb": (["q", "k"], _identity_rotation),
    # eager attention repeats each key/value head for its query heads with expand + reshape, after which
    # Torch-Pruning's walk no longer knows which root channel an index came from (Gemma2; repeat_interleave
    # expands too); an index_select of the same heads is the same tensor, which it maps index for index (then
    # `_kv_layout` maps the query heads)
    "repeat_kv": (["hidden_states", "n_rep"], _repeat_interleaved),
}


def _pass_through(fn: Any, stand_in: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_TRACING, "depth", 0):
            return stand_in(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


_TRACING = threading.local()  # depth > 0: this thread is tracing, the stand-ins answer
_SWAP_LOCK = threading.Lock()
_SWAPPED: dict[tuple[str, str], list] = {}  # (module, function) -> [its own function, traces using the wrapper]


@contextlib.contextmanager
def neutral_rope(model: nn.Module):
    """While this block traces `model`, in this thread, its `transformers` modeling modules' rotary position
    embedding (`apply_rotary_pos_emb(q, k, cos, sin)`: Llama, Qwen2, Mistral, Gemma, Phi, ...) returns q and k
    unchanged, and their `repeat_kv` repeats keys and values with `index_select` (the same tensor); in other
    threads meanwhile they compute as before, and after the last such block the modules get their own functions
    back.

    Why by hand: Torch-Pruning's dependency walk never ends on the rotation's `cat((-x2, x1))` (VainF/Torch-Pruning#527,
    open), so the attention projections of every RoPE model were left intact. The rotation mixes channels only
    within each head (its last dimension, the head size), so a cut of whole heads commutes with it: the graph traced
    without it couples the same layers and channels for such cuts, and the probes (which run the real model) and the
    tests (a head cut equals silencing the heads) hold the heads whole. Eager attention's `expand` (Gemma2) lost the
    walk its root channels, which an `index_select` of the same heads keeps."""
    names = {type(m).__module__ for m in model.modules() if type(m).__module__.startswith("transformers.")}
    if names:  # SDPA's own `repeat_kv`, which it calls when it gets a mask (a sliding window shorter than the input)
        names.add("transformers.integrations.sdpa_attention")
    names = sorted(names)
    mine = []
    with _SWAP_LOCK:
        for name in names:
            mod = sys.modules.get(name)
            for fname, (params, stand_in) in _TRACE_STAND_INS.items():
                key = (name, fname)
                if key in _SWAPPED:
                    _SWAPPED[key][1] += 1
                    mine.append(key)
                    continue
                fn = getattr(mod, fname, None)
                if callable(fn) and _takes(fn, params):
                    _SWAPPED[key] = [fn, 1]
                    setattr(mod, fname, _pass_through(fn, stand_in))
                    mine.append(key)
    _TRACING.depth = getattr(_TRACING, "depth", 0) + 1
    try:
        yield
    finally:
        _TRACING.depth -= 1
        with _SWAP_LOCK:
            for key in mine:
                _SWAPPED[key][1] -= 1
                if _SWAPPED[key][1] == 0:
                    setattr(sys.modules[key[0]], key[1], _SWAPPED.pop(key)[0])


@dataclass(frozen=True)
class Fused:
    """The layout of a fused projection whose one consumer reads a part of it: q, k and v (`parts` 3) or gate and
    up, or k and v (`parts` 2), each `width` channels, in units of `head` channels (an attention head; 1 for gated
    neurons), either in blocks [q | k | v] (GPT-2's `c_attn`, ModernBERT's `Wqkv`, Phi-3's `gate_up_proj`) or
    `interleaved` per unit as [q k v] (GPT-NeoX's `query_key_value`). `out` is the consumer: it reads the last part
    (the values), or, `all_feed`, every part's channel i lands on its input i (gate x up).

    `rep` > 1: grouped-query q/k/v in blocks (Phi-3's `qkv_proj` with fewer key/value heads than query heads): the
    query block is `width` channels, the key and value blocks `width // rep` each, and a unit is one key/value head
    with its `rep` query heads; the consumer reads the query block's width (query channel i's head lands on its
    input i). `query_only`, with one key/value head (multi-query: Falcon-7B): a unit is one query head, its channels
    in the query block alone; the key and value blocks stay."""

    width: int
    head: int
    parts: int
    interleaved: bool
    out: str
    all_feed: bool = False
    rep: int = 1
    query_only: bool = False

    @property
    def heads(self) -> int:
        """Units: heads (key/value heads when `rep` > 1, query heads when `query_only`) or gated neurons."""
        return self.width // (self.head if self.query_only else self.head * self.rep)

    @property
    def step(self) -> int:
        """Channels a unit has, in every part."""
        if self.query_only:
            return self.head
        return (self.rep + self.parts - 1) * self.head

    @property
    def total(self) -> int:
        """The fused projection's width."""
        return self.width + (self.parts - 1) * (self.width // self.rep)

    def head_channels(self, h: int) -> list[int]:
        """Unit `h`'s channels, in every part."""
        if self.query_only:
            return list(range(h * self.head, (h + 1) * self.head))
        if self.interleaved:
            return list(range(h * self.step, (h + 1) * self.step))
        if self.rep > 1:
            q = self.rep * self.head
            kv = self.width // self.rep
            return list(range(h * q, (h + 1) * q)) + [self.width + s * kv + h * self.head + j
                                                      for s in range(self.parts - 1) for j in range(self.head)]
        return [s * self.width + h * self.head + j for s in range(self.parts) for j in range(self.head)]

    def head_scores(self, channel_scores: torch.Tensor) -> torch.Tensor:
        """Per unit, the sum of its channels' scores."""
        if self.query_only:
            return channel_scores[: self.width].reshape(self.heads, self.head).sum(1)
        if self.interleaved:
            return channel_scores.reshape(self.heads, self.step).sum(1)
        if self.rep > 1:
            q = channel_scores[: self.width].reshape(self.heads, self.rep * self.head).sum(1)
            return q + channel_scores[self.width:].reshape(self.parts - 1, self.heads, self.head).sum((0, 2))
        return channel_scores.reshape(self.parts, self.heads, self.head).sum((0, 2))

    def value_input(self, c: int) -> int | None:
        """The consumer's input that channel `c` feeds (None for a query or key channel; with `rep` > 1, the query
        channels are the ones named: each value channel feeds `rep` inputs, its query heads' channel)."""
        if self.rep > 1:
            return c if c < self.width else None
        if self.interleaved:
            h, r = divmod(c, self.step)
            part, j = divmod(r, self.head)
            return h * self.head + j if self.all_feed or part == self.parts - 1 else None
        part, i = divmod(c, self.width)
        return i if self.all_feed or part == self.parts - 1 else None

    def describe(self) -> str:
        if self.all_feed:
            return "neurons, fused gate/up"
        names = "q/k/v" if self.parts == 3 else "k/v"
        if self.query_only:
            return (f"attention heads, fused {names}, multi-query ({self.heads} query heads of {self.head}, one "
                    "key/value head for all)")
        if self.rep > 1:
            return (f"attention heads, fused {names}, grouped ({self.heads} key/value heads of {self.head}, "
                    f"{self.rep} query heads each)")
        return f"attention heads, fused {names} ({self.heads} of {self.head})"
