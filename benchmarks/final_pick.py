"""Would picking the final plan by the val loss help? The default search's trials as they are (read from a
`benchmarks/peers.py --methods autoprune` run's studies), each completed plan re-scored for its val loss after the
same preparation; the plan with the highest val accuracy (the first of ties) and the one with the lowest val loss,
each recovered with peers.py's common recovery (300 Adam steps, lr 1e-3) and tested.

    python benchmarks/peers.py --budgets 0.5,0.3,0.15 --seeds 0,1,2 --methods autoprune --out OUT
    python benchmarks/final_pick.py search_spaces/digits-resnet20-macs50.yaml OUT 0.5,0.3,0.15

Writes OUT-lossfinal.csv and prints a line per seed; an experiment, not a test. Results:
benchmarks/results/final-pick-2026-11-26.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers

import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import peers  # noqa: E402
from autoprune import PruningPlan  # noqa: E402
from autoprune.searching.objective import trial_attrs  # noqa: E402
from autoprune.searching.studies import open_storage  # noqa: E402


def candidates(s, journal: Path) -> list[tuple[int, float, float, float, PruningPlan]]:
    """(trial number, value, val accuracy, val loss, plan) of every completed, feasible trial."""
    storage = open_storage(str(journal))
    study = optuna.load_study(study_name=None, storage=storage)
    out = []
    for t in study.trials:
        a = trial_attrs(t)
        if t.state != optuna.trial.TrialState.COMPLETE or not a.get("feasible", True) or "plan" not in a:
            continue
        plan = PruningPlan.from_dict(a["plan"])
        acc, loss = s.evaluator.with_loss(s.pruner.apply(plan, check=False), plan=plan, pruner=s.pruner)
        out.append((t.number, t.values[0], acc, loss, plan))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("out", help="the peers.py --out directory of a --methods autoprune run")
    p.add_argument("budgets", help="MACs fractions, as given to peers.py")
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    args = peers.parse(["--spec", a.spec, "--budgets", a.budgets, "--seeds", a.seeds, "--out", a.out])
    rows = []
    for token in a.budgets.split(","):
        budget = peers.parse_budget(token)
        setting = peers.setting_of(budget)
        for seed in (int(x) for x in a.seeds.split(",")):
            s = peers.session_for(args, budget, seed, "autoprune")
            cand = candidates(s, Path(a.out) / f"runs-{setting}" / f"peers-{setting}-s{seed}-autoprune" / "study.journal")
            by_acc = max(cand, key=lambda c: c[1])  # the first of tied trials
            by_loss = min(cand, key=lambda c: c[3])
            tested = {}
            for name, c in (("acc", by_acc), ("loss", by_loss)):
                if c[0] in tested:
                    tested[name] = tested[c[0]]
                    continue
                m = peers.recover(s.pruner.apply(c[4]), s.target.datasets["train"], steps=300, lr=1e-3,
                                  batch_size=s.spec.data.batch_size, seed=seed, task=s.evaluator.task,
                                  teacher=s.target.model)
                tested[name] = tested[c[0]] = float(s.evaluator.score(m, "test"))
            row = dict(budget=token, seed=seed, acc_trial=by_acc[0], acc_test=tested["acc"], loss_trial=by_loss[0],
                       loss_val_acc=by_loss[2], loss_test=tested["loss"])
            print(row, flush=True)
            rows.append(row)
    d = pd.DataFrame(rows)
    print(d.groupby("budget", sort=False)[["acc_test", "loss_test"]].agg(["mean", "std"]).round(4).to_string())
    d.to_csv(f"{a.out}-lossfinal.csv", index=False)


if __name__ == "__main__":
    main()
