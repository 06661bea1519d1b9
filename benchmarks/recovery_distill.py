"""Does distilling from the unpruned model help recovery? (`evaluation.recovery_distill`)

One plan per setting and method, the same pruned model, recovered exactly as a multi-fidelity rung recovers a
trial (`Objective._climb_rungs`): BN recalibration on the evaluator's calibration batches (`evaluator.prepare`),
then `train_model` on the task's loss plus `distill` times Hinton KD from the unpruned model (at temperature T; --kd lists the weight@T pairs), Adam at
`search.recovery_lr` (default `train.lr / 10`) for 50 steps (scored: rung 1), then 150 more (a new cosine,
as the next rung does; scored: 200 steps in all). Seeds vary the fine-tune's batch order; the trained model,
the calibration batches and the plans are the same for every seed. Test accuracy is read once per rung.

    python benchmarks/recovery_distill.py                       # ResNet-20 / digits, 30 % and 15 % MACs, seeds 0,1,2
    python benchmarks/recovery_distill.py --quick               # smoke test: 30 %, lamp, seed 0, CE only and KD 1@4

Plans (--plans): `uniform`, `lamp` (`api.search(session, strategy=...)`) and `autoprune` (the spec's default
search, seed 0). Prints a markdown table (mean ± std over seeds, test %) and writes it to --md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _tables import git_rev, machine, mean_pm  # noqa: E402

import autoprune  # noqa: E402
from autoprune.app import api  # noqa: E402
from autoprune.model.training import train_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLANS = {"uniform": "uniform", "lamp": "lamp", "autoprune": None}


def session_for(args, budget: float):
    spec = yaml.safe_load(Path(args.spec).read_text())
    spec["budget"] = {"macs": budget}
    spec["name"] = f"recovery-distill-macs{round(budget * 100)}"
    spec["output"] = args.out  # the trained checkpoint is cached under <out>/_cache and shared by both budgets
    s = api.session(spec, show_progress=False)
    s.target, s.pruner  # noqa: B018  the trained model, data and calibration batches: shared setup
    return s


def plan_for(s, method: str):
    res = api.search(s, strategy=PLANS[method], show_progress=False, test=False)
    best = res["best"]
    if best is None:
        return None, None
    return autoprune.PruningPlan.from_dict(best["plan"]), best["macs_ratio"]


def recover(s, plan, *, rungs: list[int], distill: float, temperature: float, seed: int, lr: float) -> list[dict]:
    ev, pm = s.evaluator, s.pruner
    model = ev.prepare(pm.apply(plan, check=False), plan, pm)
    out, done = [], 0
    for steps in rungs:
        t0 = time.perf_counter()
        train_model(model, ev.datasets["train"], epochs=1, lr=lr, batch_size=ev.batch_size, seed=seed,
                    max_steps=steps - done, show_progress=False, task=ev.task, teacher=s.target.model,
                    device=ev.device, distill=distill, distill_temperature=temperature)
        done = steps
        out.append({"steps": steps, "ft_s": time.perf_counter() - t0, "val": ev.score(model, "val"),
                    "test": ev.score(model, "test")})
    return out


def kd_label(distill: float, temperature: float) -> str:
    return "CE only" if distill == 0 else f"KD {distill:g} @T{temperature:g}"


def parse_kd(text: str) -> list[tuple[float, float]]:
    """'0,1@4,1@1' -> [(0, 4), (1, 4), (1, 1)]: distill weight @ temperature (default 4)."""
    out = []
    for item in text.split(","):
        w, _, t = item.partition("@")
        out.append((float(w), float(t) if t else 4.0))
    return out


def table(runs: pd.DataFrame, kds: list[tuple[float, float]]) -> str:
    blocks = []
    for (budget, steps), g in runs.groupby(["budget", "steps"], sort=False):
        lines = [f"### {round(budget * 100)} % MACs, {steps} recovery steps (test %, mean ± std over seeds "
                 f"{','.join(map(str, sorted(g.seed.unique())))})", ""]
        labels = [kd_label(*k) for k in kds]
        cols = ["plan", "MACs ratio", "before (proxy val %)", *labels, *[f"Δ {lb}" for k, lb in zip(kds, labels) if k[0] > 0]]
        lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for plan, p in g.groupby("plan", sort=False):
            base = p[p.kd == kd_label(0, 4)].set_index("seed").test
            cells = [plan, f"{p.macs_ratio.iloc[0]:.3f}", f"{100 * p.proxy.iloc[0]:.2f}"]
            cells += [mean_pm(p[p.kd == lb].test, 100) for lb in labels]
            for k, lb in zip(kds, labels):
                if k[0] > 0:  # paired by seed: the same batch order with and without distillation
                    diff = p[p.kd == lb].set_index("seed").test - base
                    cells.append(mean_pm(diff, 100))
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(ROOT / "search_spaces/digits-resnet20-macs50.yaml"))
    p.add_argument("--budgets", default="0.3,0.15")
    p.add_argument("--plans", default="uniform,lamp,autoprune")
    p.add_argument("--kd", default="0,0.1@4,1@4,4@4,1@1", help="distill weight @ temperature (default 4), 0: CE only")
    p.add_argument("--rungs", default="50,200", help="cumulative recovery steps, scored after each")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/out/recovery-distill"), help="work dir (kept: its _cache)")
    p.add_argument("--md", default=None, help="results file (default: <out>/recovery-distill.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.budgets, args.plans, args.seeds, args.kd = "0.3", "lamp", "0", "0,1@4"
    return args


def main(argv=None) -> Path:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md_path = Path(args.md or out / "recovery-distill.md")
    budgets = [float(b) for b in args.budgets.split(",") if b]
    plans = [m for m in args.plans.split(",") if m]
    kds = parse_kd(args.kd)
    rungs = [int(r) for r in args.rungs.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if bad := [m for m in plans if m not in PLANS]:
        raise SystemExit(f"unknown plans {bad}; choose from {list(PLANS)}")
    cmd = "python benchmarks/recovery_distill.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    started = datetime.now(timezone.utc)
    mach = machine()  # the load average at start

    def log(msg: str) -> None:
        print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {msg}", flush=True)

    rows = []
    for budget in budgets:
        s = session_for(args, budget)
        lr = s.spec.search.recovery_lr or s.spec.train.lr / 10
        unpruned = s.evaluator.score(s.target.model, "test")
        for method in plans:
            t0 = time.perf_counter()
            plan, macs_ratio = plan_for(s, method)
            if plan is None:
                log(f"macs{round(budget * 100)} {method}: no plan met the budget")
                continue
            proxy = s.evaluator(s.pruner.apply(plan, check=False), "val")
            log(f"macs{round(budget * 100)} {method}: plan in {time.perf_counter() - t0:.1f} s, MACs {macs_ratio:.3f}, proxy {proxy:.4f}")
            for distill, temp in kds:
                for seed in seeds:
                    for r in recover(s, plan, rungs=rungs, distill=distill, temperature=temp, seed=seed, lr=lr):
                        rows.append({"budget": budget, "plan": method, "macs_ratio": macs_ratio, "proxy": proxy,
                                     "kd": kd_label(distill, temp), "distill": distill, "temperature": temp,
                                     "seed": seed, "unpruned_test": unpruned, "lr": lr, **r})
                    log(f"  {kd_label(distill, temp)} seed {seed}: " + ", ".join(
                        f"{r['steps']} steps test {r['test']:.4f} ({r['ft_s']:.1f} s)" for r in rows[-len(rungs):]))
                    pd.DataFrame(rows).to_csv(out / "runs.csv", index=False)
    runs = pd.DataFrame(rows)
    finished = datetime.now(timezone.utc)
    tbl = table(runs, kds)
    print(tbl)
    header = [
        f"- command: `{cmd}`",
        f"- machine: {mach}",
        f"- autoprune: git {git_rev(ROOT)}; spec `{Path(args.spec).name}` with `budget.macs` overridden",
        f"- started {started:%Y-%m-%d %H:%M} UTC, finished {finished:%H:%M} UTC "
        f"({(finished - started).total_seconds() / 60:.1f} min)",
        f"- unpruned test accuracy {100 * runs.unpruned_test.iloc[0]:.2f} %; recovery lr {runs.lr.iloc[0]:g} (Adam, "
        f"cosine per rung), batch {s.spec.data.batch_size}, rungs {rungs} (cumulative steps)",
        "- 'CE only': the task's loss (cross-entropy); 'KD w @T t': cross-entropy + w · t² · KL(softmax(teacher/t) ‖ "
        "softmax(student/t)), the teacher being the unpruned model (`train_model(distill=w, distill_temperature=t)`)",
        "- 'Δ ...' = test % with that setting minus CE only, paired by seed (the same batch order)",
        "- fine-tune wall time of the last rung (150 steps), mean: "
        + ", ".join(f"{kd_label(*k)} {runs[(runs.kd == kd_label(*k)) & (runs.steps == rungs[-1])].ft_s.mean():.2f} s" for k in kds),
    ]
    md = [f"# Recovery with distillation from the unpruned model ({started:%Y-%m-%d})", "", *header, "", tbl, ""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(md))
    runs.to_csv(out / "runs.csv", index=False)
    log(f"done: {md_path}")
    return md_path


if __name__ == "__main__":
    main()
