"""Latency stage: budgets in milliseconds on the target device, a per-layer lookup table, a device agent.

Measuring a whole pruned model per cost query is far too slow for a budget projection (~40 queries per
trial), so, as in NetAdapt, a **lookup table** is built once per (device, model): every leaf module call of
the model is timed in isolation at the channel counts the plan can give it (on a grid, interpolated in
between), and a plan's latency is predicted as the sum of its calls' entries plus an affine correction
fitted on whole-model measurements (what the table does not see: functional ops such as residual adds,
Python overhead between modules, cache effects). The table is validated on random plans against
whole-model measurements; a table whose median error exceeds `max_error` is not trusted and the budget
falls back to measuring every queried plan (slow but honest). Tables are cached on disk under
``<output>/_cache/latency/`` keyed by the device fingerprint and the model.

Which channel counts a call sees is found once by pruning each group alone and watching every call's
input/output shapes (one forward per group): a dimension's size is then an affine function of the
channels each group removes, which also covers flatten -> linear and concatenation.

Written by hand (no library builds latency lookup tables for Torch-Pruning groups); timing itself is
`autoprune.costs.counting.measure_latency`, module resizing is Torch-Pruning's per-layer pruning functions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import random
import statistics
import time
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from autoprune.costs.counting import LatencyStats, measure_latency
from autoprune.errors import AutopruneError, TrialFailed
from autoprune.model.task import call_model, resize_batch, slice_batch
from autoprune.pruning.layers import FrozenBatchNorm, custom_pruners
from autoprune.pruning.plan import PruningPlan, channels_kept

log = logging.getLogger(__name__)

TABLE_VERSION = 2  # 2: grouped convs, BatchNorm after concatenations, integer inputs
# how each table entry (one module, one shape) and each whole model is timed
ENTRY_TIMING = dict(warmup=3, runs=20, max_runs=200, rel_ci=0.03, time_budget_s=0.3)
MODEL_TIMING = dict(warmup=10, runs=50, max_runs=1000, rel_ci=0.015, time_budget_s=1.5)
_TIED_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.PReLU, nn.modules.instancenorm._InstanceNorm)


# ------------------------------------------------------------------ device fingerprint
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(device: str = "cpu", threads: int | None = 1, batch_size: int = 1) -> dict[str, Any]:
    """What a latency number depends on besides the model: processor / GPU, torch, threads, batch size."""
    dev = torch.device(device)
    fp: dict[str, Any] = {
        "device": dev.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": threads,
        "batch_size": int(batch_size),
    }
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AutopruneError(f"budget.device is {device!r} but torch sees no CUDA device; use device: cpu")
        fp["gpu"] = torch.cuda.get_device_name(dev)
        fp["cuda"] = torch.version.cuda
    return fp


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ call sites
@dataclass
class CallSite:
    """One call of a leaf module in the forward pass, and how its channel dimensions follow the plan."""

    module: str
    call: int  # index among all leaf calls, in forward order
    kind: str  # module class name
    in_shape: list[int]
    out_shape: list[int]
    in_dim: int | None  # input dimension whose size follows the plan (None: fixed)
    out_dim: int | None
    in_coef: dict[str, float]  # group -> size lost per root channel removed
    out_coef: dict[str, float]
    resizable: bool = True  # False: timed at its unpruned shape only (its change is left to the correction)
    in_dtype: str = "float32"  # the input's dtype (int64 for an Embedding's token ids)

    def sizes(self, removed: dict[str, int]) -> tuple[int, int]:
        cin = self.in_shape[self.in_dim] if self.in_dim is not None else 0
        cout = self.out_shape[self.out_dim] if self.out_dim is not None else 0
        cin -= sum(c * removed.get(g, 0) for g, c in self.in_coef.items())
        cout -= sum(c * removed.get(g, 0) for g, c in self.out_coef.items())
        return max(int(round(cin)), 1), max(int(round(cout)), 1)

    @property
    def line(self) -> str | None:
        """The one group that drives both sizes (a 1-D table), or None."""
        gs = set(self.in_coef) | set(self.out_coef)
        return next(iter(gs)) if len(gs) == 1 else None


def _record_calls(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, list[int] | None, list[int] | None, int]]:
    """(name, kind, input shape, output shape, tensor args) of every leaf-module call, in order."""
    calls: list = []
    hooks = []
    for name, m in model.named_modules():
        if next(m.children(), None) is not None or m is model:
            continue

        def pre(mod, args, name=name):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            calls.append([name, type(mod).__name__, list(tensors[0].shape) if tensors else None, None, len(tensors),
                          str(tensors[0].dtype).removeprefix("torch.") if tensors else "float32"])

        def post(mod, args, out, name=name):
            for c in reversed(calls):
                if c[0] == name and c[3] is None:
                    c[3] = list(out.shape) if isinstance(out, torch.Tensor) else None
                    break

        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            call_model(model.eval(), x)
    finally:
        for h in hooks:
            h.remove()
    return [tuple(c) for c in calls]


def analyse_calls(pm, groups: list[str], batch_size: int = 1) -> tuple[list[CallSite], list[str]]:
    """Every leaf call of the model with its channel dependence on each group (one prune per group)."""
    x = _batch(pm.example, batch_size)
    base = _record_calls(pm.base, x)
    notes: list[str] = []
    deltas: dict[str, tuple[int, list]] = {}
    for g in groups:
        info = pm.group(g)
        if g in pm.expert_groups:
            # an experts module computes with its 3-d parameters inside one call (`pruning/experts.py`), with as
            # many calls as experts the tokens reach: no per-layer entry follows its neurons
            raise AutopruneError(f"group {g!r} is a mixture-of-experts layer's neurons, which the latency table "
                                 "cannot time layer by layer")
        r = min(0.5, pm.max_ratio)
        removed = info.channels - channels_kept(info.channels, r, pm.round_to)
        if removed <= 0:
            r = pm.max_ratio
            removed = info.channels - channels_kept(info.channels, r, pm.round_to)
        if removed <= 0:
            continue
        pruned = _record_calls(pm.apply(pm.plan({g: r}), check=False), x)
        if [c[0] for c in pruned] != [c[0] for c in base]:
            raise AutopruneError(f"pruning group {g!r} changes which modules run; the latency table cannot follow it")
        deltas[g] = (removed, pruned)
    sites = []
    for i, (name, kind, ish, osh, n_t, dtype) in enumerate(base):
        if ish is None or osh is None:
            continue
        in_coef: dict[str, float] = {}
        out_coef: dict[str, float] = {}
        in_dims: set[int] = set()
        out_dims: set[int] = set()
        for g, (removed, pruned) in deltas.items():
            _, _, pish, posh, _, _ = pruned[i]
            for d, (a, b) in enumerate(zip(ish, pish or ish)):
                if a != b:
                    in_dims.add(d)
                    in_coef[g] = (a - b) / removed
            for d, (a, b) in enumerate(zip(osh, posh or osh)):
                if a != b:
                    out_dims.add(d)
                    out_coef[g] = (a - b) / removed
        resizable = len(in_dims) <= 1 and len(out_dims) <= 1 and n_t == 1
        if not resizable:
            notes.append(f"{name}: {n_t} tensor inputs / several changing dimensions; timed at its unpruned shape")
            in_dims, out_dims, in_coef, out_coef = set(), set(), {}, {}
        sites.append(CallSite(name, i, kind, ish, osh, next(iter(in_dims), None), next(iter(out_dims), None),
                              in_coef, out_coef, resizable, dtype))
    return sites, notes


# ------------------------------------------------------------------ timing one call at one shape
def _resized(module: nn.Module, site: CallSite, cin: int, cout: int) -> nn.Module:
    """A copy of `module` with `cin` input / `cout` output channels (Torch-Pruning's layer functions)."""
    if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.out_channels:
        # a grouped (not depthwise) conv: a fresh conv of the new widths, each a multiple of its conv groups
        # (cutting the last channels off, as below, would leave unequal conv groups)
        G = module.groups
        cin, cout = (max(G, G * round(c / G)) for c in (cin, cout))
        return type(module)(cin, cout, module.kernel_size, module.stride, module.padding, module.dilation, G,
                            module.bias is not None, module.padding_mode).to(module.weight.device)
    m = copy.deepcopy(module)
    c_out = site.out_shape[site.out_dim] if site.out_dim is not None else None
    c_in = site.in_shape[site.in_dim] if site.in_dim is not None else None
    # the functions `apply` cuts it with: autoprune's own for the layer types Torch-Pruning has none for (a frozen
    # BatchNorm's per-channel buffers: DETR's backbone timed at full width failed on a narrower input), else
    # Torch-Pruning's
    pruner = custom_pruners(m).get(type(m))
    if pruner is None:
        own = dict(m.named_parameters(recurse=False))
        if not own:
            return m  # parameterless (ReLU, pooling, dropout): only its input changes
        pruner = tp.pruner.function.PrunerBox.get(tp.ops.module2type(m))
        width = c_out if c_out is not None else c_in
        if pruner is None and width is not None and all(p.dim() == 1 and p.shape[0] == width for p in own.values()):
            # a per-channel layer Torch-Pruning cuts as bare parameters (an RMSNorm's scale: Llama, Qwen, Gemma),
            # with no function of its own for the table to call: its vectors cut to the width
            keep = cout if c_out is not None else cin  # (the new width of the dimension `width` is)
            for k, p in own.items():
                setattr(m, k, nn.Parameter(p.data[:keep].clone(), requires_grad=p.requires_grad))
            return m
    if pruner is None:
        raise AutopruneError(f"cannot resize {site.module} ({site.kind}) for the latency table")
    tied = isinstance(m, _TIED_TYPES + (FrozenBatchNorm,)) or tp.ops.module2type(m) == tp.ops.OPTYPE.DEPTHWISE_CONV
    if c_out is not None and cout < c_out:
        pruner.prune_out_channels(m, list(range(cout, c_out)))
    if not tied and c_in is not None and cin < c_in:
        pruner.prune_in_channels(m, list(range(cin, c_in)))
    return m


def _site_input(site: CallSite, cin: int, device: str, module: nn.Module | None = None) -> torch.Tensor:
    shape = list(site.in_shape)
    if site.in_dim is not None:
        shape[site.in_dim] = cin
    dtype = getattr(torch, site.in_dtype, torch.float32)
    if not dtype.is_floating_point:  # token ids: valid indices of the embedding that reads them
        return torch.randint(0, max(1, getattr(module, "num_embeddings", 2)), shape, dtype=dtype, device=device)
    return torch.randn(*shape, device=device, dtype=dtype)


def _grid(lo: int, hi: int, step: float, points: int) -> list[int]:
    """Sizes from lo to hi on the reachable step, at most `points` of them (ends included)."""
    if hi <= lo:
        return [hi]
    n = int(round((hi - lo) / step)) if step > 0 else 0
    if n + 1 <= points:
        vals = [lo + round(k * step) for k in range(n + 1)]
    else:
        vals = [lo + round(round(k * n / (points - 1)) * step) for k in range(points)]
    vals[-1] = hi
    return sorted(set(int(v) for v in vals))


@dataclass
class Entry:
    """The timings of one call site: a 1-D line (sizes follow one group), a 2-D grid, or one point."""

    module: str
    call: int
    shape: str  # point | line | grid
    xs: list[int] = field(default_factory=list)  # line: removed channels of `group`; grid: cin
    ys: list[int] = field(default_factory=list)  # grid: cout
    ms: list[list[float]] = field(default_factory=list)  # line: [ms]; grid: ms[i_cin][i_cout]; point: [[ms]]
    group: str | None = None

    def predict(self, cin: int, cout: int, removed: dict[str, int]) -> float:
        if self.shape == "point":
            return self.ms[0][0]
        if self.shape == "line":
            return _interp(self.xs, self.ms[0], removed.get(self.group, 0))
        i, ti = _locate(self.xs, cin)
        j, tj = _locate(self.ys, cout)
        m = self.ms
        i2, j2 = min(i + 1, len(self.xs) - 1), min(j + 1, len(self.ys) - 1)
        return (m[i][j] * (1 - ti) * (1 - tj) + m[i2][j] * ti * (1 - tj) + m[i][j2] * (1 - ti) * tj + m[i2][j2] * ti * tj)


def _locate(xs: list[int], x: float) -> tuple[int, float]:
    if len(xs) == 1 or x <= xs[0]:
        return 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, 0.0
    i = bisect_right(xs, x) - 1
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    i, t = _locate(xs, x)
    return ys[i] if t == 0 else ys[i] * (1 - t) + ys[i + 1] * t


# ------------------------------------------------------------------ the table
@dataclass
class LatencyTable:
    """Per-call latency entries of one model on one device, with the fitted correction and its validation."""

    fingerprint: dict[str, Any]
    model_key: dict[str, Any]
    sites: list[CallSite]
    entries: list[Entry]
    groups: dict[str, int]  # group -> channels (unpruned)
    scale: float = 1.0  # measured = scale * sum(entries) + offset_ms
    offset_ms: float = 0.0
    base_ms: float = 0.0  # the unpruned model, measured whole when the table was built
    calibration: list[dict] = field(default_factory=list)  # {plan, measured, table_sum}
    validation: list[dict] = field(default_factory=list)  # {plan, measured, predicted, error}
    build_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    version: int = TABLE_VERSION

    # ---- prediction
    def table_sum(self, kept: dict[str, int]) -> float:
        removed = {g: c - kept.get(g, c) for g, c in self.groups.items()}
        total = 0.0
        for s, e in zip(self.sites, self.entries):
            cin, cout = s.sizes(removed)
            total += e.predict(cin, cout, removed)
        return total

    def predict(self, kept: dict[str, int]) -> float:
        """Predicted latency in ms of the model keeping `kept` channels per group."""
        return self.scale * self.table_sum(kept) + self.offset_ms

    @property
    def median_error(self) -> float:
        errs = [v["error"] for v in self.validation]
        return statistics.median(errs) if errs else float("nan")

    @property
    def p90_error(self) -> float:
        errs = sorted(v["error"] for v in self.validation)
        return errs[min(int(math.ceil(0.9 * len(errs))) - 1, len(errs) - 1)] if errs else float("nan")

    # ---- JSON
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyTable":
        if d.get("version") != TABLE_VERSION:
            raise AutopruneError(f"latency table version {d.get('version')} is not {TABLE_VERSION}; rebuild it")
        d = dict(d)
        d["sites"] = [CallSite(**s) for s in d["sites"]]
        d["entries"] = [Entry(**e) for e in d["entries"]]
        return cls(**d)


def _batch(example, batch_size: int):
    """`batch_size` copies of the example's first sample (a tensor, tuple or dict of inputs)."""
    return resize_batch(slice_batch(example, 0, 1), batch_size)


def _timer(device: str, threads: int | None, settings: dict) -> Callable[[nn.Module, torch.Tensor], LatencyStats]:
    return lambda m, x: measure_latency(m, x, device=device, threads=threads, **settings)


def measure_model(model: nn.Module, example: torch.Tensor, device: str, threads: int | None, batch_size: int,
                  timing: dict | None = None) -> LatencyStats:
    """Whole-model latency of a copy of `model` (the original stays where it is)."""
    m = copy.deepcopy(model)
    return measure_latency(m, _batch(example, batch_size), device=device, threads=threads, **(timing or MODEL_TIMING))


def random_plans(pm, groups: list[str], n: int, seed: int) -> list[PruningPlan]:
    """Random plans: each group's ratio uniform in [0, max_ratio] (the first two: uniform max and half)."""
    rng = random.Random(seed)
    return [pm.plan({g: rng.uniform(0, pm.max_ratio) for g in groups}) for _ in range(n)]


def build_table(pm, groups: list[str] | None = None, *, device: str = "cpu", threads: int | None = 1,
                batch_size: int = 1, points_1d: int = 9, points_2d: int = 6, calib_plans: int = 4,
                valid_plans: int = 6, seed: int = 0, model_key: dict | None = None,
                progress: Callable[[str], None] | None = None) -> LatencyTable:
    """Time every leaf call of `pm.base` on a channel grid, fit the correction, validate on random plans."""
    t0 = time.perf_counter()
    groups = list(groups if groups is not None else pm.prunable_names)
    fp = device_fingerprint(device, threads, batch_size)
    sites, notes = analyse_calls(pm, groups, batch_size)
    mods = dict(pm.base.named_modules())
    time_entry = _timer(device, threads, ENTRY_TIMING)
    # the group's reachable widths: multiples of its step (round_to, whole heads, conv groups), down to its
    # width at max_ratio
    step = {g: math.lcm(pm.round_to, pm.group(g).unit, pm.group(g).conv_groups) for g in groups}
    kmin = pm.kept(pm.uniform_plan(pm.max_ratio))
    chans = {g: pm.group(g).channels for g in groups}
    entries = []
    with torch.no_grad():
        for s in sites:
            mod = mods[s.module]
            cin0 = s.in_shape[s.in_dim] if s.in_dim is not None else 0
            cout0 = s.out_shape[s.out_dim] if s.out_dim is not None else 0
            if not (s.in_coef or s.out_coef):
                # a copy: timing moves the module to `device`, and the base's own (an embedding table no group
                # resizes) moved to a GPU left the unpruned model split between devices (its parent's buffers
                # stayed on the CPU), so the search's first evaluation on the GPU failed
                ms = time_entry(copy.deepcopy(mod), _site_input(s, cin0, device, mod)).median_ms
                entries.append(Entry(s.module, s.call, "point", ms=[[ms]]))
                continue
            g = s.line
            if g is not None:
                # sizes follow one group: time along its removable channels
                max_removed = chans[g] - kmin[g]
                xs = _grid(0, max_removed, step[g], points_1d)
                row = []
                for r in xs:
                    cin, cout = s.sizes({g: r})
                    row.append(time_entry(_resized(mod, s, cin, cout), _site_input(s, cin, device, mod)).median_ms)
                entries.append(Entry(s.module, s.call, "line", xs=xs, ms=[row], group=g))
                continue
            lo_in, _ = s.sizes({h: chans[h] - kmin[h] for h in s.in_coef})
            lo_out = s.sizes({h: chans[h] - kmin[h] for h in s.out_coef})[1]
            st_in = min((c * step[h] for h, c in s.in_coef.items()), default=1)
            st_out = min((c * step[h] for h, c in s.out_coef.items()), default=1)
            xs = _grid(lo_in, cin0, st_in, points_2d) if s.in_coef else [cin0]
            if s.in_coef == s.out_coef and cin0 == cout0:
                # output width follows the input width (a BatchNorm or depthwise conv after a concatenation of
                # several groups): one column, timed at cout == cin
                ys = [cout0]
                grid = [[time_entry(_resized(mod, s, ci, ci), _site_input(s, ci, device, mod)).median_ms] for ci in xs]
                entries.append(Entry(s.module, s.call, "grid", xs=xs, ys=ys, ms=grid))
                continue
            ys = _grid(lo_out, cout0, st_out, points_2d) if s.out_coef else [cout0]
            grid = [[time_entry(_resized(mod, s, ci, co), _site_input(s, ci, device, mod)).median_ms for co in ys] for ci in xs]
            entries.append(Entry(s.module, s.call, "grid", xs=xs, ys=ys, ms=grid))
    table = LatencyTable(fp, model_key or {}, sites, entries, {g: chans[g] for g in groups}, notes=notes)

    # affine correction: whole-model measurements at a few plans (unpruned, uniform max, uniform half, random)
    calib = [pm.plan({}), pm.plan({g: pm.max_ratio for g in groups}), pm.plan({g: pm.max_ratio / 2 for g in groups})]
    calib += random_plans(pm, groups, max(calib_plans - len(calib), 0), seed + 1)
    xs_, ys_ = [], []
    for plan in calib:
        kept = pm.kept(plan)
        measured = measure_model(pm.apply(plan, check=False), pm.example, device, threads, batch_size).median_ms
        tsum = table.table_sum(kept)
        table.calibration.append({"plan": plan.ratios, "measured": measured, "table_sum": tsum})
        xs_.append(tsum)
        ys_.append(measured)
    table.base_ms = ys_[0]
    table.scale, table.offset_ms = _fit(xs_, ys_)
    for plan in random_plans(pm, groups, valid_plans, seed + 2):
        measured = measure_model(pm.apply(plan, check=False), pm.example, device, threads, batch_size).median_ms
        pred = table.predict(pm.kept(plan))
        table.validation.append({"plan": plan.ratios, "measured": measured, "predicted": pred,
                                 "error": abs(pred - measured) / measured})
    table.build_s = time.perf_counter() - t0
    return table


def _fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares y = a x + b; `a` kept in [0.5, 2] (a table off by more is wrong, not scaled)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((a - mx) ** 2 for a in x)
    a = sum((a - mx) * (b - my) for a, b in zip(x, y)) / vx if vx > 0 else 1.0
    a = min(max(a, 0.5), 2.0)
    return a, my - a * mx


# ------------------------------------------------------------------ where latency is measured
