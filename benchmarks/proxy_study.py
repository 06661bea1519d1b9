"""Which cheap score predicts a plan's metric after recovery? The search's own candidates, scored every way.

    python benchmarks/proxy_study.py --budgets 0.15,0.3 --seeds 0,1
    python benchmarks/proxy_study.py --spec search_spaces/digits-mobilenetv2-macs50.yaml --budgets 0.3 --seeds 0

For each budget and seed it runs autoprune's default search (as `benchmarks/peers.py` does: same spec, same seed),
takes the candidates a user's search chooses among (the `--top` best trials by the search's proxy, every warm start,
and `--others` more trials drawn at random), and scores each plan with several cheap predictors of how well it will
recover:

- `proxy`: the search's own score (the task's metric on val after BatchNorm recalibration);
- `neg_loss`: minus the task's loss on val after the same recalibration (cross-entropy for a classifier: smoother
  than accuracy, it also sees how wrong the wrong answers are);
- `neg_kl`: minus the KL divergence of the recalibrated model's val predictions from the unpruned model's;
- `grad_norm`: the norm of the task loss's gradient on one train batch (a trainability score from the NAS
  literature);
- `log_width`: the mean log of the kept fraction of every group's channels (capacity, nothing measured);
- `params`: the parameters kept;
- `ftN`: val metric after N steps of the common recovery (the cost of a short re-rank).

The ground truth is the benchmark's common recovery (`peers.recover`: 300 Adam steps, cosine lr, the task's loss)
from the raw pruned model, then test. Per budget and seed it prints Spearman's rank correlation of every predictor
with the recovered test metric, and the recovered test metric of the plan each predictor would pick (the `best`
column is the best candidate's: what a perfect predictor gets). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
import peers  # noqa: E402
from _tables import git_rev, machine  # noqa: E402

import optuna  # noqa: E402

from autoprune import PruningPlan  # noqa: E402
from autoprune.app import api  # noqa: E402
from autoprune.model.task import to_device  # noqa: E402
from autoprune.searching.objective import trial_attrs  # noqa: E402
from autoprune.searching.studies import open_storage, storage_url, study_name  # noqa: E402

PREDICTORS = ["proxy", "neg_loss", "neg_kl", "grad_norm", "log_width", "params"]


def candidates(s, res: dict, top: int, others: int, seed: int) -> list[tuple[str, PruningPlan, float]]:
    """(label, plan, proxy) for the top trials by proxy, every warm start and a few random other trials."""
    study = optuna.load_study(storage=open_storage(storage_url(s.spec)), study_name=study_name(s.spec, res["strategy"]))
    rows = []
    for t in study.trials:
        a = trial_attrs(t)
        if t.state != optuna.trial.TrialState.COMPLETE or "plan" not in a or not a.get("feasible", True):
            continue
        rows.append((a.get("warm_start") or f"trial{t.number}", PruningPlan.from_dict(a["plan"]), float(t.value)))
    seen, out = set(), []
    ranked = sorted(rows, key=lambda r: -r[2])
    rest = [r for r in ranked[top:] if not r[0].startswith("trial")] + \
        random.Random(seed).sample([r for r in ranked[top:] if r[0].startswith("trial")],
                                   min(others, sum(r[0].startswith("trial") for r in ranked[top:])))
    for r in ranked[:top] + rest:
        key = tuple(sorted(s.pruner.kept(r[1]).items()))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


@torch.no_grad()
def val_losses(s, model: torch.nn.Module) -> tuple[float, float]:
    """(task loss, KL from the unpruned model's predictions) on val, for the recalibrated model."""
    ev, task, teacher = s.evaluator, s.evaluator.task, s.target.model.eval()
    loss = kl = n = 0.0
    for x, y in ev.iter_batches("val"):
        x = to_device(x, ev.device)
        out = task.forward(model, x)
        t_out = task.forward(teacher, x)
        b = float(len(y)) if y is not None else 1.0
        loss += float(task.loss(out, y, t_out)) * b
        if out.dim() == 2 and out.shape == t_out.shape:
            kl += float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(t_out, -1), log_target=True,
                                 reduction="batchmean")) * b
        n += b
    return loss / n, kl / n


def grad_norm(s, model: torch.nn.Module) -> float:
    m = copy.deepcopy(model).train()
    x, y = next(iter(s.evaluator.batches("train")))
    task = s.evaluator.task
    t_out = task.forward(s.target.model.eval(), x).detach() if task.needs_teacher else None
    task.loss(task.forward(m, x), y, t_out).backward()
    return math.sqrt(sum(float((p.grad ** 2).sum()) for p in m.parameters() if p.grad is not None))


def study_one(args, budget: float, seed: int, log) -> list[dict]:
    pargs = peers.parse(["--spec", args.spec, "--out", args.out])
    s = peers.session_for(pargs, ("macs", budget), seed, "autoprune")
    t0 = time.perf_counter()
    res = api.search(s, show_progress=False, test=False)
    log(f"macs{budget} s{seed}: search {time.perf_counter() - t0:.1f} s, best proxy {res['best']['metric']:.4f}")
    rows = []
    cands = candidates(s, res, args.top, args.others, seed)
    bs = s.spec.data.batch_size
    for label, plan, proxy in cands:
        raw = s.pruner.apply(plan)
        prepared = s.evaluator.prepare(copy.deepcopy(raw), plan, s.pruner)
        loss, kl = val_losses(s, prepared)
        kept = s.pruner.kept(plan)
        row = {"budget": budget, "seed": seed, "plan": label, "proxy": proxy, "neg_loss": -loss, "neg_kl": -kl,
               "grad_norm": grad_norm(s, prepared),
               "log_width": sum(math.log(kept[g.name] / g.channels) for g in s.pruner.groups) / len(s.pruner.groups),
               "params": sum(p.numel() for p in raw.parameters())}
        for steps in args.short:
            m = peers.recover(copy.deepcopy(raw), s.target.datasets["train"], steps=steps, lr=args.ft_lr, batch_size=bs,
                              seed=seed, task=s.evaluator.task, teacher=s.target.model)
            row[f"ft{steps}"] = float(s.evaluator.score(m, "val"))
        m = peers.recover(copy.deepcopy(raw), s.target.datasets["train"], steps=args.ft_steps, lr=args.ft_lr,
                          batch_size=bs, seed=seed, task=s.evaluator.task, teacher=s.target.model)
        row["val_ft"] = float(s.evaluator.score(m, "val"))
        row["test_ft"] = float(s.evaluator.score(m, "test"))
        row["search_best"] = res["best"]["plan"]["ratios"] == plan.ratios
        rows.append(row)
        log(f"  {label:12s} proxy {proxy:.4f} loss {loss:.3f} kl {kl:.3f} -> test {row['test_ft']:.4f}")
    return rows


def summary(df: pd.DataFrame, predictors: list[str]) -> pd.DataFrame:
    out = []
    for (b, seed), g in df.groupby(["budget", "seed"]):
        r = {"budget": b, "seed": seed, "n": len(g), "best": g.test_ft.max()}
        for p in predictors:
            r[f"rho_{p}"] = g[p].corr(g.test_ft, method="spearman")
            r[f"pick_{p}"] = g.loc[g[p].idxmax(), "test_ft"]
        out.append(r)
    return pd.DataFrame(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(peers.PKG_ROOT / "search_spaces/digits-resnet20-macs50.yaml"))
    p.add_argument("--budgets", default="0.15,0.3")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--top", type=int, default=10, help="trials taken by the search's proxy")
    p.add_argument("--others", type=int, default=6, help="other trials drawn at random")
    p.add_argument("--short", default="50", help="short recoveries scored as predictors (steps, comma separated)")
    p.add_argument("--ft-steps", type=int, default=300)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(peers.ROOT / "benchmarks/out/proxy_study"))
    p.add_argument("--csv", default=None)
    p.add_argument("--from-csv", default=None, help="print the tables of an earlier run's CSV (runs nothing)")
    args = p.parse_args(argv)
    args.short = [int(x) for x in args.short.split(",") if x]
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rows = []
    if args.from_csv:
        df = pd.read_csv(args.from_csv)
        args.short = sorted(int(c[2:]) for c in df.columns if c.startswith("ft") and c[2:].isdigit())
    for b in [] if args.from_csv else [float(x) for x in args.budgets.split(",")]:
        for seed in [int(x) for x in args.seeds.split(",")]:
            rows += study_one(args, b, seed, log)
            df = pd.DataFrame(rows)
            df.to_csv(args.csv or Path(args.out) / "proxy_study.csv", index=False)
    preds = PREDICTORS + [f"ft{n}" for n in args.short]
    sm = summary(df, preds)
    print(f"\n{machine()}, git {git_rev(peers.PKG_ROOT)}, spec {args.spec}, recovery {args.ft_steps} steps lr {args.ft_lr}\n")
    print("Spearman with the recovered test metric:\n")
    print(sm[["budget", "seed", "n"] + [f"rho_{p}" for p in preds]].round(2).pipe(peers._md))
    print("\nRecovered test metric of the plan each predictor picks (best: the best candidate's):\n")
    print(sm[["budget", "seed", "best"] + [f"pick_{p}" for p in preds]].round(4).pipe(peers._md))


if __name__ == "__main__":
    main()
