"""Every method of one or more `peers.py` runs against one reference method (FastNAS by default): test metric after
the common recovery (mean ± std over seeds), search wall time, and the difference to the reference in test pp with
its 95 % interval over test images, paired by image and seed (`peers.paired_delta`; with `--split-per-seed` runs,
each seed's own test images). A benchmark table, not a test.

    python benchmarks/peer_deltas.py benchmarks/results/peers-10splits-resnext20-macs30-2026-11-27.csv \\
        benchmarks/results/peers-10splits-resnext20-macs50-2026-11-27.csv --ref fastnas

Only seeds that both a method and the reference finished enter its difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import ALL_METHODS, paired_delta  # noqa: E402


def table(runs: pd.DataFrame, ref: str) -> str:
    lines = [f"| MACs | method | test % after the common recovery | search wall s | − {ref}, pp [95 % CI] | seeds |",
             "|---|---|---|---|---|---|"]
    for setting, g in runs.groupby("setting", sort=False):
        g = g[g.test_ft.notna()]
        r = g[g.method == ref]
        for method in [m for m in ALL_METHODS if m in set(g.method)]:
            m = g[g.method == method]
            v = 100 * m.test_ft
            d = None if method == ref or r.empty else paired_delta(m, r)
            lines.append(f"| {setting[4:]} % | {method} | {v.mean():.2f} ± {v.std():.2f} | "
                         f"{m.search_wall_s.mean():.1f} | "
                         + ("–" if d is None else f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]") + f" | {len(m)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="+", help="peers.py runs.csv files (or the committed copies)")
    p.add_argument("--ref", default="fastnas", help="the method every other is compared with")
    a = p.parse_args(argv)
    runs = pd.concat([pd.read_csv(c, dtype={"test_correct": str}) for c in a.csv], ignore_index=True)
    dup = runs[runs.duplicated(["setting", "method", "seed"], keep=False)]
    if not dup.empty:  # a paired difference needs one run per method, setting and seed
        r = dup.iloc[0]
        raise SystemExit(f"{r.method} at {r.setting}, seed {r.seed} is in more than one of the files: pass files "
                         "whose methods do not overlap")
    print(table(runs, a.ref))


if __name__ == "__main__":
    main()
