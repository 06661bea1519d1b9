"""Methods benchmark: pruning schedules, channel criteria and the evaluation proxy (with/without reconstruction).

At one budget (30 % MACs by default) and with ONE fixed plan per model -- the uniform plan
(`autoprune.searching.strategies.uniform_plan`: the same ratio in every group, bisected onto the budget) -- and the
same fine-tune for everything (Adam, `--ft-steps` steps, `--ft-lr`, cosine decay, seeded), it reports the test
metric after the fine-tune, mean ± std over seeds (the seed of the fine-tune, and of the scores for `random`):

(a) schedules: one-shot, polynomial (linear ramp, power 1: with the default power 3 and initial 0 it is exactly
    AGP), AGP (cubic, Zhu & Gupta), and one-shot after least-squares reconstruction; gradual schedules prune
    every 25 steps up to 2/3 of the steps, then recover for the rest (`autoprune.pruning.schedules.Schedule` defaults);
(b) criteria, one-shot: l2, bn_scale, bn_scale on a model trained with an L1 penalty on BN scales
    (`train.sparsity_l1`, Network Slimming), obd, apoz, fpgm, random -- the same per-group ratios, only the
    channels chosen differ;
(c) the evaluation proxy: over `--plans` random plans at the budget (a uniform random allocation per group,
    projected onto the budget like the `random` strategy), the Spearman rank correlation between the proxy
    (val after BN recalibration, with and without reconstruction before it) and the test metric after the
    one-shot fine-tune of each plan.

    python benchmarks/methods.py --quick          # smoke test: mnist1d-cnn (small data), 1 seed, 4 plans, 30 steps
    python benchmarks/methods.py                  # 2 models, 3 seeds, 15 plans, 300 steps

Outputs under --out (default benchmarks/out/methods): rows.csv (one row per fine-tune), proxy.csv, tables.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")

import numpy as np
import pandas as pd
import torch
import yaml
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoprune.app import api  # noqa: E402
from autoprune.pruning.schedules import Schedule, finetune, widths  # noqa: E402
from autoprune.pruning.groups import PrunableModel  # noqa: E402
from autoprune.searching import strategies  # noqa: E402
from autoprune.searching.space import Budget, SearchSpace  # noqa: E402

MODELS = {
    "mnist1d-cnn": "search_spaces/mnist1d-cnn-macs50.yaml",
    "digits-cnn": "search_spaces/digits-cnn-macs50.yaml",
}
SCHEDULES = {  # label -> (Schedule kind, extra Schedule fields, reconstruct before the fine-tune)
    "one-shot": ("oneshot", {}, False),
    "polynomial (power 1)": ("polynomial", {"power": 1.0}, False),
    "AGP (cubic)": ("agp", {}, False),
    "one-shot + reconstruction": ("oneshot", {}, True),
}
CRITERIA = ["l2", "bn_scale", "bn_scale+L1", "obd", "apoz", "fpgm", "random"]
QUICK_OVERRIDES = {"data": {"kwargs": {"num_samples": 3000}}, "train": {"epochs": 6},
                   "evaluation": {"calibration_batches": 4}}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def make_session(model: str, args, *, sparsity_l1: float = 0.0, reconstruct: bool = False):
    spec = yaml.safe_load((ROOT / MODELS[model]).read_text())
    spec["budget"] = {"macs": args.budget}
    if args.quick:
        spec = _merge(spec, QUICK_OVERRIDES)
    spec = _merge(spec, {"train": {"sparsity_l1": sparsity_l1}, "evaluation": {"reconstruct": reconstruct}})
    spec["name"] = f"methods-{model}" + (f"-l1{sparsity_l1:g}" if sparsity_l1 else "") + ("-rec" if reconstruct else "")
    spec["output"] = str(Path(args.out) / "runs")
    return api.session(spec, show_progress=False)


def space_of(s) -> SearchSpace:
    """The search space without priors: every group in [0, max_ratio], the budget from the spec."""
    return SearchSpace.build(s.pruner, Budget.from_spec(s.spec, s.pruner, s.cost_model), None, s.spec.search.tolerance)


def pruner_with_seed(s, seed: int) -> PrunableModel:
    """The session's pruner with another seed (random scores differ per seed; the rest is identical)."""
    p = s.spec.pruning
    return PrunableModel(s.target.model, s.target.example_input, ignore=p.ignore, criterion=p.criterion,
                         round_to=p.round_to, max_ratio=p.max_ratio, mode=p.mode,
                         calibration=s.evaluator.calibration[:4], seed=seed)


def run_finetune(s, pm: PrunableModel, plan, args, seed: int, kind: str = "oneshot", extra: dict | None = None,
                 reconstruct: bool = False) -> dict:
    """Prune (following the schedule) while fine-tuning; the same steps, lr and seed for every method."""
    sched = Schedule(kind, steps=args.ft_steps, frequency=max(1, args.ft_steps // 12), **(extra or {}))
    t0 = time.perf_counter()
    model = finetune(pm, plan, s.target.datasets, schedule=sched, lr=args.ft_lr, batch_size=s.spec.data.batch_size,
                     seed=seed, reconstruct_batches=s.evaluator.calibration if reconstruct else None)
    ft_s = time.perf_counter() - t0
    if widths(model) != widths(pm.apply(plan, check=False)):
        raise RuntimeError(f"{kind}: fine-tuned model does not match the plan's architecture")
    return {"val_ft": s.evaluator.score(model, "val"), "test_ft": s.evaluator.score(model, "test"), "ft_s": round(ft_s, 2)}


def proxy(s, pm: PrunableModel, plan, reconstruct: bool) -> float:
    ev = copy.copy(s.evaluator)  # shares the calibration and val batches
    ev.reconstruct, ev.pruner = reconstruct, pm
    return ev.evaluate_plan(pm, plan)


def random_plans(space: SearchSpace, n: int, seed: int) -> list:
    """A uniform random allocation per group, projected onto the budget (what the `random` strategy samples)."""
    rng = np.random.default_rng(seed)
    plans, seen = [], set()
    for _ in range(20 * n):
        proposal = {d: float(rng.uniform(0, space.bounds[d])) for d in space.dims}
        plan, ok = space.project(proposal)
        key = plan.to_json(indent=None)
        if ok and key not in seen:
            seen.add(key)
            plans.append(plan)
        if len(plans) == n:
            break
    return plans


def bench_model(model: str, args, log) -> tuple[list[dict], list[dict], float]:
    rows, proxies = [], []
    s = make_session(model, args)
    t0 = time.perf_counter()
    s.target  # trains (or loads) the base model
    base = {"val": s.evaluator.score(s.target.model, "val"), "test": s.evaluator.score(s.target.model, "test")}
    log(f"{model}: base model val {base['val']:.4f} test {base['test']:.4f} ({time.perf_counter() - t0:.0f} s)")
    space = space_of(s)
    plan = strategies.uniform_plan(space)
    macs, _ = s.cost_model.estimate(plan)
    common = {"model": model, "macs_ratio": round(macs / s.cost_model.base_macs, 4), "base_test": base["test"]}
    log(f"{model}: uniform plan {plan.summary()} at {common['macs_ratio']:.3f} of the MACs")

    # (a) schedules, l2
    for label, (kind, extra, rec) in (SCHEDULES.items() if "a" in args.parts or "b" in args.parts else ()):
        if "a" not in args.parts and label != "one-shot":  # (b) reuses the one-shot rows
            continue
        for seed in args.seeds:
            r = run_finetune(s, s.pruner, plan, args, seed, kind, extra, rec)
            rows.append({**common, "part": "schedule", "method": label, "seed": seed, **r})
            log(f"  schedule {label:<26} seed {seed}: test {r['test_ft']:.4f} ({r['ft_s']} s)")

    # (b) criteria, one-shot (l2 is (a)'s one-shot row: the same computation)
    s_l1 = None
    for crit in (CRITERIA if "b" in args.parts else ()):
        for seed in args.seeds:
            if crit == "l2":
                r = next(x for x in rows if x["part"] == "schedule" and x["method"] == "one-shot" and x["seed"] == seed)
                rows.append({**r, "part": "criterion", "method": "l2"})
                continue
            if crit == "bn_scale+L1":
                if s_l1 is None:
                    t0 = time.perf_counter()
                    s_l1 = make_session(model, args, sparsity_l1=args.sparsity_l1)
                    s_l1.target
                    log(f"{model}: trained with sparsity_l1={args.sparsity_l1:g}: val "
                        f"{s_l1.evaluator.score(s_l1.target.model, 'val'):.4f} test "
                        f"{s_l1.evaluator.score(s_l1.target.model, 'test'):.4f} ({time.perf_counter() - t0:.0f} s)")
                sess, pm, c = s_l1, s_l1.pruner, "bn_scale"
            elif crit == "random":
                sess, pm, c = s, pruner_with_seed(s, seed), "random"
            else:
                sess, pm, c = s, s.pruner, crit
            p = pm.plan(plan.ratios, criterion=c)
            val_proxy = proxy(sess, pm, p, False)
            r = run_finetune(sess, pm, p, args, seed)
            rows.append({**common, "part": "criterion", "method": crit, "seed": seed, "val_proxy": val_proxy, **r})
            log(f"  criterion {crit:<12} seed {seed}: proxy {val_proxy:.4f} test {r['test_ft']:.4f} ({r['ft_s']} s)")
    for r in rows:  # the proxy of the l2 rows (the uniform plan as it is)
        if r["part"] == "criterion" and r["method"] == "l2":
            r["val_proxy"] = proxy(s, s.pruner, plan, False)

    # (c) proxy fidelity over random plans
    for i, p in enumerate(random_plans(space, args.plans, seed=1000) if "c" in args.parts else ()):
        t0 = time.perf_counter()
        off = proxy(s, s.pruner, p, False)
        t1 = time.perf_counter()
        on = proxy(s, s.pruner, p, True)
        t2 = time.perf_counter()
        r = run_finetune(s, s.pruner, p, args, args.seeds[0])
        macs, _ = s.cost_model.estimate(p)
        proxies.append({"model": model, "plan": i, "macs_ratio": round(macs / s.cost_model.base_macs, 4),
                        "proxy_bn": off, "proxy_rec_bn": on, "proxy_bn_s": round(t1 - t0, 3),
                        "proxy_rec_bn_s": round(t2 - t1, 3), **r, "ratios": p.summary()})
        log(f"  plan {i:2d}: proxy {off:.4f} / with reconstruction {on:.4f} -> test {r['test_ft']:.4f}")
    return rows, proxies, base["test"]


def fmt(values) -> str:
    v = np.asarray(values, dtype=float) * 100
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def rho_ci(x, y, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Spearman rho of (x, y) and its 90 % bootstrap interval (plans resampled with replacement)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rho = float(spearmanr(x, y).statistic) if len(x) > 2 else float("nan")
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if len(x) > 3 else 0):
        idx = rng.integers(0, len(x), len(x))
        if len(set(idx)) > 2:
            r = spearmanr(x[idx], y[idx]).statistic
            if np.isfinite(r):
                boots.append(r)
    lo, hi = (np.percentile(boots, [5, 95]) if boots else (float("nan"), float("nan")))
    return rho, float(lo), float(hi)


def rho_diff_ci(a, b, y, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """rho(b, y) - rho(a, y) and its 90 % paired bootstrap interval."""
    a, b, y = (np.asarray(v, float) for v in (a, b, y))
    d = float(spearmanr(b, y).statistic - spearmanr(a, y).statistic) if len(y) > 2 else float("nan")
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if len(y) > 3 else 0):
        idx = rng.integers(0, len(y), len(y))
        if len(set(idx)) > 2:
            r = spearmanr(b[idx], y[idx]).statistic - spearmanr(a[idx], y[idx]).statistic
            if np.isfinite(r):
                boots.append(r)
    lo, hi = (np.percentile(boots, [5, 95]) if boots else (float("nan"), float("nan")))
    return d, float(lo), float(hi)


def tables(rows: pd.DataFrame, proxies: pd.DataFrame, args) -> list[str]:
    md = []
    n_seeds = len(args.seeds)
    for part, title, col in (("schedule", "(a) Schedules (criterion l2)", "schedule"),
                             ("criterion", "(b) Criteria (one-shot)", "criterion")):
        if rows.empty or {"schedule": "a", "criterion": "b"}[part] not in args.parts:
            continue
        sub = rows[rows.part == part]
        models = list(dict.fromkeys(sub.model))
        md += ["", f"## {title}: test accuracy % after the fine-tune ({args.ft_steps} steps), mean ± std over "
                   f"{n_seeds} seed(s)", ""]
        crit = part == "criterion"
        head = [f"{m} test %" for m in models] + ([f"{m} val proxy % (BN recal., before ft)" for m in models] if crit else [])
        md.append(f"| {col} | " + " | ".join(head) + " |")
        md.append("|---" * (1 + len(head)) + "|")
        for method in dict.fromkeys(sub.method):
            cells = [fmt(sub[(sub.model == m) & (sub.method == method)].test_ft) for m in models]
            if crit:
                cells += [fmt(sub[(sub.model == m) & (sub.method == method)].val_proxy) for m in models]
            md.append(f"| {method} | " + " | ".join(cells) + " |")
    if proxies.empty:
        return md
    md += ["", f"## (c) Proxy fidelity: Spearman ρ between the proxy and test accuracy after the fine-tune "
               f"({args.ft_steps} steps, one-shot), over random plans at {args.budget:.0%} MACs (90 % bootstrap intervals)", "",
           "| model | plans | ρ proxy = BN recal. | ρ proxy = reconstruction + BN recal. | ρ difference (rec − no rec) "
           "| mean proxy % (BN / rec+BN) | mean test % after ft | proxy s/plan (BN / rec+BN) |",
           "|---|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(proxies.model):
        p = proxies[proxies.model == m]
        r0, l0, h0 = rho_ci(p.proxy_bn, p.test_ft)
        r1, l1, h1 = rho_ci(p.proxy_rec_bn, p.test_ft)
        d, ld, hd = rho_diff_ci(p.proxy_bn, p.proxy_rec_bn, p.test_ft)
        md.append(f"| {m} | {len(p)} | {r0:.2f} [{l0:.2f}, {h0:.2f}] | {r1:.2f} [{l1:.2f}, {h1:.2f}] | "
                  f"{d:+.2f} [{ld:+.2f}, {hd:+.2f}] | {100 * p.proxy_bn.mean():.1f} / {100 * p.proxy_rec_bn.mean():.1f} | "
                  f"{100 * p.test_ft.mean():.1f} (range {100 * p.test_ft.min():.1f}–{100 * p.test_ft.max():.1f}) | "
                  f"{p.proxy_bn_s.median():.2f} / {p.proxy_rec_bn_s.median():.2f} |")
    return md


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: mnist1d-cnn (small data), 1 seed, 4 plans, 30 steps")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    p.add_argument("--budget", type=float, default=0.3, help="MACs budget, fraction of the unpruned model")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--plans", type=int, default=15, help="random plans for the proxy correlation")
    p.add_argument("--ft-steps", type=int, default=300)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--sparsity-l1", type=float, default=1e-3, help="train.sparsity_l1 of the bn_scale+L1 model")
    p.add_argument("--parts", default="a,b,c", help="comma list of the parts to run: a (schedules), b (criteria), c (proxy)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/out/methods"))
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.plans, args.ft_steps = "mnist1d-cnn", "0", 4, 30
    args.models = [m for m in args.models.split(",") if m]
    args.parts = set(args.parts.split(","))
    args.seeds = [int(x) for x in str(args.seeds).split(",") if x != ""]
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    t_start = time.perf_counter()
    cmd = " ".join(["python benchmarks/methods.py", *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    machine = (f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()} ({platform.machine()}), "
               f"torch {torch.__version__}, Python {platform.python_version()}, "
               f"load average at start {os.getloadavg()[0]:.1f}")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    log(f"{cmd} on {machine}")
    rows, proxies, base_test = [], [], {}
    for m in args.models:
        r, p, base_test[m] = bench_model(m, args, log)
        rows += r
        proxies += p
        pd.DataFrame(rows).to_csv(out / "rows.csv", index=False)
        pd.DataFrame(proxies).to_csv(out / "proxy.csv", index=False)
    rows_df, proxy_df = pd.DataFrame(rows), pd.DataFrame(proxies)
    total = time.perf_counter() - t_start
    header = [f"# Methods benchmark ({started:%Y-%m-%d})", "",
              f"- date: {started:%Y-%m-%d %H:%M} UTC; total {total / 60:.1f} min",
              f"- machine: {machine}",
              f"- command: `{cmd}`",
              f"- budget: {args.budget:.0%} MACs; plan: the uniform plan (`strategies.uniform_plan`, no priors) per model; "
              f"fine-tune: {args.ft_steps} Adam steps, lr {args.ft_lr:g}, cosine decay, seeds {args.seeds}; "
              f"bn_scale+L1: base model retrained with train.sparsity_l1 = {args.sparsity_l1:g}",
              "- base models (test %): " + ", ".join(f"{m} {100 * base_test[m]:.1f}" for m in args.models)]
    md = header + tables(rows_df, proxy_df, args)
    (out / "tables.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return out


if __name__ == "__main__":
    main()
