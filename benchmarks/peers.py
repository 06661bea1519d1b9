"""Peer benchmark: autoprune's default search against the heuristic plans it ships and NVIDIA ModelOpt FastNAS.

One command, one run. Every method gets the same model (the spec's trained weights), the same budget, the same
score function (val metric after BatchNorm recalibration on the same calibration batches: autoprune's proxy),
the same recovery (a fixed fine-tune written here in plain torch, identical for every method) and the same
seeds; every final model is counted by one counter (torch.utils.flop_counter.FlopCounterMode, MACs = FLOPs / 2).

    python benchmarks/peers.py                                   # ResNet-20 / digits, 50 % and 30 % MACs, seeds 0,1,2
    python benchmarks/peers.py --quick                           # smoke test: 50 %, seed 0, short fine-tunes
    python benchmarks/peers.py --split-per-seed --seeds 1,2,3,4,5,6,7,8,9,10   # a data split and a model per seed

Methods (--methods):
  autoprune    `api.search(session)` with the spec's (default) search section: TPE, sensitivity priors, 60 trials
  autoprune-mf the same plus multi-fidelity rungs: search.recovery_rungs [50, 200], rung_reduction 3
  autoprune-rerank  the same plus search.rerank_top_k 3, rerank_steps 50 (3 best + the heuristic plans re-ranked)
  autoprune-tm the default search held to FastNAS's wall time: search.timeout_s = the `fastnas` row's search wall
               time at the same budget and seed (needs `fastnas` in --methods; runs after it); the default
               search.priors: auto then skips the sensitivity sweep when it would take over 2/3 of that time
  uniform, global, lamp, netadapt, random
               `api.search(session, strategy=...)`, the heuristics `autoprune search --strategy` selects
  fastnas      ModelOpt `mtp.prune(mode="fastnas")`, channel divisor 4 on every Conv2d/BatchNorm2d/Linear
  fastnas-d1   the same with channel divisor 1 (autoprune's granularity, `pruning.round_to: 1`)

It imports autoprune through `import autoprune` and `from autoprune import api` (and the budget's device, to
measure latency rows the way autoprune does). ModelOpt needs
`pip install nvidia-modelopt huggingface_hub torchprofile==0.0.4` (pin torch first: see the results file).
Outputs: <out>/runs.csv (one row per setting/seed/method, written as it goes), the markdown results file
(--md) and a plotly plot of metric against search wall time (--html).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _tables import git_rev, machine, mean_pm  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import autoprune  # noqa: E402
from autoprune.app import api  # noqa: E402
from autoprune.costs.counting import FLOP_FORMULAS  # noqa: E402
from autoprune.model.task import scored_by_accuracy  # noqa: E402
from autoprune.spec import set_dotted  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PKG_ROOT = Path(autoprune.__file__).resolve().parents[1]  # the checkout whose autoprune is imported
AUTOPRUNE_METHODS = {"autoprune": None, "autoprune-mf": None, "autoprune-rerank": None, "autoprune-tm": None, "autoprune-loss": None, "uniform": "uniform", "global": "global", "lamp": "lamp",
                     "netadapt": "netadapt", "random": "random"}
FASTNAS_METHODS = {"fastnas": 4, "fastnas-d1": 1}  # label -> channel divisor
ALL_METHODS = [*AUTOPRUNE_METHODS, *FASTNAS_METHODS]
# FastNAS width choices: ratios 0.10 .. 1.00 in steps of 0.05 of each layer's width (keep >= 10 %, as autoprune's
# pruning.max_ratio 0.9), rounded to the divisor
FASTNAS_RATIOS = tuple(round(0.05 * i, 2) for i in range(2, 21))


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# ------------------------------------------------------------------ the common pieces, identical for every method
def count_macs(model: torch.nn.Module, example, task=None) -> float:
    """MACs of one forward pass of `example`, counted by torch's FlopCounterMode (conv, matmul, attention, and the
    grouped matmuls of mixture-of-experts layers) / 2, with the formulas torch lacks from autoprune's counter
    (`FLOP_FORMULAS`): without them a Mixtral's experts (`aten._grouped_mm`) counted nothing, nor did attention on
    the CPU, so a plan that cut heads was counted above the budget its search met (LAMP on the byte-level
    Mixtral: 0.519 of the MACs, 0.499 with attention counted). Rows before 2026-11-28 were counted without them."""
    m = copy.deepcopy(model).eval()
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as fc, torch.no_grad():
        task.forward(m, example) if task is not None else m(example)
    return fc.get_total_flops() / 2


# what each built-in task's recovery minimises, by its metric (the results' recovery line)
LOSS_OF = {"accuracy": "cross-entropy", "cosine": "distillation from the unpruned model",
           "agreement": "distillation from the unpruned model", "neg_nll": "next-token cross-entropy",
           "token_accuracy": "next-token cross-entropy", "neg_loss": "the model's own loss", "neg_mse": "MSE"}


def recover(model: torch.nn.Module, train_ds, *, steps: int, lr: float, batch_size: int, seed: int, task,
            teacher: torch.nn.Module | None = None) -> torch.nn.Module:
    """The common recovery: `steps` Adam steps (cosine lr from `lr`) on the task's own loss (classification:
    cross-entropy; distillation: the task's loss against the unpruned model's outputs on the same batch), batches of
    the train split shuffled by `seed`; the same for every method. In place."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=gen, drop_last=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    if teacher is not None:
        teacher.eval()
    step = 0
    while step < steps:
        for batch in loader:
            x, y = task.split(batch)
            t_out = None
            if task.needs_teacher:
                with torch.no_grad():
                    t_out = task.forward(teacher, x)
            loss = task.loss(task.forward(model, x), y, t_out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    return model.eval()


@torch.no_grad()
def test_correct(s, model: torch.nn.Module) -> str | None:
    """Which test samples `model` gets right, as a string of 0/1 in the test set's order (classification scored
    by accuracy only, else None): what the paired comparison of two methods resamples."""
    ev = s.evaluator
    if not scored_by_accuracy(ev.task):
        return None
    model.eval()
    bits = []
    for x, y in ev.iter_batches("test"):
        pred = ev.task.forward(model, x).argmax(-1)
        bits += ["1" if int(b) else "0" for b in (pred == y.to(pred.device)).reshape(-1).tolist()]
    return "".join(bits)


def paired_delta(method: pd.DataFrame, ref: pd.DataFrame, reps: int = 2000, seed: int = 0) -> tuple[float, float, float] | None:
    """Mean test accuracy of `method` minus `ref`'s (pp), with a 95 % bootstrap interval that resamples test images,
    paired by image and by seed: the uncertainty a 360-image test set adds to a difference of means, which the
    seeds' spread alone does not show. With the same images under every seed, one draw of image positions serves
    every seed; where seeds have their own data splits (a `split_seed` column that differs between seeds:
    `--split-per-seed`), each seed's images are resampled on their own. None when a seed or the per-image record
    is missing."""
    import numpy as np

    if "test_correct" not in method or "test_correct" not in ref:
        return None
    a = method.dropna(subset=["test_correct"]).set_index("seed").test_correct
    b = ref.dropna(subset=["test_correct"]).set_index("seed").test_correct
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        return None
    diff = np.array([[int(c) for c in a[k]] for k in seeds], dtype=float) - \
        np.array([[int(c) for c in b[k]] for k in seeds], dtype=float)  # seeds x images
    rng = np.random.default_rng(seed)
    split = method.dropna(subset=["test_correct"]).set_index("seed").get("split_seed")
    if split is not None and split.loc[seeds].nunique() > 1:  # a test set per seed: resample each on its own
        idx = rng.integers(0, diff.shape[1], size=(reps, len(seeds), diff.shape[1]))
        boot = np.take_along_axis(diff[None], idx, axis=2).mean(axis=(1, 2))
    else:
        idx = rng.integers(0, diff.shape[1], size=(reps, diff.shape[1]))
        boot = diff[:, idx].mean(axis=(0, 2))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return 100 * float(diff.mean()), 100 * float(lo), 100 * float(hi)


def widths(model: torch.nn.Module) -> list[int]:
    """Output widths of the convolutions, or of the linear layers in a model without any."""
    convs = [m.out_channels for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    return convs or [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]


# ------------------------------------------------------------------ the methods
def setting_of(budget: tuple[str, float]) -> str:
    """'macs60' for 60 % of the MACs, 'lat70' for 70 % of the measured latency."""
    kind, value = budget
    return f"{'lat' if kind == 'latency' else 'macs'}{round(value * 100)}"


def parse_budget(token: str) -> tuple[str, float]:
    """'0.6' -> MACs fraction; 'lat0.7' -> fraction of the unpruned model's latency, measured."""
    return ("latency", float(token[3:])) if token.startswith("lat") else ("macs", float(token))


def session_for(args, budget: tuple[str, float], seed: int, method: str, timeout_s: float | None = None):
    s = api.session(spec_for(args, budget, seed, method, timeout_s), show_progress=False)
    s.target, s.evaluator  # the trained model, data and calibration batches: shared setup, outside every timer
    return s


def spec_for(args, budget: tuple[str, float], seed: int, method: str, timeout_s: float | None = None) -> dict:
    """The spec one method runs on: the start spec, its budget replaced, the method's own settings, --quick, --set."""
    spec = yaml.safe_load(Path(args.spec).read_text())
    kind, value = budget
    if kind == "latency":  # the spec's device, batch size and threads if it has a latency budget, else cpu/1/1
        old = spec.get("budget") or {}
        spec["budget"] = {"latency": value, "device": old.get("device", "cpu"), "batch_size": old.get("batch_size", 1),
                          "threads": old.get("threads", 1)}
    else:
        spec["budget"] = {"macs": value}  # replaced: exactly one budget kind
    spec = _merge(spec, {"search": {"seed": seed}})
    if getattr(args, "split_per_seed", False):  # every method at this seed: the seed's own data split and the model trained on it
        spec = _merge(spec, {"data": {"kwargs": {"seed": seed}}})
    if method == "autoprune-mf":  # the default search plus multi-fidelity rungs (search.recovery_rungs)
        spec = _merge(spec, {"search": {"recovery_rungs": [50, 200], "rung_reduction": 3}})
    if method == "autoprune-rerank":  # the default search plus a re-rank of its 3 best and the heuristic plans
        spec = _merge(spec, {"search": {"rerank_top_k": 3, "rerank_steps": 50}})
    if method == "autoprune-loss":  # the default search ranking its trials by minus the val loss (search.score)
        spec = _merge(spec, {"search": {"score": "loss"}})
    if method == "autoprune-tm":  # the default search, stopped at FastNAS's wall time (search.timeout_s)
        spec = _merge(spec, {"search": {"timeout_s": timeout_s}})
    if args.quick:
        spec = _merge(spec, {"search": {"n_trials": 12}, "sensitivity": {"ratios": [0.25, 0.5, 0.75]}})
    if method.startswith("autoprune") and args.set:  # --set KEY=VALUE: a variant of autoprune's default (after
        for item in args.set:                           # --quick, so that --set search.n_trials=... wins)
            dotted, _, raw = item.partition("=")
            set_dotted(spec, dotted, yaml.safe_load(raw))
    spec["name"] = f"peers-{setting_of(budget)}-s{seed}-{method}"
    # one output root per budget: the base model is trained once per root (and run_one wipes the sensitivity
    # cache before each autoprune search, so every search's wall time includes all of its own work)
    spec["output"] = str(Path(args.out) / f"runs-{setting_of(budget)}")
    return spec


def run_autoprune(s, strategy: str | None) -> dict:
    t0 = time.perf_counter()
    if strategy is None:  # the default search: whatever the spec's search section says
        res = api.search(s, show_progress=False, test=False)
    else:
        res = api.search(s, strategy=strategy, show_progress=False, test=False)
    wall = time.perf_counter() - t0
    best = res["best"]
    if best is None:
        return {"model": None, "wall_s": wall, "evals": res["evaluations"], "note": "no plan met the budget"}
    plan = autoprune.PruningPlan.from_dict(best["plan"])
    return {"model": s.pruner.apply(plan), "wall_s": wall, "evals": res["evaluations"],
            "evals_sensitivity": res["sensitivity_evaluations"], "own_macs_ratio": best["macs_ratio"],
            "searched": f"{res['strategy']}" + (f"/{res['sampler']}/priors={res['priors']}" if res["sampler"] else "")}


def run_fastnas(s, budget: float, divisor: int, ckpt: Path) -> dict:
    import modelopt.torch.prune as mtp

    conv = {"*": {"channels_ratio": FASTNAS_RATIOS, "kernel_size": (), "channel_divisor": divisor}}
    feat = {"*": {"features_ratio": FASTNAS_RATIOS, "feature_divisor": divisor}}
    # 1-D and 2-D convolutions alike (the MNIST-1D models); without a BatchNorm rule the coupled widths stay on the
    # default divisor (32)
    rules = {"nn.Conv1d": conv, "nn.Conv2d": conv, "nn.BatchNorm1d": feat, "nn.BatchNorm2d": feat, "nn.Linear": feat}
    n_evals = [0]

    def score(m: torch.nn.Module) -> float:  # the same score function as autoprune's proxy
        n_evals[0] += 1
        return float(s.evaluator(m, "val"))  # BN recalibration on the calibration batches, then val metric

    ckpt.unlink(missing_ok=True)  # never resume another run's sensitivity map
    model = copy.deepcopy(s.target.model)
    t0 = time.perf_counter()
    pruned, _ = mtp.prune(model, mode=[("fastnas", rules)], constraints={"flops": f"{budget * 100:g}%"},
                          dummy_input=s.target.example_input,
                          config={"data_loader": [x for x, _ in s.evaluator.calibration], "collect_func": lambda b: b,
                                  "score_func": score, "checkpoint": str(ckpt), "verbose": False})
    wall = time.perf_counter() - t0
    return {"model": pruned, "wall_s": wall, "evals": n_evals[0], "evals_sensitivity": None,
            "searched": f"fastnas (divisor {divisor})"}


def measure_latency_ms(s, model: torch.nn.Module) -> float:
    """Median latency on the budget's device, batch size and threads: autoprune's own measurement
    (warm-up, timed runs until the median's 95 % CI is within 2 %), the same call for every method."""
    from autoprune.costs.budgets import make_device

    return float(make_device(s.spec).measure_model(model, s.pruner.example).median_ms)


def run_one(args, budget: tuple[str, float], seed: int, method: str, base: dict, log) -> dict:
    """One method at one budget and seed. `base` caches the unpruned model's costs per setting, measured once:
    (setting, "macs") and, for a latency budget, (setting, "latency")."""
    kind, value = budget
    setting = setting_of(budget)
    wall = base.get((setting, seed, "fastnas_wall"))
    if method == "autoprune-tm" and not wall:
        return {"setting": setting, "budget": value, "seed": seed, "method": method,
                "note": "no fastnas wall time to match (fastnas did not run or failed)"}
    s = session_for(args, budget, seed, method, timeout_s=wall)
    ex = s.target.example_input
    if (setting, "macs") not in base:
        base[setting, "macs"] = count_macs(s.target.model, ex, s.evaluator.task)
        if kind == "latency":
            base[setting, "latency"] = measure_latency_ms(s, s.target.model)
    try:
        if method in FASTNAS_METHODS and kind == "latency":
            raise ValueError("FastNAS takes no latency constraint")
        if method in AUTOPRUNE_METHODS:
            # never a sensitivity table cached by another method at this budget and seed: every search's wall
            # time includes its own sweep
            shutil.rmtree(s.cache_dir / "sensitivity", ignore_errors=True)
            out = run_autoprune(s, AUTOPRUNE_METHODS[method])
        else:
            out = run_fastnas(s, value, FASTNAS_METHODS[method], Path(args.out) / f"fastnas-{method}-{seed}.pth")
    except Exception as e:  # reported as a row (budget not met), not fatal for the other methods
        out = {"model": None, "wall_s": float("nan"), "evals": float("nan"), "note": f"{type(e).__name__}: {e}"[:300]}
    if method == "fastnas" and out["model"] is not None:
        base[setting, seed, "fastnas_wall"] = out["wall_s"]  # what autoprune-tm is held to
    row = {"setting": setting, "budget": value, "seed": seed, "method": method,
           "split_seed": s.spec.data.kwargs.get("seed"),
           "metric": s.evaluator.task.metric_name,
           "searched": out.get("searched"), "search_wall_s": round(out["wall_s"], 2), "evals": out["evals"],
           "evals_sensitivity": out.get("evals_sensitivity"), "own_macs_ratio": out.get("own_macs_ratio"),
           "note": out.get("note", "")}
    model = out["model"]
    if model is None:
        log(f"{row['setting']} s{seed} {method}: {row['note']}")
        return row
    macs = count_macs(model, ex, s.evaluator.task)
    row["macs_ratio"] = macs / base[setting, "macs"]
    if kind == "latency":  # measured here, after the search, in the same process as the unpruned model
        row["latency_ms"] = measure_latency_ms(s, model)
        row["latency_ratio"] = row["latency_ms"] / base[setting, "latency"]
        row["budget_met"] = bool(row["latency_ratio"] <= value + 1e-9)
    else:
        row["budget_met"] = bool(row["macs_ratio"] <= value + 1e-9)
    row["params_ratio"] = sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in s.target.model.parameters())
    row["widths"] = json.dumps(widths(model))
    prepared = copy.deepcopy(model)
    row["val_proxy"] = float(s.evaluator(prepared, "val"))  # before recovery, the common score (prepares in place)
    row["test_before"] = float(s.evaluator.score(copy.deepcopy(model), "test"))  # raw, no recalibration
    row["test_prepared"] = float(s.evaluator.score(prepared, "test"))  # post-training: as the score function left it
    if args.recover_from == "prepared":  # recovery starts where the score function left the model
        model = prepared
    bs = s.spec.data.batch_size
    for label, steps in (("ft", args.ft_steps), ("ft_short", args.ft_short_steps)):
        if steps <= 0:
            continue
        t0 = time.perf_counter()
        m = recover(copy.deepcopy(model), s.target.datasets["train"], steps=steps, lr=args.ft_lr, batch_size=bs, seed=seed,
                    task=s.evaluator.task, teacher=s.target.model)
        row[f"{label}_s"] = round(time.perf_counter() - t0, 2)
        row[f"val_{label}"] = float(s.evaluator.score(m, "val"))
        row[f"test_{label}"] = float(s.evaluator.score(m, "test"))
        if label == "ft":
            row["test_correct"] = test_correct(s, m)
    row["baseline_test"] = float(s.evaluator.score(s.target.model, "test"))
    log(f"{row['setting']} s{seed} {method:10s}: proxy {row['val_proxy']:.4f} -> test {row.get('test_ft', float('nan')):.4f} "
        f"(short {row.get('test_ft_short', float('nan')):.4f}), MACs {row['macs_ratio']:.3f}, {row['evals']} evals, "
        f"{row['search_wall_s']} s")
    return row


# ------------------------------------------------------------------ report
def _md(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def model_label(args) -> str:
    """'resnet20 / digits' from the spec's model and data factories."""
    spec = yaml.safe_load(Path(args.spec).read_text())
    model = spec["model"]["factory"].rsplit(":", 1)[-1]
    data = (spec.get("data") or {}).get("factory", "data:?").rsplit(":", 1)[-1]
    return f"{model} / {data}"


def metric_label(runs: pd.DataFrame) -> str:
    """'%' for accuracy, 'cosine ×100' for a distillation task's cosine similarity, ..."""
    metric = str(runs["metric"].dropna().iloc[0]) if "metric" in runs and runs["metric"].notna().any() else "accuracy"
    return "%" if metric == "accuracy" else f"{metric} ×100"


def table(runs: pd.DataFrame, args) -> str:
    out = []
    unit = metric_label(runs)
    for setting, g in runs.groupby("setting", sort=False):
        rows = []
        for method in ALL_METHODS:
            r = g[g.method == method]
            if r.empty:
                continue
            ok = r[r.macs_ratio.notna()] if "macs_ratio" in r else r.iloc[:0]
            rows.append({
                "method": method,
                f"test {unit} after {args.ft_steps}-step FT": mean_pm(ok.get("test_ft", pd.Series(dtype=float)), 100),
                f"test {unit} after {args.ft_short_steps}-step FT": mean_pm(ok.get("test_ft_short", pd.Series(dtype=float)), 100),
                f"val {unit} proxy before FT": mean_pm(ok.val_proxy, 100) if len(ok) else "–",
                f"test {unit} before FT (post-training)": mean_pm(ok.test_prepared, 100) if "test_prepared" in ok and len(ok) else "–",
                "MACs ratio (FlopCounterMode)": mean_pm(ok.macs_ratio, 1, 3) if len(ok) else "–",
                **({"latency ratio (measured)": mean_pm(ok.latency_ratio, 1, 3) if len(ok) else "–"}
                   if setting.startswith("lat") else {}),
                **({f"Δ vs autoprune, test pp [95 % CI, paired by image]": _delta(ok, g)}
                   if "test_correct" in g and g.test_correct.notna().any() else {}),
                "budget met": f"{int(ok.budget_met.sum()) if len(ok) else 0}/{len(r)}",
                "search wall s": mean_pm(r.search_wall_s, 1, 1),
                "evaluations": mean_pm(r.evals.astype(float), 1, 0),
            })
        base = g.dropna(subset=["baseline_test"]).drop_duplicates("seed").baseline_test  # one a seed (--split-per-seed)
        what = f"{setting[3:]} % latency" if setting.startswith("lat") else f"{setting[4:]} % MACs"
        unpruned = (f" (unpruned test {100 * base.iloc[0]:.2f} {unit})" if base.nunique() == 1 else
                    f" (a data split per seed; unpruned test {mean_pm(base, 100)} {unit})")
        out.append(f"### {model_label(args)}, {what}, seeds {','.join(map(str, sorted(g.seed.unique())))}"
                   + (unpruned if len(base) else "") + "\n\n" + _md(pd.DataFrame(rows)))
    return "\n\n".join(out)


def _delta(rows: pd.DataFrame, setting: pd.DataFrame) -> str:
    ref = setting[setting.method == "autoprune"]
    ref = ref[ref.macs_ratio.notna()] if "macs_ratio" in ref else ref.iloc[:0]
    if rows.empty or ref.empty or (rows.method == "autoprune").all():
        return "–"
    d = paired_delta(rows, ref)
    return "–" if d is None else f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"


def plot(runs: pd.DataFrame, path: Path, args) -> bool:
    try:
        import plotly.express as px
    except ImportError:
        return False
    d = runs[runs.get("test_ft", pd.Series(dtype=float)).notna()].copy()
    if d.empty:
        return False
    y = f"test {metric_label(runs)} after FT"
    d[y] = 100 * d.test_ft
    fig = px.scatter(d, x="search_wall_s", y=y, color="method", symbol="method", facet_col="setting",
                     hover_data=["seed", "evals", "macs_ratio", "val_proxy"], log_x=True,
                     title=f"{model_label(args)}: test {metric_label(runs)} after the common {args.ft_steps}-step recovery "
                           "against search wall time (one point per seed)")
    fig.update_xaxes(title="search wall time, s (log)")
    fig.write_html(str(path), include_plotlyjs="cdn")
    return True


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=None, help="the spec to start from (default: search_spaces/digits-resnet20-macs50.yaml "
                                                 "of the checkout whose autoprune is imported); its budget is overridden")
    p.add_argument("--budgets", default="0.5,0.3", help="MACs fractions of the unpruned model; latN: a fraction N of "
                   "its latency, measured on the spec's latency device (else cpu, batch 1, 1 thread), e.g. lat0.7")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--ft-steps", type=int, default=300, help="the common recovery: Adam steps")
    p.add_argument("--ft-short-steps", type=int, default=50, help="a second, short recovery (0: skip)")
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--recover-from", choices=["raw", "prepared"], default="raw",
                   help="recovery starts from the pruned model as it is (raw) or as the common score function left it "
                        "(prepared: BN recalibration, and least-squares reconstruction where the spec enables it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key for the autoprune methods (e.g. search.n_trials=30; repeatable)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--split-per-seed", action="store_true",
                   help="give each seed its own data split (data.kwargs.seed = the seed; the data factory must take "
                        "`seed`) and a model trained on it, for every method: the paired comparison then covers as "
                        "many test sets as seeds instead of one (digits' test set is 360 images, 0.28 pp each)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/out/peers"), help="work dir (wiped at start)")
    p.add_argument("--md", default=None, help="results file (default: <out>/peers.md)")
    p.add_argument("--html", default=None, help="plot file (default: <out>/peers.html)")
    a = p.parse_args(argv)
    a.spec = a.spec or str(PKG_ROOT / "search_spaces/digits-resnet20-macs50.yaml")
    if a.quick:
        a.budgets, a.seeds, a.ft_steps, a.ft_short_steps = "0.5", "0", 20, 5
    return a


def check_split_per_seed(spec_path: str) -> None:
    """--split-per-seed passes each seed to the spec's data factory as `seed`: refuse, before anything runs, a
    factory that takes no such argument (else the first seed would fail inside the data loading, with the
    factory's own TypeError, after the first method's set-up)."""
    import inspect

    from autoprune.model.factories import import_object

    factory = yaml.safe_load(Path(spec_path).read_text())["data"]["factory"]
    params = inspect.signature(import_object(factory)).parameters.values()
    if not any(p.name == "seed" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise SystemExit(f"--split-per-seed gives each seed its own data split through the data factory's `seed` "
                         f"argument, and {factory} takes none: add one (the split's random seed) or leave out "
                         f"--split-per-seed")


def main(argv=None) -> Path:
    args = parse(argv)
    if args.split_per_seed:  # before the output directory is wiped
        check_split_per_seed(args.spec)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    md_path, html_path = Path(args.md or out / "peers.md"), Path(args.html or out / "peers.html")
    logf = (out / "log.txt").open("a")

    def log(msg: str) -> None:
        line = f"[{datetime.now(timezone.utc):%H:%M:%S}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    budgets = [parse_budget(b) for b in args.budgets.split(",") if b]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {ALL_METHODS}")
    if "autoprune-tm" in methods:  # held to fastnas's wall time: after it
        if "fastnas" not in methods:
            raise SystemExit("autoprune-tm is held to fastnas's wall time: add fastnas to --methods")
        methods = [m for m in methods if m != "autoprune-tm"] + ["autoprune-tm"]
    cmd = "python benchmarks/peers.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    started = datetime.now(timezone.utc)
    mach = machine()
    rev = git_rev(PKG_ROOT)  # the code this run imports: read now, not when the tables are written (later commits)
    log(f"start: {cmd} on {mach}; autoprune from {PKG_ROOT} (git {rev}), spec {args.spec}")
    rows, base = [], {}
    for budget in budgets:
        for seed in seeds:
            for method in methods:
                t0 = time.perf_counter()
                row = run_one(args, budget, seed, method, base, log)
                row["total_s"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
                pd.DataFrame(rows).to_csv(out / "runs.csv", index=False)
    runs = pd.DataFrame(rows)
    finished = datetime.now(timezone.utc)
    tbl = table(runs, args)
    print(tbl)
    metric = runs['metric'].iloc[0] if 'metric' in runs else 'accuracy'
    header = [
        f"- command: `{cmd}`",
        f"- machine: {mach}",
        f"- autoprune: git {rev}; spec `{Path(args.spec).name}` with its budget overridden",
        f"- started {started:%Y-%m-%d %H:%M} UTC, finished {finished:%H:%M} UTC ({(finished - started).total_seconds() / 60:.1f} min)",
        f"- recovery (every method): {args.ft_steps} Adam steps, lr {args.ft_lr} cosine, batch {yaml.safe_load(Path(args.spec).read_text())['data']['batch_size']}, "
        f"the task's loss on train ({metric} task: {LOSS_OF.get(metric, 'its loss')}), "
        f"seed = run seed (plain torch in peers.py), from the {args.recover_from} pruned model; short recovery: "
        f"{args.ft_short_steps} steps",
    ]
    settings = [
        "## What every method got",
        "",
        ("- per seed, its own data split (`data.kwargs.seed` = the seed, `--split-per-seed`) and the weights trained "
         "on it (the spec's `train` section); within a seed every method gets the same weights, split and "
         "calibration batches (the evaluator's, drawn with the run seed);" if args.split_per_seed else
         "- the same trained weights (the spec's `train` section, seed 0), data splits and calibration batches "
         "(the evaluator's, drawn with the run seed);"),
        "- the same score function: `session.evaluator(model, 'val')` = BatchNorm statistics re-estimated on the "
        "calibration batches (where the model has BatchNorms; least-squares reconstruction too where the spec enables "
        f"it), then the task's val {metric} (autoprune's proxy; FastNAS gets it as `score_func`, and its own "
        "BN calibration `data_loader` is the same batches);",
        "- the same budget counter on the final model: `torch.utils.flop_counter.FlopCounterMode` (conv, linear, attention and the grouped matmuls of experts"
        "), MACs = FLOPs / 2, ratio to the unpruned model; budget met = ratio <= budget;",
        "- the same recovery and seeds (see above); the test metric is read once, after recovery; "
        "'val % proxy before FT' is the common score of the final model before recovery;",
        "- `autoprune`: `api.search(session)` with the spec's search section unchanged (TPE, sensitivity priors, "
        "60 trials; its evaluations include the sensitivity sweep, its wall time too); `uniform`, `global`, `lamp`, "
        "`netadapt`, `random`: `api.search(session, strategy=...)`, the same path as `autoprune search --strategy` "
        "(random: 60 trials; netadapt: at most 60 evaluations); pruning criterion l2, `round_to: 1`, "
        "`max_ratio: 0.9` for all of them; `autoprune-tm`: the default search with `search.timeout_s` set to the "
        "`fastnas` row's wall time at the same budget and seed (its last trial finishes after the limit);",
        f"- `fastnas`: ModelOpt `mtp.prune(mode=[('fastnas', rules)], constraints={{'flops': '<budget>%'}})`, rules "
        f"on every Conv2d (`channels_ratio` {FASTNAS_RATIOS[0]:.2f}..1.00 step 0.05, i.e. keep >= 10 % as autoprune's "
        "max_ratio 0.9, `kernel_size: ()`), BatchNorm2d and Linear (`features_ratio` the same), divisor 4 (the "
        "default 32 leaves a 16/32/64-wide ResNet-20 no search space); `fastnas-d1`: divisor 1, autoprune's "
        "granularity. FastNAS picks its own channels (L2 norm of the consuming weights) and its own FLOPs counter "
        "(torchprofile) to enforce the budget; wall time = the whole `mtp.prune` call, evaluations = `score_func` calls.",
    ]
    md = [f"# Peer benchmark: autoprune vs shipped heuristics vs ModelOpt FastNAS ({started:%Y-%m-%d})", "", *header, "",
          tbl, "", *settings, ""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(md))
    runs.to_csv(md_path.with_suffix(".csv"), index=False)
    if plot(runs, html_path, args):
        log(f"plot: {html_path}")
    log(f"done: {md_path}, {out / 'runs.csv'}")
    return md_path


if __name__ == "__main__":
    main()
