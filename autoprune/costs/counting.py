"""Costs: MACs and parameters counted on the pruned model, latency measured on the device.

Counter choice: `torch.utils.flop_counter.FlopCounterMode` (MACs = FLOPs / 2 of conv, matmul and
attention). It sees functional ops that hook-based counters (Torch-Pruning's, thop) miss, and it
does not write buffers into the model. A search loop needs thousands of cost queries, so
`CostModel` also predicts MACs/params analytically from the kept channel counts (~µs per call,
exact on conv/linear nets); it is checked against the counter and the counter has the last word.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from autoprune.pruning.groups import ROOT_TYPES, GroupInfo, PrunableModel, _PER_CHANNEL
from autoprune.pruning.layers import HFConv1D, in_width, out_width
from autoprune.pruning.plan import PruningPlan
from autoprune.model.task import batch_len, call_model, to_device

try:  # the CPU flash-attention op is missing from torch's flop table
    _SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def _sdpa_cpu_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape if hasattr(query, "shape") else query, key.shape if hasattr(key, "shape") else key, value.shape if hasattr(value, "shape") else value)

    FLOP_FORMULAS = {_SDPA_CPU: _sdpa_cpu_flop}
except AttributeError:  # pragma: no cover
    FLOP_FORMULAS = {}


def _grouped_mm_flop(a, b, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `aten._grouped_mm` (a mixture-of-experts layer's experts, in transformers' default `grouped_mm`
    implementation): every row of `a` meets one group's matrix. FlopCounterMode has no formula for it, so a
    mixture-of-experts model counted none of its experts' MACs (Mixtral's experts, most of its compute, were 0)."""
    a, b = (t.shape if hasattr(t, "shape") else t for t in (a, b))
    rows = a[0] * a[1] if len(a) == 3 else a[0]  # [G, M, K] or [M, K] (against [G, K, N] or [K, N])
    return 2 * rows * a[-1] * b[-1]


# the formulas FlopCounterMode lacks (`count_macs`; the peer benchmark's counter uses them too)
if hasattr(torch.ops.aten, "_grouped_mm"):
    FLOP_FORMULAS[torch.ops.aten._grouped_mm] = _grouped_mm_flop


@dataclass
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    device: str
    threads: int | None
    batch_size: int

    @property
    def spread_ms(self) -> float:
        return self.p90_ms - self.p10_ms


@dataclass
class CostReport:
    """Costs of one (pruned) model, with ratios against the unpruned one when known."""

    macs: int
    params: int
    macs_ratio: float | None = None
    params_ratio: float | None = None
    nonzero_params: int | None = None
    sparsity: float | None = None
    latency_ms: float | None = None
    latency_spread_ms: float | None = None
    latency_runs: int | None = None
    counter: str = "torch.utils.flop_counter"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one forward pass on `example` (conv, matmul, attention), counted by FlopCounterMode, plus those of
    recurrent layers (`_recurrent_macs`), which it does not see."""
    model.eval()
    # nn.MultiheadAttention's inference fast path is one fused op the counter does not know; without it
    # the module runs linear + scaled_dot_product_attention, which are counted
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    fc = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    rnn, before = [0], {}

    def pre(mod, _args):
        before[id(mod)] = fc.get_total_flops()

    def post(mod, args, _out):  # only where the counter saw nothing: some paths (GRU, a projected LSTM) it counts
        if fc.get_total_flops() == before.pop(id(mod), None):
            rnn[0] += _recurrent_macs(mod, args[0])

    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    hooks = [h for m in rnns for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.no_grad(), fc:
            call_model(model, example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for h in hooks:
            h.remove()
    return int(fc.get_total_flops()) // 2 + rnn[0]


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _recurrent_macs(m: nn.RNNBase, x) -> int:
    """MACs of one call of an LSTM, GRU or RNN: per time step, layer and direction, the gates' input and hidden
    products (and an LSTM's projection). Why by hand: on the CPU torch runs a plain LSTM as one fused op that
    FlopCounterMode has no formula for, so a recurrent model's counted MACs left it out entirely (an LSTM
    classifier counted only its linear head), and a MACs budget on it was not real. Used only when the counter
    saw nothing during the layer's call (a GRU, an RNN or a projected LSTM it counts through their matmuls)."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        steps = int(x.data.shape[0])  # time steps summed over the batch
    elif x.dim() == 2:  # unbatched (time, features)
        steps = int(x.shape[0])
    else:
        steps = int(x.shape[0] * x.shape[1])
    gates = _GATES.get(m.mode, 1)
    dirs = 2 if m.bidirectional else 1
    h = m.hidden_size
    out = m.proj_size or h
    total = 0
    for layer in range(m.num_layers):
        inp = m.input_size if layer == 0 else out * dirs
        per_step = gates * h * (inp + out) + (h * m.proj_size if m.proj_size else 0)
        total += per_step * dirs
    return total * steps


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def cost_report(model: nn.Module, example: torch.Tensor, base: "CostReport | None" = None, *, dense_note: bool | None = None) -> CostReport:
    """Count MACs and parameters of `model`; ratios against `base` when given.

    For a model pruned by an unstructured plan (or with `dense_note=True`) the report notes that MACs
    and latency stay dense, and `params_ratio` is the fraction of non-zero parameters."""
    if dense_note is None:
        dense_note = (getattr(model, "_autoprune_plan", None) or {}).get("mode") == "unstructured"
    macs, params = count_macs(model, example), count_params(model)
    nz = count_nonzero(model)
    rep = CostReport(macs, params, nonzero_params=nz, sparsity=1 - nz / max(params, 1))
    if base is not None:
        rep.macs_ratio = macs / max(base.macs, 1)
        rep.params_ratio = params / max(base.params, 1)
    if dense_note:
        rep.notes.append("unstructured pruning: MACs and latency stay dense; nonzero_params is the compressed size")
        if base is not None:
            rep.params_ratio = nz / max(base.params, 1)
    return rep


def measure_latency(
    model: nn.Module,
    example: torch.Tensor,
    *,
    device: str = "cpu",
    threads: int | None = 1,
    warmup: int = 10,
    runs: int = 50,
    max_runs: int = 500,
    rel_ci: float = 0.02,
    time_budget_s: float = 10.0,
) -> LatencyStats:
    """Median latency of `model(example)` in ms: warm-up, then timed runs until the median's 95 %
    confidence interval is within `rel_ci` of it (or `max_runs` / `time_budget_s` is hit).
    CUDA is synchronised around every run; the CPU thread count is fixed while timing. `model` itself is moved to
    `device` (time a copy to keep it where it is, as `autoprune.costs.latency.measure_model` does)."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    x = to_device(example, dev)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                call_model(model, x)
            sync()
            start = time.perf_counter()
            while True:
                sync()
                t0 = time.perf_counter()
                call_model(model, x)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
                n = len(times)
                if n >= runs and n % 10 == 0:
                    s = sorted(times)
                    # distribution-free CI of the median: order statistics n/2 ± 1.96 sqrt(n)/2
                    half = int(math.ceil(1.96 * math.sqrt(n) / 2))
                    lo, hi = s[max(n // 2 - half, 0)], s[min(n // 2 + half, n - 1)]
                    med = statistics.median(s)
                    if (hi - lo) / 2 <= rel_ci * med or n >= max_runs or time.perf_counter() - start > time_budget_s:
                        break
    finally:
        torch.set_num_threads(old_threads)
    s = sorted(times)
    q = lambda f: s[min(int(f * len(s)), len(s) - 1)]  # noqa: E731
    return LatencyStats(statistics.median(s), q(0.1), q(0.9), len(s), str(dev), threads, batch_len(example))


@dataclass
class _Layer:
    name: str
    kind: str  # conv | dwconv | linear | mha | perchannel
    cin: int
    cout: int
    groups: int
    kprod: int  # kernel size product (mha: query x key pairs)
    rows: int  # output positions per sample (spatial size for conv, leading dims for linear)
    bias: bool
    params: int


def _layer_cost(layer: tuple, pruned: dict[str, list[int] | int]) -> tuple[int, int]:
    """(MACs, parameters removed) of one `CostModel._flat` layer when the groups lose `pruned`."""
    kind, cin, cout, groups, kprod, rows, bias, params, base_cout, keys, effects = layer
    for gname, role_out, both, mult, counts in effects:
        lost = pruned.get(gname)
        if not lost:
            continue
        if isinstance(lost, int):
            r = lost * mult
        elif counts is not None:
            r = sum(counts[i] for i in lost)
        else:
            r = len(lost) * mult
        if both:
            cin -= r
            cout -= r
        elif role_out:
            cout -= r
        else:
            cin -= r
    if cin.__class__ is not int:
        cin = round(cin)
    if cout.__class__ is not int:
        cout = round(cout)
    if kind == "conv":
        per = cin // groups * kprod
        return rows * per * cout, params - (per * cout + (cout if bias else 0))
    if kind == "dwconv":
        return rows * kprod * cout, params - (kprod * cout + (cout if bias else 0))
    if kind == "linear":
        return rows * cin * cout, params - (cin * cout + (cout if bias else 0))
    if kind == "mha":  # in-projections of q (rows) and k, v (key tokens), attention, out-projection
        e = cout
        return (2 * rows + 2 * keys) * e * e + 2 * kprod * e, params - (4 * e * e + (4 * e if bias else 0))
    return 0, params - params * cout // max(base_cout, 1)


class CostModel:
    """Analytic MACs/params of a plan from kept channel counts (no pruning, no forward).

    Written by hand because no counter predicts costs without building the pruned model, and a
    budget bisection needs ~20 cost queries per trial. One hook pass records every layer's shape;
    a group's members say which layers lose input or output channels, and how many per root
    channel (flatten and concat mappings included). `exact` tells whether it reproduces the counted MACs
    (attention matmuls outside modules are fitted), `params_exact` the counted parameters (tensors outside
    the modelled layers are fitted): see `_fit_unmodelled`.
    """

    def __init__(self, pm: PrunableModel, base_macs: int | None = None, base_params: int | None = None) -> None:
        self.pm = pm
        model, example = pm.base, pm.example
        mods = dict(model.named_modules())
        rows: dict[str, int] = {}
        attn: dict[str, tuple[int, int, int]] = {}  # MHA: (query tokens, key tokens, query x key pairs)
        hooks = []
        for name, m in mods.items():
            if isinstance(m, ROOT_TYPES):
                def hook(mod, _i, out, name=name):
                    c = out_width(mod)
                    rows[name] = rows.get(name, 0) + out.numel() // c  # output positions in the whole example batch
                hooks.append(m.register_forward_hook(hook))
            elif isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim:
                def mha_hook(mod, args, kwargs, _out, name=name):
                    q = args[0] if args else kwargs["query"]
                    k = args[1] if len(args) > 1 else kwargs["key"]
                    e = mod.embed_dim
                    if q.dim() == 2:
                        n, lq, lk = 1, q.shape[0], k.shape[0]
                    else:
                        n = q.shape[0] if mod.batch_first else q.shape[1]
                        lq, lk = q.numel() // (n * e), k.numel() // (n * e)
                    old = attn.get(name, (0, 0, 0))
                    attn[name] = (old[0] + n * lq, old[1] + n * lk, old[2] + n * lq * lk)
                hooks.append(m.register_forward_hook(mha_hook, with_kwargs=True))
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad():
                call_model(model, example)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
            for h in hooks:
                h.remove()
        self.layers: dict[str, _Layer] = {}
        self._mha_keys: dict[str, int] = {}
        for name, m in mods.items():
            own = sum(p.numel() for p in m.parameters(recurse=False))
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and name in rows:
                dw = m.groups == m.in_channels == m.out_channels and m.groups > 1
                self.layers[name] = _Layer(name, "dwconv" if dw else "conv", m.in_channels, m.out_channels, m.groups, math.prod(m.kernel_size), rows[name], m.bias is not None, own)
            elif isinstance(m, (nn.Linear, HFConv1D)) and name in rows:
                self.layers[name] = _Layer(name, "linear", in_width(m), out_width(m), 1, 1, rows[name], m.bias is not None, own)
            elif isinstance(m, nn.MultiheadAttention) and name in attn:
                e = m.embed_dim
                self.layers[name] = _Layer(name, "mha", e, e, m.num_heads, attn[name][2], attn[name][0], m.in_proj_bias is not None,
                                           sum(p.numel() for p in m.parameters()))
                self._mha_keys[name] = attn[name][1]
            elif isinstance(m, _PER_CHANNEL) and own > 0:
                c = _channels_of(m)
                if c:
                    self.layers[name] = _Layer(name, "perchannel", c, c, 1, 1, 0, False, own)
        # per layer: list of (group, role, per-root-channel multiplier, per-root-channel counts or None);
        # the counts are set where root channels map unevenly onto a member (branches of a concatenation)
        self._by_index: frozenset[str] | None = None
        self.effects: dict[str, list[tuple[str, str, float, list[int] | None]]] = {}
        for g in pm.groups:
            counts = pm.branch_counts.get(g.name, {})
            for mem in g.members:
                if mem.module in self.layers:
                    self.effects.setdefault(mem.module, []).append(
                        (g.name, mem.role, mem.count / g.channels, counts.get((mem.module, mem.role))))
        self.base_macs_est, self.base_params_est = self._estimate({})
        self.total_params = sum(p.numel() for p in model.parameters())
        self.base_macs = base_macs if base_macs is not None else count_macs(model, example)
        self.base_params = base_params if base_params is not None else self.total_params
        self.macs_offset = self.base_macs - self.base_macs_est
        self.slopes: dict[str, float] = {}  # group -> unmodelled MACs lost per root channel removed
        self.param_slopes: dict[str, float] = {}  # group -> unmodelled parameters lost per root channel removed
        self.exact = self.macs_offset == 0
        # parameters outside the modelled layers: embeddings, a ViT's class token and position embeddings, a
        # ConvNeXt's layer scale (an unstructured plan keeps every tensor's shape: nothing to fit there)
        self.params_exact = sum(L.params for L in self.layers.values()) == self.total_params
        self._fit_unmodelled(macs=not self.exact, params=not self.params_exact and pm.mode == "structured")

    def _fit_unmodelled(self, *, macs: bool, params: bool) -> None:
        """Attribute what the layers do not model to the groups that shrink it: prune each group alone (one copy
        and cut per group, counted for whichever of the two is fitted), keep what it lost per root channel.

        - MACs (`slopes`): attention matmuls that are not modules (F.scaled_dot_product_attention, a
          transformers attention's matmuls), linear in the kept heads.
        - Parameters (`param_slopes`): an `nn.Embedding`'s table, a ViT's class token and position embeddings, a
          ConvNeXt's layer scale, any module-owned tensor Torch-Pruning cuts; such a tensor loses a fixed number
          of entries per root channel of the one group that cuts it. Without this the estimate carried them at
          their unpruned size: a DistilBERT classifier was estimated at up to 3.6x its counted parameters, and a
          params budget was met with room the search never used.

        Each fit is kept only if one plan pruning every group at once is then counted exactly (a tensor two groups
        cut along two dimensions is not linear); else that part stays constant at its unpruned size, an estimate
        that is never below the count, so budgets still hold."""
        pm = self.pm
        if not (macs or params) or not pm.prunable_names:
            return
        slopes: dict[str, float] = {}
        param_slopes: dict[str, float] = {}
        for name in pm.prunable_names:
            plan = pm.plan({name: min(0.5, pm.max_ratio)})
            lost = pm.pruned_indices(plan).get(name) or []
            if not lost:
                continue
            est_macs, dparams = self._estimate({name: lost})
            small = pm.apply(plan, check=False)
            if macs and (slope := (self.macs_offset - (count_macs(small, pm.example) - est_macs)) / len(lost)):
                slopes[name] = slope
            if params and (slope := (self.total_params + dparams - self.base_params_est - count_params(small)) / len(lost)):
                param_slopes[name] = slope
        self.slopes, self.param_slopes = slopes, param_slopes
        check = pm.uniform_plan(min(0.5, pm.max_ratio))
        small = pm.apply(check, check=False)
        est_macs, est_params = self.estimate(check)
        if macs:
            self.exact = est_macs == count_macs(small, pm.example)
            if not self.exact:
                self.slopes = {}
        if params:
            self.params_exact = est_params == count_params(small)
            if not self.params_exact:
                self.param_slopes = {}

    def _estimate(self, pruned: dict[str, list[int] | int]) -> tuple[int, int]:
        """(MACs, params change) when each group loses the given root channels (or that many, evenly).

        The budget projection calls this ~30 times a trial, two thirds of them (its top-up) for a plan that
        differs from the one before in one group, and the end of its bisection for plans that differ in a few:
        each call keeps its per-layer costs, and a call whose changed groups touch at most half the layers
        recomputes only those (integers, so the totals are exactly a full recomputation's). The layers are
        plain tuples (`_flat`), not dataclasses."""
        flat = self.__dict__.get("_flat_layers")
        if flat is None:
            flat = self._flat_layers = self._flat()
        last = self.__dict__.get("_last_estimate")  # one immutable snapshot: safe to share between threads
        if last is not None:
            prev, costs, macs, removed = last
            changed = [g for g in prev.keys() | pruned.keys() if prev.get(g) != pruned.get(g)]
            touched = {i for g in changed for i in self._layers_of.get(g, ())}
            if 2 * len(touched) <= len(flat):
                costs = list(costs)
                for i in touched:
                    m, r = _layer_cost(flat[i], pruned)
                    macs += m - costs[i][0]
                    removed += r - costs[i][1]
                    costs[i] = (m, r)
                self._last_estimate = (dict(pruned), costs, macs, removed)
                return macs, -removed
        costs = [_layer_cost(L, pruned) for L in flat]
        macs = sum(c[0] for c in costs)
        removed = sum(c[1] for c in costs)
        self._last_estimate = (dict(pruned), costs, macs, removed)
        return macs, -removed

    def _flat(self) -> list[tuple]:
        out = []
        self._layers_of: dict[str, list[int]] = {}
        for i, (name, L) in enumerate(self.layers.items()):
            both = L.kind in ("dwconv", "perchannel", "mha")
            effects = tuple((g, role == "out", both, int(mult) if float(mult).is_integer() else mult, counts)
                            for g, role, mult, counts in self.effects.get(name, ()))  # integral: no rounding
            for g, *_ in effects:
                self._layers_of.setdefault(g, []).append(i)
            out.append((L.kind, L.cin, L.cout, L.groups, L.kprod, L.rows, L.bias, L.params, L.cout,
                        self._mha_keys.get(name, 0), effects))
        return out

    def estimate(self, plan: PruningPlan | dict[str, int]) -> tuple[int, int]:
        """(MACs, params) of the model after `plan` (or after keeping the given channel counts).

        An unstructured plan keeps dense shapes: it returns the dense MACs and the parameters left
        non-zero (torch.nn.utils.prune zeroes round(ratio * n) weights of each layer of a group).
        MACs the layers do not model (attention matmuls outside modules) are attributed to the groups that
        shrink them when that reproduces a counted plan (`exact`); when `exact` is False they are carried
        as a constant offset at their unpruned size,
        so the estimate never falls below the counted MACs when pruning shrinks them: a budget met by the
        estimate is met by the model (conservatively), and the counter measures the final model.
        """
        if isinstance(plan, PruningPlan) and plan.mode == "unstructured":
            return self.base_macs, self._unstructured_nonzero(plan)
        # channel counts are enough (the budget projection calls this ~30x a trial), unless concatenated branches
        # make which channels go matter
        if isinstance(plan, PruningPlan):
            kept = self.pm.kept(plan)
        else:
            kept = {**{g.name: g.channels for g in self.pm.groups}, **plan}
        pruned: dict[str, list[int] | int] = {g.name: g.channels - kept[g.name] for g in self.pm.groups
                                               if kept[g.name] < g.channels}
        if self._by_index is None:  # the groups whose cost depends on which channels go (concatenations)
            self._by_index = frozenset(g.name for g in self.pm.groups if not self.pm.counts_suffice(g.name))
        if self._by_index and not self._by_index.isdisjoint(pruned):
            exact = plan if isinstance(plan, PruningPlan) else self.pm.plan_from_kept(kept)
            pruned = dict(self.pm.pruned_indices(exact))
        macs, dparams = self._estimate(pruned)
        unmodelled = self.macs_offset - _fitted(self.slopes, pruned)
        params = self.total_params + dparams - self.base_params_est - _fitted(self.param_slopes, pruned)
        return macs + round(unmodelled), round(params)

    def _unstructured_nonzero(self, plan: PruningPlan) -> int:
        mods = dict(self.pm.base.named_modules())
        if not hasattr(self, "_base_nonzero"):
            self._base_nonzero = count_nonzero(self.pm.base)
        total = self._base_nonzero  # BatchNorm shifts start at zero
        for g in self.pm.groups:
            r = plan.ratios.get(g.name, 0.0)
            if r > 0:
                for layer in g.layers:
                    total -= round(float(r) * mods[layer].weight.numel())
        return total

    def macs_shares(self) -> dict[str, float]:
        """Each group's share of the model's MACs: the MACs that scale with its channels, over the total (what the
        layers model, plus what the fit attributes to the group: attention matmuls outside modules, a
        mixture-of-experts layer's experts, which were a 0 share before)."""
        base, _ = self._estimate({})
        out = {}
        for g in self.pm.groups:
            macs, _ = self._estimate({g.name: list(range(g.channels))})
            out[g.name] = (base - macs + _fitted(self.slopes, {g.name: g.channels})) / self.base_macs
        return out


def _fitted(slopes: dict[str, float], pruned: dict[str, list[int] | int]) -> float:
    """What `CostModel._fit_unmodelled`'s per-root-channel slopes say the groups' lost channels remove."""
    if not slopes:
        return 0.0
    return sum(s * (v if isinstance(v, int) else len(v)) for g, v in pruned.items() if (s := slopes.get(g)))


def _channels_of(m: nn.Module) -> int | None:
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    if isinstance(m, nn.PReLU):
        return m.num_parameters if m.num_parameters > 1 else None
    return None
