"""Least-squares reconstruction of the layers that consume pruned channels (channel pruning by regression,
He et al. 2017; the reconstruction step of ThiNet and AMC).

After structured pruning, a conv/linear layer whose *input* channels were removed sees fewer inputs than it was
trained on. On calibration batches we record (a) what the pruned model feeds that layer and (b) what the same
layer produced in the unpruned model, and refit its weights (and bias) so that

    min_W || unfold(X_pruned) @ W^T + b - Y_base ||^2          (+ a small ridge term for stability)

through its ridge-regularised normal equations (`_solve_ridge`) on the unfolded inputs (im2col, `F.unfold`) for
convolutions and on the plain inputs for linear layers. Layers are refit in forward order, each on the inputs
produced by the already-refit layers before it, so errors do not accumulate. Torch-Pruning has no reconstruction step, hence this module.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoprune.model.task import call_model, tensors_of
from autoprune.model.training import on_device
from autoprune.pruning.layers import HFConv1D, in_width, out_width

_CONV = (nn.Conv1d, nn.Conv2d)
# linear layers: torch's, and `transformers`' Conv1D (GPT-2's, its weight stored [in, out])
_LINEAR = (nn.Linear, HFConv1D)


@dataclass
class ReconstructionReport:
    """Per refit layer: output MSE against the unpruned layer before and after the refit (on the fit batches)."""

    layers: dict[str, tuple[float, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.layers)


def kept_outputs(pm, plan) -> dict[str, torch.Tensor]:
    """Output channels each conv/linear of `pm.apply(plan)` keeps, as indices into the unpruned layer: the cuts
    `PrunableModel.apply` makes, so every member layer's removed indices are exact."""
    mods = dict(pm.base.named_modules())
    out = {}
    for name, rem in pm.removed_outputs(plan).items():
        m = mods.get(name)
        if not isinstance(m, (*_CONV, *_LINEAR)):
            continue
        gone = set(rem)
        total = out_width(m)
        out[name] = torch.tensor([i for i in range(total) if i not in gone], dtype=torch.long)
    return out


def consumers(pruned: nn.Module, base: nn.Module) -> list[str]:
    """Conv/linear layers (forward-registration order) whose input channels the pruning reduced."""
    base_mods = dict(base.named_modules())
    out = []
    for name, m in pruned.named_modules():
        b = base_mods.get(name)
        if isinstance(m, (*_CONV, *_LINEAR)) and type(b) is type(m):
            if in_width(m) < in_width(b):
                out.append(name)
    return out


class _Reached(BaseException):
    """Raised by a capture hook to end a forward pass once the layer it waits for has run (a BaseException, so
    a model's own `except Exception` does not swallow it)."""


def _capture(model: nn.Module, name: str, batches: list[torch.Tensor], what: str, *, stop: bool = False) -> torch.Tensor:
    """The input ('in') or output ('out') of `name` over `batches`, concatenated along the batch.

    `stop=True` ends each batch's forward pass as soon as `name` has been called (the rest of the model cannot
    change what it received): the same tensors at a fraction of the cost, for a layer called once per forward."""
    return _capture_many(model, [name], batches, what, stop=stop)[0][name]


def _capture_many(model: nn.Module, names: list[str], batches: list[torch.Tensor], what: str, *,
                  stop: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Like `_capture` for several layers in one forward pass per batch; also returns how many times each layer
    was called per batch (at most: the largest count over the batches). With `stop`, a batch's forward ends once
    every layer of `names` has been called."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    calls: dict[str, int] = dict.fromkeys(names, 0)
    hooks = []
    waiting: set[str] = set()
    for n in names:
        def hook(_m, inp, out=None, n=n):
            got[n].append((inp[0] if what == "in" else out).detach())
            now[n] += 1
            waiting.discard(n)
            if stop and not waiting:
                raise _Reached

        m = model.get_submodule(n)
        hooks.append(m.register_forward_pre_hook(hook) if what == "in" else m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()
            for x in batches:
                now = dict.fromkeys(names, 0)
                waiting.update(names)
                try:
                    call_model(model, x)
                except _Reached:
                    pass
                for n in names:
                    calls[n] = max(calls[n], now[n])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}, calls


def _design(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows = output positions, columns = the layer's receptive-field inputs (im2col for conv)."""
    if isinstance(layer, _LINEAR):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        k, s, p, d = (1, layer.kernel_size[0]), (1, layer.stride[0]), (0, layer.padding[0]), (1, layer.dilation[0])
    else:
        k, s, p, d = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, _LINEAR):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])  # (N*L, C_out)


def refit_layer(layer: nn.Module, x_in: torch.Tensor, y_base: torch.Tensor, *, ridge: float = 1e-3,
                max_rows: int = 8192, seed: int = 0) -> tuple[float, float]:
    """Refit `layer` in place so that layer(x_in) ~= y_base; returns (mse before, mse after) on these inputs."""
    with torch.no_grad():
        before = float(F.mse_loss(layer(x_in), y_base))
        w0 = layer.weight.detach().clone()
        b0 = layer.bias.detach().clone() if layer.bias is not None else None
        a = _design(layer, x_in).double()
        t = _targets(layer, y_base).double()
        if layer.bias is not None:
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)], 1)
        rows = min(max_rows, max(8 * a.shape[1], 2048))
        if len(a) > rows:
            idx = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))[:rows].to(a.device)  # CPU draw: the same rows on any device
            a, t = a[idx], t[idx]
        # Solved as the ridge-regularised normal equations (A^T A + l*mean(diag) I) W = A^T Y: the same
        # minimiser as lstsq on [A; sqrt(l') I], but a K x K system instead of a rows x K QR, which was 5-10x
        # slower on 2 CPU cores; the ridge keeps it well-posed when channels are collinear.
        gram = a.T @ a
        gram += ridge * gram.diagonal().mean() * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
        sol = _solve_ridge(gram, a.T @ t)  # (K[+1], C_out)
        if layer.bias is not None:
            layer.bias.copy_(sol[-1].to(layer.bias.dtype))
            sol = sol[:-1]
        w = (sol if isinstance(layer, HFConv1D) else sol.T).to(layer.weight.dtype)  # Conv1D: [in, out]
        layer.weight.copy_(w.reshape(layer.weight.shape))
        after = float(F.mse_loss(layer(x_in), y_base))
        if not (after <= before):  # also catches NaN
            layer.weight.copy_(w0)
            if b0 is not None:
                layer.bias.copy_(b0)
            raise FloatingPointError(f"refit did not lower the error ({before:.4g} -> {after:.4g})")
    return before, after


def _solve_ridge(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """W with gram @ W = rhs, for the ridge normal equations' symmetric positive definite `gram`: a Cholesky
    solve, or, when `gram` is not positive definite (every input zero, so the ridge term is zero too), the
    least-squares solution (SVD-based `gelsd` on the CPU, which handles a singular system).

    Why not `torch.linalg.lstsq` with its default driver, as before: on the CPU that is LAPACK's `gelsy`, whose
    result changed in the last bits from one call to the next on the same inputs (seen on this machine's torch
    2.13 CPU wheel, one thread or two), so a reconstruction, and a search scored with it, was not reproducible
    bit for bit. The Cholesky solve gave the same bits on every call, and is 2-3x faster on these systems."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(gram, rhs, driver="gelsd" if gram.device.type == "cpu" else None).solution


def _device_of(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return None if p is None else p.device


def _base_on(base: nn.Module, pruned: nn.Module) -> nn.Module:
    """`base`, or a copy of it on the pruned model's device when that is another (the original stays put)."""
    dev = _device_of(pruned)
    return base if dev is None else on_device(base, dev)


class BaseOutputs:
    """The unpruned model's outputs of its layers on fixed calibration batches, kept between reconstructions
    (every candidate of a search is refit against the same targets: one forward of the unpruned model saved per
    candidate, ~10 % of a reconstruction on all-MiniLM-L6-v2). Up to `max_numel` numbers are kept; layers past
    that are captured again each time. Bound to one base model and one list of batches: given others, it starts
    over."""

    def __init__(self, max_numel: int = 50_000_000) -> None:
        self.max_numel = max_numel
        self._key: tuple | None = None
        self._outs: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self.forward_s = 0.0  # seconds of the last capture: one forward pass of the unpruned model over the batches
        self._moved: tuple[nn.Module, torch.device, nn.Module] | None = None  # (base, device, its copy there)

    def base_on(self, base: nn.Module, pruned: nn.Module) -> nn.Module:
        """`_base_on`, with the copy kept for the next candidates."""
        dev = _device_of(pruned)
        if self._moved is None or self._moved[0] is not base or self._moved[1] != dev:
            self._moved = (base, dev, _base_on(base, pruned))
        return self._moved[2]

    def get(self, base: nn.Module, xs: list, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        key = (id(base), tuple(id(t) for t in tensors_of(xs)))
        if key != self._key:
            self._key, self._outs, self._calls = key, {}, {}
            self._refs = (base, list(xs))  # the ids stay theirs while this holds them
        missing = [n for n in names if n not in self._outs]
        if missing:
            t0 = time.perf_counter()
            outs, calls = _capture_many(base, missing, xs, "out")
            self.forward_s = time.perf_counter() - t0
            used = sum(t.numel() for t in self._outs.values())
            for n in missing:
                if used + outs[n].numel() <= self.max_numel:
                    self._outs[n], self._calls[n] = outs[n], calls[n]
                    used += outs[n].numel()
            return ({n: self._outs.get(n, outs.get(n)) for n in names},
                    {n: self._calls.get(n, calls.get(n, 0)) for n in names})
        return {n: self._outs[n] for n in names}, {n: self._calls[n] for n in names}


def reconstruct(pruned: nn.Module, base: nn.Module, batches: list, out_kept: dict[str, torch.Tensor], *,
                ridge: float = 1e-3, max_rows: int = 8192, layers: list[str] | None = None,
                sequential: bool = True, base_outputs: BaseOutputs | None = None,
                concurrent: bool = True) -> ReconstructionReport:
    """Refit, in place, every layer of `pruned` whose input channels were reduced relative to `base`.

    `batches` are calibration batches (tensors or (input, target) pairs); `out_kept` maps layers whose output
    channels were pruned too to the indices they kept (`kept_outputs(pm, plan)`), so the unpruned layer's output
    is compared channel for channel. `sequential=False` refits every layer on the inputs the pruned model gives it
    before any refit (two forward passes in all; faster, but later layers then see shifted inputs); the default refits in forward order, each layer on the
    inputs of the already-refit layers before it (one forward per layer, each ended once that layer has its
    input, when the layer runs once per forward). Grouped convolutions are skipped (depthwise layers lose input and output
    channels together and need no refit), and so is a layer whose weight another module holds too (a language
    model's output layer tied to its embedding table, which the refit would rewrite). `base_outputs` keeps the
    unpruned model's outputs between calls.
    With `concurrent` (and several batches, every layer run once per forward, the layers' outputs under
    `CONCURRENT_MAX_NUMEL`), the same sequential refit runs in one forward pass per batch (`_refit_concurrently`).
    """
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    report = ReconstructionReport()
    if not xs:
        return report
    was_training = pruned.training
    todo = []
    owners: dict[int, int] = {}  # parameter -> how many modules hold it (a tied output layer and embedding: 2)
    for m in pruned.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    for name in layers if layers is not None else consumers(pruned, base):
        layer = pruned.get_submodule(name)
        if isinstance(layer, _CONV) and layer.groups != 1:
            report.skipped[name] = "grouped convolution"
        elif owners.get(id(layer.weight), 0) > 1:  # the refit writes the weight in place: the other holder too
            report.skipped[name] = "weight tied to another module's (refitting it would change that one too)"
        else:
            todo.append(name)
    if not todo:
        return report
    # the unpruned model runs where the pruned one is (a search on a GPU prunes copies of a base kept on the CPU)
    base = base_outputs.base_on(base, pruned) if base_outputs is not None else _base_on(base, pruned)
    # the unpruned outputs never change: one forward of `base` records them all
    if base_outputs is not None:
        y_all, calls = base_outputs.get(base, xs, todo)
        forward_s = base_outputs.forward_s
    else:
        t0 = time.perf_counter()
        y_all, calls = _capture_many(base, todo, xs, "out")
        forward_s = time.perf_counter() - t0
    x_all = None if sequential else _capture_many(pruned, todo, xs, "in")[0]

    def refit(name: str, x_in: torch.Tensor) -> None:
        layer = pruned.get_submodule(name)
        try:
            report.layers[name] = refit_layer(layer, x_in, _select(y_all[name], out_kept.get(name), layer),
                                              ridge=ridge, max_rows=max_rows)
        except FloatingPointError as e:  # keep the pruned weights when the refit would not help
            report.skipped[name] = str(e)

    start = 0
    # Concurrently when it pays: layer by layer costs about (L + 1) / 2 forward passes for L layers (each capture
    # ends at its layer), the concurrent refit one forward pass plus a thread hand-over per batch and layer (~2 ms
    # measured on 2 cores, where small CNNs' forwards are cheaper than that: slower there, 2x faster on MiniLM)
    pays = forward_s * (len(todo) - 1) / 2 > CONCURRENT_ROUND_S * len(xs) * len(todo)
    if sequential and concurrent and pays and len(xs) > 1 and all(calls[n] == 1 for n in todo) and \
            sum(t.numel() for t in y_all.values()) <= CONCURRENT_MAX_NUMEL:
        start = _refit_concurrently(pruned, xs, todo, refit)
    for name in todo[start:]:
        layer = pruned.get_submodule(name)
        # sequential: inputs as produced by the layers refit so far (one forward per layer: slower, tighter); the
        # forward ends at the layer when the unpruned model called it once per batch (the pruned one does too)
        x_in = _capture(pruned, name, xs, "in", stop=calls[name] == 1) if sequential else x_all[name]
        refit(name, x_in)
    pruned.train(was_training)
    return report


# the concurrent refit holds every batch's activations at once: used while the unpruned outputs of the refit
# layers (over all calibration batches) stay under this many numbers, else layer by layer
CONCURRENT_MAX_NUMEL = 50_000_000
CONCURRENT_ROUND_S = 0.005  # the assumed cost of one batch's hand-over at one layer (measured ~2 ms; kept wide)


def _refit_concurrently(pruned: nn.Module, xs: list, todo: list[str], refit: Callable[[str, torch.Tensor], None]) -> int:
    """The sequential refit in one forward pass per batch instead of one per layer; returns how many layers of
    `todo` it refit (all of them, or the first k when it had to stop: the caller refits the rest layer by layer).

    Why threads, by hand: a layer's refit needs its input from *every* calibration batch, produced by the layers
    refit before it, and an eager forward pass cannot be paused and resumed. So each batch's forward runs in its
    own thread; at each layer of `todo` (a forward pre-hook) it leaves its input and waits at a barrier, the last
    batch to arrive refits the layer on all of them (batch order, as the layer-by-layer capture concatenates
    them), and every batch goes on through the refit layer. The inputs are the ones the layer-by-layer capture
    gets; only the order of the forward passes differs. Every layer must run once per forward, in `todo`'s order:
    a batch that reaches another layer first, or ends its forward without reaching one, stops all of them, and
    what was refit by then stays refit."""
    n = len(xs)
    pos = {name: k for k, name in enumerate(todo)}
    got: dict[int, list] = {}
    nxt = [0]  # the next layer to refit
    errors: list[BaseException] = []
    local = threading.local()
    refitting = [False]

    def refit_next() -> None:  # the barrier's action: one thread, every batch waiting
        k = nxt[0]
        refitting[0] = True  # the refit calls the layer itself: its hook must let that call through
        try:
            refit(todo[k], torch.cat(got.pop(k)))
        finally:
            refitting[0] = False
        nxt[0] = k + 1

    barrier = threading.Barrier(n, action=refit_next)

    def hook(module, args, name):
        if refitting[0]:
            return None
        k = pos[name]
        if k != nxt[0] or barrier.broken:
            raise _Reached  # out of order (or another batch stopped): this batch stops here
        got.setdefault(k, [None] * n)[local.i] = args[0].detach()
        barrier.wait()
        if nxt[0] == len(todo):
            raise _Reached  # every layer is refit: the rest of the forward changes nothing

    def run(i: int) -> None:
        local.i = i
        try:
            with torch.no_grad():
                call_model(pruned, xs[i])
        except (_Reached, threading.BrokenBarrierError):
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            errors.append(e)
        finally:
            if nxt[0] < len(todo):
                barrier.abort()  # ended short of a layer: the others must not wait for this batch

    handles = [pruned.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: hook(m, args, name)) for name in todo]
    started: list[threading.Thread] = []
    try:
        pruned.eval()
        for i in range(n):
            t = threading.Thread(target=run, args=(i,), name=f"autoprune-refit-{i}", daemon=True)
            t.start()  # may fail (a thread limit): the ones started must not wait at the barrier for it
            started.append(t)
    except BaseException:
        barrier.abort()
        raise
    finally:
        for t in started:
            t.join()
        for h in handles:
            h.remove()
    if errors:
        raise errors[0]
    return nxt[0]


def _select(y: torch.Tensor, idx: torch.Tensor | None, layer: nn.Module) -> torch.Tensor:
    """The kept output channels of `layer`'s output `y`: the last dimension of a Linear ([B, ..., C], tokens
    included), dimension 1 of a convolution ([B, C, ...])."""
    return y if idx is None else y.index_select(-1 if isinstance(layer, _LINEAR) else 1, idx.to(y.device))


def layer_error(pruned: nn.Module, base: nn.Module, name: str, batches: list, out_kept: dict[str, torch.Tensor]) -> float:
    """MSE between `name`'s output in `pruned` and the kept channels of it in `base` (the held-out check)."""
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    return float(F.mse_loss(_capture(pruned, name, xs, "out"),
                            _select(_capture(base, name, xs, "out"), out_kept.get(name), pruned.get_submodule(name))))


def reconstruct_plan(pm, plan, model: nn.Module, batches: list, **kw) -> ReconstructionReport:
    """`reconstruct` for a model made by `pm.apply(plan)` (structured plans only; others are left as they are)."""
    if plan.mode != "structured":
        return ReconstructionReport()
    return reconstruct(model, pm.base, batches, kept_outputs(pm, plan), **kw)
