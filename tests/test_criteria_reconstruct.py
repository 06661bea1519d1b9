"""Every criterion prunes every zoo model; least-squares reconstruction lowers held-out layer error."""

import copy

import pytest
import torch

from autoprune.pruning.criteria import CRITERION_HELP
from autoprune.sensitivity.evaluate import stack_batches
from autoprune.pruning.groups import PrunableModel
from autoprune.pruning.reconstruct import kept_outputs, layer_error, reconstruct_plan
from autoprune.model.zoo import ZOO

SHAPES = {"cnn1d": (1, 40), "resnet1d": (1, 40), "digits_cnn": (1, 8, 8), "resnet20": (1, 8, 8), "mobilenetv2": (1, 8, 8),
          "resnext20": (1, 8, 8)}


def _calibration(shape, n=2, batch=16):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("model_name", list(SHAPES))
def test_every_criterion_prunes_every_zoo_model(model_name):
    torch.manual_seed(0)
    model = ZOO[model_name]()
    shape = SHAPES[model_name]
    pm = PrunableModel(model, torch.randn(1, *shape), calibration=_calibration(shape), check_groups=False)
    for crit in CRITERION_HELP:
        plan = pm.plan({n: 0.5 for n in pm.prunable_names}, criterion=crit)
        pruned = pm.apply(plan)
        assert pruned(torch.randn(2, *shape)).shape == (2, 10), crit
        fewer = sum(p.numel() for p in pruned.parameters())
        assert fewer < 0.7 * sum(p.numel() for p in model.parameters()), crit
        scores = pm.scores(crit)
        assert set(scores) == set(pm.prunable_names) and all(torch.isfinite(s).all() for s in scores.values()), crit


def test_reconstruction_lowers_held_out_error(make_spec):
    from autoprune.app import api

    s = api.session(make_spec("resnet1d"), show_progress=False)
    pm = s.pruner
    plan = pm.plan({n: 0.5 for n in pm.prunable_names})
    fit = stack_batches(s.target.datasets["train"], 64, 4, seed=0)
    held = stack_batches(s.target.datasets["val"], 64, 2, seed=1)
    pruned = pm.apply(plan)
    before = copy.deepcopy(pruned)
    report = reconstruct_plan(pm, plan, pruned, fit)
    assert report.count >= 3
    kept = kept_outputs(pm, plan)
    improved = [name for name in report.layers
                if layer_error(pruned, pm.base, name, held, kept) < layer_error(before, pm.base, name, held, kept)]
    assert len(improved) >= 0.8 * report.count, (improved, list(report.layers))


def _counting_calls(model):
    calls = {}
    for n, m in model.named_modules():
        if n:
            m.register_forward_hook(lambda _m, _i, _o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    return calls


def test_capture_ends_the_forward_at_the_layer_and_gets_the_same_inputs():
    from autoprune.pruning.reconstruct import _capture

    torch.manual_seed(0)
    model = ZOO["resnet20"]().eval()
    xs = [x for x, _ in _calibration((1, 8, 8), n=3)]
    calls = _counting_calls(model)
    full = _capture(model, "layer1.0.conv2", xs, "in")
    assert calls["fc"] == 3  # the whole model ran for each batch
    calls.clear()
    cut = _capture(model, "layer1.0.conv2", xs, "in", stop=True)
    assert torch.equal(full, cut) and cut.shape[0] == 3 * 16
    assert "fc" not in calls and "layer1.0.conv2" not in calls  # ended before the layer itself ran
    assert calls["layer1.0.conv1"] == 3


def test_base_outputs_are_captured_once_within_their_limit():
    from autoprune.pruning.reconstruct import BaseOutputs, _capture_many

    torch.manual_seed(0)
    base = ZOO["resnet20"]().eval()
    xs = [x for x, _ in _calibration((1, 8, 8), n=2)]
    names = ["layer1.0.conv2", "layer2.0.conv2", "fc"]
    want, counts = _capture_many(base, names, xs, "out")
    assert counts == {n: 1 for n in names}
    other = copy.deepcopy(base)  # before the counting hooks, which a deep copy would carry along
    calls = _counting_calls(base)
    kept = BaseOutputs()
    for _ in range(3):
        got, n_calls = kept.get(base, xs, names)
        assert all(torch.equal(got[n], want[n]) for n in names) and n_calls == counts
    assert calls["fc"] == 2  # one forward per batch, the first time only
    small = BaseOutputs(max_numel=want["fc"].numel())  # room for the classifier's outputs only
    small.get(base, xs, ["fc"])
    calls.clear()
    got, _ = small.get(base, xs, ["fc", "layer1.0.conv2"])
    assert torch.equal(got["layer1.0.conv2"], want["layer1.0.conv2"]) and calls["fc"] == 2  # re-captured
    assert list(small._outs) == ["fc"]
    calls.clear()
    kept.get(other, xs, names)  # another base: captured from it, not served from the first one's outputs
    assert calls == {}  # the hooks are on `base`, and it did not run


def test_reconstruction_of_a_layer_called_twice_uses_every_call():
    """A layer run twice per forward (shared weights) is refit on both calls' inputs: no early end."""
    from autoprune.pruning.reconstruct import reconstruct

    class TwiceShared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 16)
            self.b = torch.nn.Linear(16, 16)
            self.c = torch.nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(torch.relu(self.b(h)))))

    torch.manual_seed(0)
    base = TwiceShared().eval()
    pruned = copy.deepcopy(base)
    keep = torch.arange(12)
    with torch.no_grad():  # the hidden width 16 -> 12 where `b` is shared: its input and output both shrink
        pruned.a = torch.nn.Linear(8, 12)
        pruned.a.weight.copy_(base.a.weight[keep]); pruned.a.bias.copy_(base.a.bias[keep])
        pruned.b = torch.nn.Linear(12, 12)
        pruned.b.weight.copy_(base.b.weight[keep][:, keep]); pruned.b.bias.copy_(base.b.bias[keep])
        pruned.c = torch.nn.Linear(12, 4)
        pruned.c.weight.copy_(base.c.weight[:, keep]); pruned.c.bias.copy_(base.c.bias)
    xs = [torch.randn(32, 8) for _ in range(2)]
    report = reconstruct(pruned, base, xs, {"b": keep})
    assert set(report.layers) == {"b", "c"}, report.skipped
    before, after = report.layers["b"]
    assert after < before  # fitted on 2 x 2 x 32 rows (both calls), which a single call's capture would not match


class _MLP(torch.nn.Module):
    """a -> b -> c, with optional twists on how the forward runs (see the tests below)."""

    def __init__(self, width=16, mode="plain"):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, width), torch.nn.Linear(width, width), torch.nn.Linear(width, 4)
        self.mode = mode

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.mode == "skip-b" and x[0, 0] > 0:  # some batches never reach `b`
            return self.c(h)
        if self.mode == "fails" and x[0, 0] > 0:
            raise ValueError("this batch breaks the model")
        return self.c(torch.relu(self.b(h)))


class _Reordered(_MLP):
    def forward(self, x):  # `c` runs before `b`: the reverse of their registration (and refit) order
        h = torch.relu(self.a(x))
        return self.b(torch.relu(self.c(h)).repeat(1, 4)[:, : self.b.in_features])


def _pruned_mlp(base, keep=12):
    pruned = copy.deepcopy(base)
    k = torch.arange(keep)
    with torch.no_grad():
        for name, rows, cols in (("a", k, None), ("b", k, k), ("c", None, k)):
            old = getattr(base, name)
            w = old.weight if rows is None else old.weight[rows]
            w = w if cols is None else w[:, cols]
            new = torch.nn.Linear(w.shape[1], w.shape[0])
            new.weight.copy_(w)
            new.bias.copy_(old.bias if rows is None else old.bias[rows])
            setattr(pruned, name, new)
    return pruned, {"a": k, "b": k}


def _in_thread(fn, timeout=60):
    """Run `fn` in a daemon thread: a deadlock fails the test instead of hanging the suite."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "reconstruction did not finish (deadlock?)"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.parametrize("mode", ["plain", "skip-b"])
def test_concurrent_refit_equals_the_layer_by_layer_one(monkeypatch, mode):
    """Forced on (any forward 'pays'), the one-forward-per-batch refit gives the layer-by-layer weights; a batch
    that never reaches a layer stops it, and the rest is refit layer by layer, to the same weights."""
    from autoprune.pruning import reconstruct as R

    torch.manual_seed(0)
    base = _MLP(mode=mode).eval()
    xs = [torch.randn(32, 8) - (1.0 if i % 2 else -1.0) * (mode == "skip-b") for i in range(4)]
    slow, kept = _pruned_mlp(base)
    fast = copy.deepcopy(slow)
    rep_slow = R.reconstruct(slow, base, xs, kept, concurrent=False)
    calls = []
    orig = R._refit_concurrently
    monkeypatch.setattr(R, "CONCURRENT_ROUND_S", 0.0)
    monkeypatch.setattr(R, "_refit_concurrently", lambda *a: calls.append(orig(*a)) or calls[-1])
    rep_fast = _in_thread(lambda: R.reconstruct(fast, base, xs, kept))
    assert calls == ([2] if mode == "plain" else [0])  # both layers concurrently / none: b is skipped by a batch
    assert set(rep_fast.layers) == set(rep_slow.layers) == {"b", "c"}
    for name in ("b", "c"):
        a, b = getattr(slow, name), getattr(fast, name)
        assert torch.allclose(a.weight, b.weight, atol=1e-5) and torch.allclose(a.bias, b.bias, atol=1e-5), name
    assert not torch.allclose(slow.b.weight, base.b.weight[:12, :12])  # it did refit


def test_concurrent_refit_stops_on_another_order_and_raises_the_models_error(monkeypatch):
    from autoprune.pruning import reconstruct as R

    monkeypatch.setattr(R, "CONCURRENT_ROUND_S", 0.0)
    torch.manual_seed(0)
    base = _Reordered().eval()  # `c` runs before `b`, the reverse of the layer order
    xs = [torch.randn(16, 8) for _ in range(3)]
    slow, kept = _pruned_mlp(base)
    fast = copy.deepcopy(slow)
    R.reconstruct(slow, base, xs, kept, concurrent=False)
    done = []
    orig = R._refit_concurrently
    monkeypatch.setattr(R, "_refit_concurrently", lambda *a: done.append(orig(*a)) or done[-1])
    _in_thread(lambda: R.reconstruct(fast, base, xs, kept))
    assert done == [0]  # out of order at once: nothing refit concurrently, all of it layer by layer
    assert torch.allclose(slow.c.weight, fast.c.weight, atol=1e-5)

    failing = _MLP(mode="fails").eval()
    pruned, kept = _pruned_mlp(failing)
    batches = [torch.randn(16, 8).abs() * (-1 if i < 2 else 1) for i in range(3)]  # the third batch fails
    failing.mode = "plain"  # the unpruned model runs; the pruned one raises on the third batch
    with pytest.raises(ValueError, match="breaks the model"):
        _in_thread(lambda: R.reconstruct(pruned, failing, batches, kept))


def test_the_unpruned_model_runs_where_the_pruned_one_is():
    """A search on a GPU prunes copies of a base kept on the CPU: reconstruction runs a copy of the base on the
    pruned model's device (kept between candidates) and leaves the base where it is. ('meta' stands in for cuda.)"""
    from autoprune.pruning.reconstruct import BaseOutputs, _base_on

    base, here, there = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to("meta")
    assert _base_on(base, here) is base
    moved = _base_on(base, there)
    assert moved is not base and moved.weight.device.type == "meta" and base.weight.device.type == "cpu"
    kept = BaseOutputs()
    first = kept.base_on(base, there)
    assert kept.base_on(base, there) is first and first.weight.device.type == "meta"
    assert kept.base_on(base, here) is base


def test_concurrent_refit_that_cannot_start_every_thread_releases_the_others(monkeypatch):
    """A thread that fails to start (a thread limit) must not leave the started ones waiting at the barrier."""
    import threading

    from autoprune.pruning import reconstruct as R

    monkeypatch.setattr(R, "CONCURRENT_ROUND_S", 0.0)
    torch.manual_seed(0)
    base = _MLP().eval()
    pruned, kept = _pruned_mlp(base)
    xs = [torch.randn(16, 8) for _ in range(3)]
    real_start, count = threading.Thread.start, [0]

    def start(self):
        if self.name.startswith("autoprune-refit-"):
            count[0] += 1
            if count[0] == 3:
                raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        _in_thread(lambda: R.reconstruct(pruned, base, xs, kept))
    assert not [t for t in threading.enumerate() if t.name.startswith("autoprune-refit-")]


def test_the_ridge_solve_gives_the_same_bits_every_call():
    """The refit's solve, repeated on the same system: the same solution to the last bit (LAPACK's `gelsy`, what
    `torch.linalg.lstsq` used on the CPU, changed the last bits from call to call here)."""
    from autoprune.pruning.reconstruct import _solve_ridge

    torch.manual_seed(0)
    a = torch.randn(2048, 64, dtype=torch.double)
    gram = a.T @ a + 1e-3 * torch.eye(64, dtype=torch.double)
    rhs = torch.randn(64, 8, dtype=torch.double)
    sols = [_solve_ridge(gram, rhs) for _ in range(8)]
    assert all(torch.equal(sols[0], s) for s in sols[1:])


def test_reconstruction_is_reproducible_bit_for_bit(monkeypatch):
    """The same plan refit again gives the same weights to the last bit, layer by layer and concurrently, and the
    concurrent refit gives the layer-by-layer one's exact weights (same inputs, in the same order)."""
    from autoprune.pruning import reconstruct as R

    torch.manual_seed(0)
    base = _MLP(width=128, mode="plain").eval()
    xs = [torch.randn(256, 8) for _ in range(4)]
    pruned, kept = _pruned_mlp(base, keep=96)
    monkeypatch.setattr(R, "CONCURRENT_ROUND_S", 0.0)  # the concurrent refit forced on: any forward "pays"
    runs = []
    for concurrent in (False, False, True, True):
        model = copy.deepcopy(pruned)
        _in_thread(lambda: R.reconstruct(model, base, xs, kept, concurrent=concurrent))
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert not torch.equal(runs[0]["b.weight"], pruned.b.weight)  # it did refit
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])


def test_the_ridge_solve_falls_back_to_least_squares_on_a_singular_system():
    from autoprune.pruning.reconstruct import _solve_ridge

    torch.manual_seed(0)
    a = torch.randn(64, 6, dtype=torch.double)
    gram = a.T @ a + 1e-3 * torch.eye(6, dtype=torch.double)
    rhs = torch.randn(6, 3, dtype=torch.double)
    assert torch.allclose(_solve_ridge(gram, rhs), torch.linalg.solve(gram, rhs), atol=1e-10)
    singular = torch.zeros(4, 4, dtype=torch.double)  # every input zero: no ridge either
    singular[0, 0] = 2.0
    sol = _solve_ridge(singular, torch.ones(4, 2, dtype=torch.double))
    assert torch.allclose(sol, torch.linalg.pinv(singular) @ torch.ones(4, 2, dtype=torch.double))  # minimum norm
