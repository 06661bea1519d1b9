"""Smoke test of the allocator benchmark: `benchmarks/allocators.py --quick` end to end (CI runs it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("allocators_bench", ROOT / "benchmarks" / "allocators.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_benchmark_has_every_strategy_within_budget(tmp_path):
    bench = _load_benchmark()
    out = bench.main(["--quick", "--out", str(tmp_path / "bench")])

    runs = pd.read_csv(out / "runs.csv")
    strategies = list(bench.STRATEGIES)
    assert len(strategies) == 8
    assert sorted(runs.strategy) == sorted(strategies)  # one row per strategy: 1 model, 1 budget, 1 seed
    assert set(runs.model) == {"mnist1d-cnn"} and set(runs.budget) == {"macs50"} and set(runs.seed) == {0}
    assert runs.budget_met.all()
    # the budget was met on the counted model, not just the estimate
    assert (runs.measured_cost <= runs.budget_limit * (1 + 1e-9)).all()
    assert (runs.macs_ratio <= 0.5 + 1e-9).all() and (runs.macs_ratio > 0.3).all()
    assert runs.test_ft.between(0.2, 1.0).all() and runs.val_proxy.between(0.0, 1.0).all()
    assert (runs.latency_ms > 0).all()
    # equal evaluation budget: 8 trials for the sampling searches, <= 8 for NetAdapt, 1 for the one-shot heuristics
    ev = runs.set_index("strategy").evals_search
    assert all(ev[s] == 8 for s in ("tpe-priors", "tpe-nopriors", "nsga2-moo", "random"))
    assert 1 <= ev["netadapt"] <= 8
    assert all(ev[s] == 1 for s in ("uniform", "global", "lamp"))
    sens = runs.set_index("strategy").evals_sensitivity
    assert sens["tpe-priors"] > 0 and sens.drop("tpe-priors").eq(0).all()  # sensitivity counted apart, priors only
    eff = runs.set_index("strategy")["evals_to_0.5pp"]
    assert all(1 <= eff[s] <= 8 for s in ("tpe-priors", "tpe-nopriors", "nsga2-moo", "random"))

    trials = pd.read_csv(out / "trials.csv")
    assert len(trials[trials.state == "COMPLETE"]) == int(runs.evals_search.sum())
    proxy = pd.read_csv(out / "proxy.csv")
    assert len(proxy) == 4 and proxy.test_ft.between(0.2, 1.0).all()

    md = (out / "tables.md").read_text()
    table = md.split("## mnist1d-cnn\n")[1].split("## Efficiency")[0]
    for s in strategies:
        assert f"| {s} |" in table, s
    assert table.count("| 1/1 |") == 8  # budget met in every row
    for section in ("## Efficiency", "## Overhead per trial", "## Proxy fidelity", "Spearman(val proxy, test after FT)"):
        assert section in md


@pytest.mark.slow
def test_quick_methods_benchmark_fills_every_table(tmp_path):
    spec = importlib.util.spec_from_file_location("methods_bench", ROOT / "benchmarks" / "methods.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--out", str(tmp_path / "methods")])
    rows = pd.read_csv(out / "rows.csv")
    assert rows.test_ft.between(0.1, 1.0).all() and (rows.macs_ratio <= 0.3).all()
    assert set(rows.part) >= {"schedule", "criterion"}
    assert {"one-shot", "AGP (cubic)", "l2", "bn_scale+L1", "obd", "apoz", "fpgm", "random"} <= set(rows.method)
    text = (out / "tables.md").read_text()
    for part in ("Schedules", "Criteria", "Proxy fidelity"):
        assert part in text, part
    for name in ("one-shot", "AGP", "fpgm", "apoz", "obd", "bn_scale"):
        assert name in text, name


def test_peers_set_overrides_win_over_quick(tmp_path):
    # benchmarks/peers.py: --set is applied after --quick (it used to be overwritten by it), to autoprune's methods only
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "benchmarks" / "peers.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    args = argparse.Namespace(spec=str(ROOT / "search_spaces" / "digits-resnet20-macs50.yaml"), quick=True,
                              set=["search.n_trials=5", "pruning.max_ratio=0.8"], out=str(tmp_path))
    ours = peers.spec_for(args, ("macs", 0.3), 1, "autoprune")
    assert ours["search"]["n_trials"] == 5 and ours["pruning"]["max_ratio"] == 0.8
    assert ours["budget"] == {"macs": 0.3} and ours["search"]["seed"] == 1
    lamp = peers.spec_for(args, ("macs", 0.3), 1, "lamp")
    assert lamp["search"]["n_trials"] == 12 and lamp["pruning"]["max_ratio"] == 0.9  # --quick only
    tm = peers.spec_for(args, ("macs", 0.3), 1, "autoprune-tm", timeout_s=7.5)
    assert tm["search"]["timeout_s"] == 7.5
    assert "seed" not in (ours["data"]["kwargs"] or {})  # one data split for every seed unless asked
    # --split-per-seed: every method at seed k gets data split k (and so the model trained on it)
    args.split_per_seed = True
    for method in ("autoprune", "lamp", "fastnas"):
        assert peers.spec_for(args, ("macs", 0.3), 7, method)["data"]["kwargs"]["seed"] == 7
    peers.check_split_per_seed(args.spec)  # digits takes a seed: accepted
    # a data factory without one is refused before anything runs (the output directory is left alone)
    own = tmp_path / "own.yaml"
    own.write_text(Path(args.spec).read_text().replace("autoprune.model.data:digits", "autoprune.model.data:default_cache_dir"))
    out = tmp_path / "keep"
    out.mkdir()
    with pytest.raises(SystemExit, match="takes none: add one"):
        peers.main(["--spec", str(own), "--split-per-seed", "--out", str(out), "--methods", "lamp"])
    assert out.exists()


def test_proxy_study_tables_rank_and_pick_per_budget_and_seed(tmp_path, capsys):
    # benchmarks/proxy_study.py: Spearman of each predictor with the recovered metric, and the recovered metric of
    # the plan each predictor would pick, per (budget, seed); --from-csv reprints them without running anything
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("proxy_study_bench", ROOT / "benchmarks" / "proxy_study.py")
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    df = pd.DataFrame({"budget": [0.3] * 4 + [0.15] * 3, "seed": [0] * 7, "plan": list("abcdefg"),
                       "proxy": [0.9, 0.8, 0.7, 0.6, 0.5, 0.6, 0.7], "neg_loss": [-1, -2, -3, -4, -3, -2, -1],
                       "test_ft": [0.95, 0.96, 0.97, 0.98, 0.90, 0.92, 0.91]})
    sm = ps.summary(df, ["proxy", "neg_loss"]).set_index("budget")
    assert sm.loc[0.3, "rho_proxy"] == pytest.approx(-1.0) and sm.loc[0.3, "pick_proxy"] == 0.95
    assert sm.loc[0.3, "best"] == 0.98 and sm.loc[0.15, "pick_neg_loss"] == 0.91 and sm.loc[0.15, "best"] == 0.92
    assert sm.loc[0.15, "rho_proxy"] == pytest.approx(0.5)
    csv = tmp_path / "ps.csv"
    df.assign(ft50=df.proxy, grad_norm=0.0, neg_kl=df.neg_loss, log_width=0.0, params=1).to_csv(csv, index=False)
    ps.main(["--from-csv", str(csv)])
    out = capsys.readouterr().out
    assert "rho_ft50" in out and "| 0.3 | 0 | 0.98 | 0.95 |" in out


def test_peers_paired_delta_resamples_images_paired_by_seed():
    # benchmarks/peers.py: a method's test accuracy minus autoprune's, with a bootstrap interval over test images
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("peers_bench2", ROOT / "benchmarks" / "peers.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    n = 400
    ref = pd.DataFrame({"seed": [0, 1], "test_correct": ["1" * 360 + "0" * 40, "1" * 380 + "0" * 20]})
    same = peers.paired_delta(ref, ref)
    assert same == (0.0, 0.0, 0.0)  # paired: identical predictions differ by nothing, however noisy the set
    better = pd.DataFrame({"seed": [1, 0], "test_correct": ["1" * n, "1" * n]})  # rows in another order
    d, lo, hi = peers.paired_delta(better, ref)
    assert d == pytest.approx(100 * (40 + 20) / (2 * n))  # 7.5 pp, matched by seed
    assert 0 < lo < d < hi < 15
    # 8 images better and 4 worse out of 400 on one seed (net +1 pp): the interval spans zero
    close = pd.DataFrame({"seed": [0], "test_correct": ["0" * 4 + "1" * 356 + "1" * 8 + "0" * 32]})
    d, lo, hi = peers.paired_delta(close, ref)
    assert d == pytest.approx(1.0) and lo <= 0 < hi
    assert peers.paired_delta(pd.DataFrame({"seed": [5], "test_correct": ["1" * n]}), ref) is None  # no common seed
    # better on images 0-39 under seed 0, worse on the same positions under seed 1: with one test set for every
    # seed, each draw takes those positions for both seeds and they cancel; with a split per seed (--split-per-seed)
    # the positions are different images, resampled on their own, and the interval has width
    base = pd.DataFrame({"seed": [0, 1], "test_correct": ["0" * 40 + "1" * 360, "1" * n]})
    mixed = pd.DataFrame({"seed": [0, 1], "test_correct": ["1" * n, "0" * 40 + "1" * 360]})
    assert peers.paired_delta(mixed, base) == (0.0, 0.0, 0.0)
    d, lo, hi = peers.paired_delta(mixed.assign(split_seed=[0, 1]), base.assign(split_seed=[0, 1]))
    assert d == 0.0 and lo < -0.5 and hi > 0.5
