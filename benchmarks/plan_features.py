"""What a plan's shape says about how it recovers, read from the committed ten-seed peer benchmark: for every row,
every method's plan on every seed (duplicates dropped), Spearman's rank correlation of the test accuracy after the
common 300-step recovery with the proxy the search ranks by and with features of the plan's widths (kept channels
per group). Also the spread of the default's and LAMP's widths. Reads only the committed CSVs; prints a markdown
table. A benchmark table, not a test.

    python benchmarks/plan_features.py

Why: LAMP's plans on these models keep nearly equal absolute widths in every group (on ResNet-20 at 15 % MACs,
9-10 channels everywhere), while the search's keep wide residual streams and cut inner convolutions to 3-7
channels. The question is whether balance itself predicts recovery, so that a cheap score could use it. The
last columns try the proxy plus a multiple of the balance, chosen by looking at these same rows: exploratory, a
held-out model would have to confirm any weight.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from variants_table import RESULTS, ROWS, _read  # noqa: E402

from autoprune.searching.objective import balance  # noqa: E402  (the search's own measure)


MIXES = (0.1, 0.2)  # an exploratory score: the proxy plus this many times the balance


def features(widths: str) -> dict[str, float]:
    w = np.array(json.loads(widths), dtype=float)
    return {"min_width": w.min(), "balance": balance(w), "harmonic_width": len(w) / np.sum(1.0 / w)}


def main() -> None:
    print("| row | plans | proxy (val before recovery) | narrowest group | balance (minus CV of widths) | "
          "harmonic mean width | parameters | " + " | ".join(f"proxy + {lam:g} x balance" for lam in MIXES)
          + " | CV of widths: default | CV: LAMP |")
    print("|---" * (9 + len(MIXES)) + "|")
    for row, csv, setting, _ in ROWS:
        d = _read(RESULTS / csv)
        d = d[(d.setting == setting) & d.widths.notna() & d.test_ft.notna()].drop_duplicates(["seed", "method", "widths"])
        f = pd.DataFrame([features(w) for w in d.widths], index=d.index)
        d = d.join(f)
        rho = {c: spearmanr(d[c], d.test_ft)[0] for c in ["val_proxy", "min_width", "balance", "harmonic_width",
                                                           "params_ratio"]}
        rho.update({lam: spearmanr(d.val_proxy + lam * d.balance, d.test_ft)[0] for lam in MIXES})
        cv = {m: -d[d.method == m].balance.mean() for m in ("autoprune", "lamp")}
        print(f"| {row} | {len(d)} | " + " | ".join(f"{v:+.2f}" for v in rho.values())
              + f" | {cv['autoprune']:.2f} | {cv['lamp']:.2f} |")


if __name__ == "__main__":
    main()
