"""Allocator benchmark: searched per-group allocations against every heuristic, and what the search costs.

For every model x budget x seed it runs each strategy with the same evaluation budget, applies the plan each
strategy chose (selected on `val` only), fine-tunes it with the same schedule (steps, lr, seed) and scores it
on `test`; then it reports mean ± std per model, how fast each search gets within 0.5 pp of its final best,
where the time of a trial goes, and how well the proxy (BN-recalibrated val metric) ranks plans after a
fine-tune (Spearman across random plans).

    python benchmarks/allocators.py --quick                       # CI smoke test: 1 model, 1 budget, 1 seed
    python benchmarks/allocators.py --models mnist1d-cnn,mnist1d-resnet,digits-cnn --seeds 0,1,2

Outputs under --out (default benchmarks/out/allocators): runs.csv (one row per model/budget/seed/strategy),
trials.csv, proxy.csv, tables.md (per-model tables + efficiency + overhead + proxy fidelity) and the runs/ dirs.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import platform
import pstats
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _tables import mean_pm  # noqa: E402
import torch
import yaml
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoprune.app import api  # noqa: E402
from autoprune.costs.counting import measure_latency  # noqa: E402
from autoprune.errors import AutopruneError  # noqa: E402
from autoprune.pruning.plan import PruningPlan  # noqa: E402
from autoprune.model.training import train_model  # noqa: E402

# model label -> the spec it starts from (its 50 % MACs spec; the budget is overridden)
MODELS = {
    "mnist1d-cnn": "search_spaces/mnist1d-cnn-macs50.yaml",
    "mnist1d-resnet": "search_spaces/mnist1d-resnet-macs50.yaml",
    "digits-cnn": "search_spaces/digits-cnn-macs50.yaml",
    "digits-resnet20": "search_spaces/digits-resnet20-macs50.yaml",
    "digits-mobilenetv2": "search_spaces/digits-mobilenetv2-macs50.yaml",
}
# lat90: 90 % of the unpruned model's measured CPU latency (batch 1, 1 thread). 50 % was tried first and is
# unreachable on the small models (pruning every group at max_ratio 0.9 still costs 68-82 % of their latency)
BUDGETS = {"macs50": {"macs": 0.5}, "macs30": {"macs": 0.3}, "lat90": ("latency", 0.9), "lat70": ("latency", 0.7)}
# strategy label -> (autoprune strategy, search overrides)
STRATEGIES = {
    "tpe-priors": ("optuna", {"sampler": "tpe", "priors": "sensitivity"}),
    "tpe-nopriors": ("optuna", {"sampler": "tpe", "priors": "none"}),
    "nsga2-moo": ("optuna", {"sampler": "nsga2", "priors": "none", "objectives": ["accuracy", "macs"]}),
    "random": ("random", {}),
    "uniform": ("uniform", {}),
    "global": ("global", {}),
    "lamp": ("lamp", {}),
    "netadapt": ("netadapt", {}),
}
# not in the default list (each trial fine-tunes: ~4 s/trial on ResNet-20): TPE whose proxy is BN recalibration
# plus a 30-step fine-tune (`evaluation.finetune_steps`), the method change tried where the BN proxy ranked
# fine-tuned plans poorly; same 60 evaluations
EXTRA_STRATEGIES = {
    "tpe-ftproxy": ("optuna", {"sampler": "tpe", "priors": "none"}, {"evaluation": {"finetune_steps": 30}}),
    # TPE (priors off) + uniform/global/LAMP warm starts; the 5 best by the proxy and the warm starts re-ranked by
    # val after a 50-step fine-tune (search.rerank_top_k): 60 proxy evaluations + ~8 short fine-tunes
    "tpe-rerank": ("optuna", {"sampler": "tpe", "priors": "none", "rerank_top_k": 5, "rerank_steps": 50}),
}
ALL_STRATEGIES = {**STRATEGIES, **EXTRA_STRATEGIES}
ITERATIVE = ["tpe-priors", "tpe-nopriors", "tpe-ftproxy", "tpe-rerank", "nsga2-moo", "random", "netadapt"]
# --quick: the small data/training settings of tests/conftest.py, so CI trains the model in seconds
QUICK_OVERRIDES = {"data": {"kwargs": {"num_samples": 3000}}, "train": {"epochs": 6},
                   "evaluation": {"calibration_batches": 4}, "sensitivity": {"ratios": [0.25, 0.5, 0.75]}}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def base_spec(model: str, args, budget: dict | None = None) -> dict:
    spec = yaml.safe_load((ROOT / MODELS[model]).read_text())
    if budget is not None:
        spec["budget"] = copy.deepcopy(budget)  # replaced, not merged: exactly one budget kind
    if args.quick:
        spec = _merge(spec, QUICK_OVERRIDES)
    spec["output"] = str(Path(args.out) / "runs")
    return spec


def latency_budget(spec: dict, fraction: float) -> dict | None:
    """A latency budget at `fraction` of the unpruned model's CPU latency (batch 1, 1 thread), measured by each
    search process when it starts (`budget: {latency: f}`): an absolute limit measured once drifted 1.8x on this
    shared machine between processes and became unreachable. None if this checkout has no latency stage."""
    try:
        import autoprune.costs.latency  # noqa: F401
    except ImportError:
        return None
    return {"latency": fraction, "device": "cpu", "batch_size": 1, "threads": 1}


def finetune_and_test(session, plan: PruningPlan, args, seed: int, steps: int | None = None) -> dict:
    """The same final fine-tune for every plan: Adam, `--ft-steps` (or `steps`) steps, `--ft-lr`, seed; then val/test."""
    model = session.pruner.apply(plan)
    t0 = time.perf_counter()
    train_model(model, session.target.datasets["train"], epochs=10**6, lr=args.ft_lr, batch_size=session.spec.data.batch_size,
                seed=seed, max_steps=steps or args.ft_steps, show_progress=False)
    ft_s = time.perf_counter() - t0
    return {"model": model, "val_ft": session.evaluator.score(model, "val"), "test_ft": session.evaluator.score(model, "test"),
            "ft_s": ft_s}


def efficiency(trials: pd.DataFrame) -> dict:
    """Evaluations (completed trials, in order) until the running best feasible val metric is within 0.5 pp
    of the final best."""
    t = trials[trials.state == "COMPLETE"].sort_values("number")
    if t.empty:
        return {"evals_to_0.5pp": None, "n_trials": 0}
    m = t.metric.where(t.feasible.astype(bool)).astype(float)
    run = m.cummax()
    final = run.iloc[-1]
    if not np.isfinite(final):
        return {"evals_to_0.5pp": None, "n_trials": len(t)}
    idx = int(np.argmax((run >= final - 0.005).to_numpy())) + 1
    return {"evals_to_0.5pp": idx, "n_trials": len(t)}


def run_one(model: str, budget_label: str, budget: dict, seed: int, label: str, args, log) -> tuple[dict, pd.DataFrame]:
    strategy, search, *extra = ALL_STRATEGIES[label]
    spec = _merge(base_spec(model, args, budget), {"search": {"seed": seed, "n_trials": args.trials, **search}})
    for overrides in extra:
        spec = _merge(spec, overrides)
    spec["name"] = f"{model}-{budget_label}-s{seed}-{label}"
    s = api.session(spec, show_progress=False)
    sens_s = 0.0
    if strategy == "optuna" and search.get("priors") == "sensitivity":
        t0 = time.perf_counter()
        s.sensitivity()  # timed apart from the search (cached on disk per seed; both are reported)
        sens_s = time.perf_counter() - t0
    t_search = time.perf_counter()
    try:
        res = api.search(s, strategy=strategy, n_trials=args.trials, show_progress=False)
    except AutopruneError as e:  # e.g. a latency budget that this process's base measurement makes unreachable
        log(f"{spec['name']}: {e}")
        return ({"model": model, "budget": budget_label, "seed": seed, "strategy": label, "budget_met": False,
                 "note": str(e).split(". ")[0]}, pd.DataFrame())
    t_search = time.perf_counter() - t_search  # with the selection (re-measure, re-rank), not only the trials
    trials = api.load(s.run_dir).trials
    trials = trials[trials.strategy == strategy].copy()
    trials.insert(0, "label", label)
    best = res["best"]
    row = {"model": model, "budget": budget_label, "seed": seed, "strategy": label,
           "budget_limit": res["budget"]["limit"], "budget_kind": res["budget"]["kind"]}
    if best is None:
        row.update(budget_met=False, note="no plan met the budget")
        log(f"{spec['name']}: no plan met the budget")
        return row, trials
    plan = PruningPlan.from_dict(best["plan"])
    ft = finetune_and_test(s, plan, args, seed)
    short = finetune_and_test(s, plan, args, seed, steps=args.ft_short_steps) if args.ft_short_steps else None
    lat = measure_latency(ft["model"], torch.randn(1, *spec["model"]["input_shape"]), threads=1, runs=30, time_budget_s=args.lat_s)
    row.update({
        "test_ft": ft["test_ft"], "val_ft": ft["val_ft"], "val_proxy": best["metric_val"],
        "test_ft_short": short["test_ft"] if short else None, "test_proxy": best.get("metric_test"),
        "macs_ratio": best["macs_ratio"], "params_ratio": best["params_ratio"], "measured_cost": best["measured_cost"],
        "budget_met": bool(best["measured_cost"] <= res["budget"]["limit"] * (1 + 1e-9)),
        "latency_ms": lat.median_ms, "evals_search": res["evaluations"] - res["sensitivity_evaluations"],
        "evals_sensitivity": res["sensitivity_evaluations"], "search_wall_s": round(t_search, 2), "evals_rerank": len(res.get("rerank") or []), "sensitivity_wall_s": round(sens_s, 2),
        "finetune_s": round(ft["ft_s"], 2), "best_trial": best["trial"], "baseline_val": res["baseline"]["metric_val"],
        "plan": json.dumps(best["plan"]["ratios"] if "ratios" in best["plan"] else best["plan"]),
        **efficiency(trials),
    })
    log(f"{spec['name']}: val {row['val_proxy']:.4f} -> test after FT {row['test_ft']:.4f}, MACs {row['macs_ratio']:.3f}, "
        f"{row['evals_search']} evals, {row['search_wall_s']} s")
    return row, trials


def proxy_fidelity(model: str, budget_label: str, budget: dict, trials: pd.DataFrame, args, log) -> pd.DataFrame:
    """Spearman between the proxy (BN-recalibrated val metric) and the fine-tuned test metric across plans
    of the random search (seed 0), all projected onto the same budget."""
    t = trials[(trials.label == "random") & (trials.state == "COMPLETE") & trials.feasible.astype(bool)].sort_values("number")
    t = t.drop_duplicates("plan")
    if len(t) > args.proxy_plans:
        t = t.iloc[np.linspace(0, len(t) - 1, args.proxy_plans).round().astype(int)]
    spec_name = f"{model}-{budget_label}-s0-random"
    s = api.session(_merge(base_spec(model, args, budget), {"name": spec_name, "search": {"seed": 0}}),
                    show_progress=False)
    # a costlier proxy for comparison: BN recalibration + a short fine-tune (evaluation.finetune_steps)
    ft_proxy = copy.copy(s.evaluator)
    ft_proxy.finetune_steps = args.proxy_ft_steps
    rows = []
    for _, r in t.iterrows():
        plan = PruningPlan.from_dict(json.loads(r.plan))
        t0 = time.perf_counter()
        val_ftproxy = ft_proxy(s.pruner.apply(plan)) if args.proxy_ft_steps > 0 else float("nan")
        ftproxy_s = time.perf_counter() - t0
        ft = finetune_and_test(s, plan, args, 0)
        rows.append({"model": model, "budget": budget_label, "trial": int(r.number), "val_proxy": float(r.metric),
                     "val_proxy_ft": val_ftproxy, "proxy_ft_s": ftproxy_s,
                     "val_ft": ft["val_ft"], "test_ft": ft["test_ft"], "macs_ratio": float(r.macs_ratio)})
    df = pd.DataFrame(rows)
    if len(df) >= 3:
        rho = spearmanr(df.val_proxy, df.test_ft).statistic
        log(f"proxy fidelity {model} {budget_label}: Spearman(val proxy, test after FT) = {rho:.3f} over {len(df)} plans")
    return df


_BUDGET_CACHE: dict[tuple[str, str], dict] = {}  # (model, budget label) -> the spec's budget section


def profile_search(model: str, budget_label: str, args, log) -> str:
    """cProfile of a short TPE search (priors off): where the non-evaluation time of a trial goes."""
    spec = _merge(base_spec(model, args, _BUDGET_CACHE[(model, budget_label)]), {
                                            "search": {"seed": 0, "sampler": "tpe", "priors": "none", "n_trials": 30}})
    spec["name"] = f"{model}-{budget_label}-profile-{int(time.time())}"
    s = api.session(spec, show_progress=False)
    s.evaluator, s.pruner, s.cost_model  # build the stages outside the profile
    prof = cProfile.Profile()
    prof.enable()
    api.search(s, strategy="optuna", n_trials=30, show_progress=False, test=False)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
    text = buf.getvalue()
    log(f"profiled {spec['name']}")
    return text


# ------------------------------------------------------------------ tables
def _md(df: pd.DataFrame) -> str:
    """A GitHub markdown table (hand-written: pandas' to_markdown needs the optional `tabulate` package)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join("" if (isinstance(v, float) and np.isnan(v)) else str(v) for v in r.tolist()) + " |")
    return "\n".join(lines)


def model_table(runs: pd.DataFrame, model: str) -> str:
    out = []
    for budget, g in runs[runs.model == model].groupby("budget", sort=False):
        rows = []
        for label in ALL_STRATEGIES:
            r = g[g.strategy == label]
            if r.empty:
                continue
            short = r.test_ft_short if "test_ft_short" in r else pd.Series(dtype=float)
            rows.append({
                "strategy": label,
                "test % after FT": mean_pm(r.test_ft, 100),
                "test % after short FT": mean_pm(short, 100) if short.notna().any() else "",
                "val % before FT": mean_pm(r.val_proxy, 100),
                "MACs ratio": mean_pm(r.macs_ratio, 1, 3),
                "params ratio": mean_pm(r.params_ratio, 1, 3),
                "latency ms (b1, 1 thr)": mean_pm(r.latency_ms, 1, 3),
                "evals (search + sens.)": f"{r.evals_search.mean():.0f} + {r.evals_sensitivity.mean():.0f}"
                + (f" + {r.evals_rerank.mean():.0f} short FT" if "evals_rerank" in r and r.evals_rerank.fillna(0).mean() > 0 else ""),
                "wall s (search + sens.)": f"{r.search_wall_s.mean():.1f} + {r.sensitivity_wall_s.mean():.1f}",
                "budget met": f"{int(r.budget_met.sum())}/{len(r)}",
            })
        lim = g.budget_limit.iloc[0]
        out.append(f"#### {model}, budget {budget} (limit {lim:.4g} {g.budget_kind.iloc[0]}), {g.seed.nunique()} seed(s)\n\n"
                   + _md(pd.DataFrame(rows)))
    return "\n\n".join(out)


def summary_table(runs: pd.DataFrame) -> str:
    """One row per model and budget, one column per strategy: mean test % after the fine-tune [after the short
    one]; the row's best (by the long fine-tune) in bold."""
    labels = [lab for lab in ALL_STRATEGIES if (runs.strategy == lab).any()]
    rows = []
    for (model, budget), g in runs.groupby(["model", "budget"], sort=False):
        means = {lab: g[g.strategy == lab].test_ft.mean() for lab in labels}
        top = max((v for v in means.values() if pd.notna(v)), default=None)
        row = {"model": model, "budget": budget}
        for lab in labels:
            v = means[lab]
            if pd.isna(v):
                row[lab] = ""
                continue
            short = g[g.strategy == lab].test_ft_short.mean() if "test_ft_short" in g else float("nan")
            cell = f"{100 * v:.2f}" + (f" [{100 * short:.1f}]" if pd.notna(short) else "")
            row[lab] = f"**{cell}**" if top is not None and v >= top - 1e-12 else cell
        rows.append(row)
    return _md(pd.DataFrame(rows))


def efficiency_table(runs: pd.DataFrame) -> str:
    r = runs[runs.strategy.isin(ITERATIVE)]
    rows = []
    for (model, budget, label), g in r.groupby(["model", "budget", "strategy"], sort=False):
        rows.append({"model": model, "budget": budget, "strategy": label,
                     "evals to within 0.5 pp of own final best": mean_pm(g["evals_to_0.5pp"], 1, 1),
                     "of trials": f"{g.n_trials.mean():.0f}", "final best val %": mean_pm(g.val_proxy, 100)})
    return _md(pd.DataFrame(rows))


def overhead_table(trials: pd.DataFrame) -> str:
    return _md(overhead_frame(trials))


def overhead_frame(trials: pd.DataFrame) -> pd.DataFrame:
    t = trials[(trials.state == "COMPLETE") & trials.duration_s.notna() & trials.eval_s.notna()].copy()
    t["other_s"] = t.duration_s - t.prune_s.fillna(0) - t.eval_s
    g = t.groupby(["model", "label"], sort=False).agg(
        trials=("number", "size"), trial_ms=("duration_s", "median"), eval_ms=("eval_s", "median"),
        prune_count_ms=("prune_s", "median"), other_ms=("other_s", "median"),
        sum_trial=("duration_s", "sum"), sum_eval=("eval_s", "sum")).reset_index()
    for c in ("trial_ms", "eval_ms", "prune_count_ms", "other_ms"):
        g[c] = (g[c] * 1000).round(1)
    g["non-eval share"] = (1 - g.sum_eval / g.sum_trial).round(3)
    return g.drop(columns=["sum_trial", "sum_eval"]).rename(columns={"label": "strategy"})


def proxy_table(proxy: pd.DataFrame) -> str:
    rows = []
    for (model, budget), g in proxy.groupby(["model", "budget"], sort=False):
        rho = spearmanr(g.val_proxy, g.test_ft).statistic if len(g) >= 3 else float("nan")
        rho_v = spearmanr(g.val_proxy, g.val_ft).statistic if len(g) >= 3 else float("nan")
        has_ft = "val_proxy_ft" in g and g.val_proxy_ft.notna().sum() >= 3
        rho_f = spearmanr(g.val_proxy_ft, g.test_ft).statistic if has_ft else float("nan")
        rows.append({"model": model, "budget": budget, "plans": len(g),
                     "Spearman(val proxy, test after FT)": f"{rho:.3f}", "Spearman(val proxy, val after FT)": f"{rho_v:.3f}",
                     "Spearman(short-FT proxy, test after FT)": f"{rho_f:.3f}",
                     "short-FT proxy s/plan": f"{g.proxy_ft_s.mean():.2f}" if has_ft else "",
                     "val proxy % range": f"{100 * g.val_proxy.min():.1f}–{100 * g.val_proxy.max():.1f}",
                     "test after FT % range": f"{100 * g.test_ft.min():.1f}–{100 * g.test_ft.max():.1f}"})
    return _md(pd.DataFrame(rows))


def machine() -> str:
    return (f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"Python {platform.python_version()}, load average at start {os.getloadavg()[0]:.1f}")


# ------------------------------------------------------------------ main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 model (mnist1d-cnn, small data), macs50, 1 seed, 8 trials")
    p.add_argument("--models", default="mnist1d-cnn,mnist1d-resnet,digits-cnn", help=f"comma list of {list(MODELS)}")
    p.add_argument("--budgets", default="macs50,macs30,lat90",
                   help="comma list of macs50, macs30, lat90 / lat70 (90 / 70 %% of the measured unpruned latency)")
    p.add_argument("--render", default=None,
                   help="only rebuild tables.md in --out from the CSVs (and run journals) of these comma-separated out dirs")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma list of strategy labels (default: all but {list(EXTRA_STRATEGIES)}; choose from {list(ALL_STRATEGIES)})")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--trials", type=int, default=60, help="evaluations per iterative strategy (sensitivity counted apart)")
    p.add_argument("--ft-steps", type=int, default=300, help="final fine-tune steps, the same for every plan")
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--ft-short-steps", type=int, default=50,
                   help="also fine-tune each chosen plan this many steps (a low-recovery regime where allocations "
                        "differ more; 0: skip)")
    p.add_argument("--short-ft-only", default=None,
                   help="only add the short fine-tune to an existing out dir's runs.csv (rows that lack it), then re-render")
    p.add_argument("--proxy-plans", type=int, default=15, help="random-search plans fine-tuned for the proxy correlation")
    p.add_argument("--proxy-ft-steps", type=int, default=30,
                   help="steps of the short-fine-tune proxy compared with the BN-recalibration proxy (0: skip)")
    p.add_argument("--lat-s", type=float, default=2.0, help="time budget per latency measurement")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile of a search when overhead > 10 %%")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for search and fine-tune (1: on a shared 2-core machine 2 threads ran 30x slower)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/out/allocators"))
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.budgets, a.seeds = "mnist1d-cnn", "macs50", "0"
        a.ft_short_steps = min(a.ft_short_steps, 5)
        a.trials, a.ft_steps, a.proxy_plans, a.lat_s = min(a.trials, 8), min(a.ft_steps, 20), min(a.proxy_plans, 4), 0.3
        a.no_profile = True
    return a


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    if args.render:
        return render(args)
    torch.set_num_threads(args.threads)
    if args.short_ft_only:
        return add_short_finetune(Path(args.short_ft_only), args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = (out / "log.txt").open("a")

    def log(msg: str) -> None:
        line = f"[{datetime.now(timezone.utc):%H:%M:%S}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    models = [m for m in args.models.split(",") if m]
    budgets = [b for b in args.budgets.split(",") if b]
    labels = [s for s in args.strategies.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for name, known in (("model", MODELS), ("budget", BUDGETS), ("strategy", ALL_STRATEGIES)):
        bad = [x for x in {"model": models, "budget": budgets, "strategy": labels}[name] if x not in known]
        if bad:
            raise SystemExit(f"unknown {name} {bad}; choose from {list(known)}")
    started = datetime.now(timezone.utc)
    cmd = "python benchmarks/allocators.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    log(f"start: {cmd} on {machine()}")
    rows, trial_frames, proxy_frames, notes, profiles = [], [], [], [], []
    for model in models:
        for bl in budgets:
            if isinstance(BUDGETS[bl], tuple):
                b = latency_budget(base_spec(model, args), BUDGETS[bl][1])
                if b is None:
                    notes.append(f"{model} {bl}: skipped, autoprune.costs.latency is not available in this checkout")
                    log(notes[-1])
                    continue
            else:
                b = BUDGETS[bl]
            _BUDGET_CACHE[(model, bl)] = b
            mb_trials = []
            try:
                Session = api.session({**base_spec(model, args, b), "name": f"{model}-{bl}-check"}, show_progress=False)
                from autoprune.searching.studies import build_space

                build_space(Session, "uniform")  # an unreachable budget is reported and skipped, not fatal
            except AutopruneError as e:
                notes.append(f"{model} {bl}: skipped, {e}")
                log(notes[-1])
                continue
            for seed in seeds:
                for label in labels:
                    t0 = time.perf_counter()
                    row, tr = run_one(model, bl, b, seed, label, args, log)
                    row["total_s"] = round(time.perf_counter() - t0, 2)
                    rows.append(row)
                    tr.insert(0, "model", model)
                    tr.insert(1, "budget", bl)
                    tr.insert(2, "seed", seed)
                    mb_trials.append(tr)
                    # incremental: a killed run keeps its rows
                    pd.DataFrame(rows).to_csv(out / "runs.csv", index=False)
                    pd.concat(trial_frames + mb_trials, ignore_index=True).drop(columns=["plan"]).to_csv(out / "trials.csv", index=False)
            mbt = pd.concat(mb_trials, ignore_index=True)
            trial_frames.append(mbt)
            if args.proxy_plans > 0 and "random" in labels and 0 in seeds:
                proxy_frames.append(proxy_fidelity(model, bl, b, mbt[mbt.seed == 0], args, log))
                pd.concat(proxy_frames, ignore_index=True).to_csv(out / "proxy.csv", index=False)
    runs = pd.DataFrame(rows)
    trials = pd.concat(trial_frames, ignore_index=True) if trial_frames else pd.DataFrame()
    proxy = pd.concat(proxy_frames, ignore_index=True) if proxy_frames else pd.DataFrame()
    runs.to_csv(out / "runs.csv", index=False)
    trials.drop(columns=["plan"], errors="ignore").to_csv(out / "trials.csv", index=False)
    if not proxy.empty:
        proxy.to_csv(out / "proxy.csv", index=False)

    ov = overhead_frame(trials) if not trials.empty else pd.DataFrame()
    if not args.no_profile and not ov.empty:
        for model in ov[ov["non-eval share"] > 0.10].model.unique():
            key = next(k for k in _BUDGET_CACHE if k[0] == model)
            profiles.append(f"#### {model} ({key[1]}): 30-trial TPE search, top 25 by cumulative time\n\n```\n"
                            + profile_search(model, key[1], args, log) + "```")
        (out / "profiles.md").write_text("\n\n".join(profiles))
    finished = datetime.now(timezone.utc)
    header = [f"- command: `{cmd}`",
          f"- machine: {machine()}",
          f"- started {started:%Y-%m-%d %H:%M} UTC, finished {finished:%H:%M} UTC ({(finished - started).total_seconds() / 60:.1f} min)",
          *(f"- note: {n}" for n in notes)]
    (out / "header.md").write_text("\n".join(header))
    write_tables(out, args, header, runs, trials, proxy, profiles)
    log(f"done: {out / 'tables.md'}")
    logf.close()
    return out


def write_tables(out: Path, args, header: list[str], runs: pd.DataFrame, trials: pd.DataFrame, proxy: pd.DataFrame,
                 profiles: list[str]) -> None:
    started = datetime.now(timezone.utc)
    seeds = sorted(runs.seed.unique()) if not runs.empty else []
    models = list(dict.fromkeys(runs.model)) if not runs.empty else []
    md = [f"# Allocator benchmark ({started:%Y-%m-%d})", *header,
          f"- {args.trials} evaluations per iterative strategy (sensitivity evaluations counted apart), final fine-tune: "
          f"{args.ft_steps} Adam steps (short FT: {args.ft_short_steps}), lr {args.ft_lr}, cosine, seed = run seed, the same for every plan; "
          "selection on val (BN-recalibrated proxy), numbers on test; mean ± std over seeds "
          f"{','.join(map(str, seeds))}",
          "- sensitivity (tpe-priors only) is cached on disk per weights and seed: its evaluations and wall time show "
          "at the first budget of each seed and as 0 where a later budget reused the table",
          "- trials run with 1 torch thread: on this shared machine 2 threads made every evaluation ~30x slower",
          *(["- tpe-ftproxy: TPE (priors off) whose proxy is BN recalibration + a 30-step fine-tune; its 'val % "
             "before FT' column is that proxy, so it is higher than the others' by construction"]
            if not runs.empty and (runs.strategy == "tpe-ftproxy").any() else []),
          ""]
    if not runs.empty:
        md += ["## Summary: test % after the fine-tune, mean over seeds (best per row in bold; short FT in brackets)", "",
               summary_table(runs), ""]
    for model in models:
        if not runs.empty and (runs.model == model).any():
            md += [f"## {model}", "", model_table(runs, model), ""]
    if not runs.empty:
        md += ["## Efficiency: evaluations until the running best val is within 0.5 pp of the final best", "",
               efficiency_table(runs), ""]
    ov_md = overhead_table(trials) if not trials.empty else ""
    if ov_md:
        md += ["## Overhead per trial (median ms; non-eval share = 1 - Σ eval / Σ trial duration)", "",
               "`prune_count` = copy + prune + analytic cost; `other` = sampling, projection, storage, bookkeeping.", "", ov_md, ""]
    if profiles:
        md += ["## Profiles (non-eval share > 10 %)", "", *profiles, ""]
    if not proxy.empty:
        md += ["## Proxy fidelity: random-search plans (seed 0) fine-tuned with the same schedule", "", proxy_table(proxy), ""]
    (out / "tables.md").write_text("\n".join(md))


def add_short_finetune(d: Path, args) -> Path:
    """Fill `test_ft_short` in an out dir made before the short fine-tune existed: each row's chosen plan,
    rebuilt in the same session (same cached model), fine-tuned `--ft-short-steps` steps with the row's seed."""
    runs = pd.read_csv(d / "runs.csv")
    if "test_ft_short" not in runs:
        runs["test_ft_short"] = np.nan
    args.out = str(d)
    for i, r in runs.iterrows():
        if pd.notna(r.test_ft_short) or not isinstance(r.get("plan"), str):
            continue
        budget = BUDGETS[r.budget] if not isinstance(BUDGETS[r.budget], tuple) else latency_budget({}, BUDGETS[r.budget][1])
        strategy, search, *extra = ALL_STRATEGIES[r.strategy]
        spec = _merge(base_spec(r.model, args, budget), {"search": {"seed": int(r.seed), "n_trials": args.trials, **search}})
        for overrides in extra:
            spec = _merge(spec, overrides)
        spec["name"] = f"{r.model}-{r.budget}-s{r.seed}-{r.strategy}"
        s = api.session(spec, show_progress=False)
        plan = s.pruner.plan(json.loads(r.plan))
        runs.loc[i, "test_ft_short"] = finetune_and_test(s, plan, args, int(r.seed), steps=args.ft_short_steps)["test_ft"]
        runs.to_csv(d / "runs.csv", index=False)
        print(f"{spec['name']}: test after {args.ft_short_steps}-step FT {runs.loc[i, 'test_ft_short']:.4f}", flush=True)
    return d


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV, or an empty frame where a run skipped every budget (its header says why)."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["model", "budget", "seed", "strategy"])


def render(args) -> Path:
    """Merge finished (or interrupted) out dirs into one tables.md; trials come from the run journals when
    trials.csv is missing. A later dir replaces an earlier one's rows for the same model, budget, seed and
    strategy (and its proxy plans for the same model and budget): a partial re-run updates what it re-ran."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, trials, proxy, header, profiles = [], [], [], [], []
    for src, d in enumerate(Path(x) for x in args.render.split(",") if x):
        r = _read_csv(d / "runs.csv").assign(_src=src)
        runs.append(r)
        if (d / "trials.csv").exists():
            trials.append(_read_csv(d / "trials.csv").assign(_src=src))
        else:
            for _, row in r.iterrows():
                t = api.load(d / "runs" / f"{row.model}-{row.budget}-s{row.seed}-{row.strategy}").trials
                t = t[t.strategy == ALL_STRATEGIES[row.strategy][0]].drop(columns=["plan"]).copy()
                t.insert(0, "label", row.strategy)
                t.insert(0, "seed", row.seed)
                t.insert(0, "budget", row.budget)
                t.insert(0, "model", row.model)
                trials.append(t.assign(_src=src))
        if (d / "proxy.csv").exists():
            proxy.append(pd.read_csv(d / "proxy.csv").assign(_src=src))
        if (d / "header.md").exists():
            header += (d / "header.md").read_text().splitlines()
        else:  # an interrupted run: its first log line has the command and the machine
            first = (d / "log.txt").read_text().splitlines()[0]
            header.append(f"- {first}")
        if (d / "profiles.md").exists():
            profiles.append((d / "profiles.md").read_text())
    cat = lambda fs: pd.concat(fs, ignore_index=True) if fs else pd.DataFrame()  # noqa: E731
    runs, trials, proxy = cat(runs), cat(trials), cat(proxy)
    key = ["model", "budget", "seed", "strategy"]
    runs = runs.drop_duplicates(key, keep="last")
    if not trials.empty:
        kept = runs[key + ["_src"]].rename(columns={"strategy": "label"})
        trials = trials.merge(kept, on=["model", "budget", "seed", "label", "_src"])
    if not proxy.empty:
        last = proxy.groupby(["model", "budget"])._src.transform("max")
        proxy = proxy[proxy._src == last]
    runs, trials, proxy = (df.drop(columns=["_src"], errors="ignore").reset_index(drop=True) for df in (runs, trials, proxy))
    for name, df in (("runs", runs), ("trials", trials), ("proxy", proxy)):
        df.to_csv(out / f"{name}.csv", index=False)
    write_tables(out, args, header, runs, trials, proxy, profiles)
    return out


if __name__ == "__main__":
    main()
