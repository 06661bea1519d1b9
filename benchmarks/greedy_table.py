"""The sensitivity-greedy warm start built from a full sensitivity sweep and from the table that
`sensitivity.skip_insensitive` leaves (each group within `search.tolerance` at its largest ratio keeps only that
row), each plan scored once by the spec's proxy. Why the option ships off: see
`benchmarks/results/peers-rx-skip-2026-11-26.md`.

    python benchmarks/greedy_table.py search_spaces/minilm-distill-macs60.yaml
    python benchmarks/greedy_table.py SPEC --budget 0.6 --table runs/_cache/sensitivity/sensitivity-KEY.csv

Without --table the full sweep is run (or read from the spec's cache). Prints a markdown table; a benchmark, not a
test.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from autoprune.app import api  # noqa: E402
from autoprune.costs.budgets import Budget  # noqa: E402
from autoprune.searching.space import SearchSpace  # noqa: E402


def tables(full: pd.DataFrame, tol: float) -> dict[str, pd.DataFrame]:
    """The full table, what skip_insensitive keeps, that with the skipped ratios filled in linearly from the
    largest one, and the insensitive groups' two largest ratios only."""
    top = full.ratio.max()
    ratios = sorted(full.ratio.unique())
    skip, line, two, quad = [], [], [], []
    for _, rows in full.groupby("group", sort=False):
        at_top = rows[rows.ratio == top]
        if len(at_top) and at_top["drop"].iloc[0] <= tol:  # insensitive
            skip.append(at_top)
            two.append(rows[rows.ratio >= ratios[-2]] if len(ratios) > 1 else at_top)
            for r in ratios[:-1]:
                row = at_top.copy()
                row["ratio"], row["drop"] = r, float(at_top["drop"].iloc[0]) * r / top
                line.append(row)
                row = at_top.copy()
                row["ratio"], row["drop"] = r, max(float(at_top["drop"].iloc[0]), 0.0) * (r / top) ** 2
                quad.append(row)
            line.append(at_top)
            quad.append(at_top)
        else:
            skip.append(rows)
            two.append(rows)
            line.append(rows)
            quad.append(rows)
    return {"full sweep": full, "skip_insensitive": pd.concat(skip), "skipped ratios filled in linearly": pd.concat(line),
            "insensitive groups: two largest ratios": pd.concat(two),
            "skipped ratios filled in quadratically": pd.concat(quad)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("--budget", type=float, default=None, help="MACs fraction (default: the spec's)")
    p.add_argument("--table", default=None, help="a full sensitivity table (CSV) of this model and spec")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    over = {"sensitivity.skip_insensitive": False}
    if a.budget is not None:
        over["budget"] = {"macs": a.budget}
    s = api.session(a.spec, over, show_progress=False)
    full = pd.read_csv(a.table) if a.table else s.sensitivity().table
    tol = s.spec.search.tolerance
    budget = Budget.from_spec(s.spec, s.pruner, s.cost_model)
    print(f"{a.spec}, budget {budget.kind} {budget.limit / budget.base:.2f}, tolerance {tol}\n")
    print("| sensitivity table | rows | greedy plan's proxy | MACs ratio | evaluation s |")
    print("|---|---|---|---|---|")
    for name, tab in tables(full, tol).items():
        plan = SearchSpace.build(s.pruner, budget, tab, tol).greedy(tab)
        t0 = time.perf_counter()
        value = s.evaluator(s.pruner.apply(plan))
        print(f"| {name} | {len(tab)} | {value:.4f} | {budget.estimate(plan) / budget.base:.3f} | "
              f"{time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
