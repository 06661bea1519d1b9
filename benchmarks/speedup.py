"""Does structured pruning make the model faster on this CPU? Unpruned vs uniform plans at 50 % and 30 % MACs.

    python benchmarks/speedup.py [--models resnet20 mobilenetv2 ...] [--threads 1]

Prints median latency (ms) at batch 1 and 64, measured interleaved in one process (timing on shared machines
drifts between processes). Not a test: run it by hand.
"""

from __future__ import annotations

import argparse

import torch

from autoprune.costs.counting import CostModel, count_macs, measure_latency
from autoprune.pruning.groups import PrunableModel
from autoprune.searching.space import Budget, SearchSpace
from autoprune.model.zoo import ZOO

SHAPES = {"cnn1d": (1, 40), "resnet1d": (1, 40), "digits_cnn": (1, 8, 8), "resnet20": (1, 32, 32), "resnext20": (1, 32, 32), "mobilenetv2": (1, 32, 32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2", "resnet1d"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = ZOO[name]().eval()
        example = torch.randn(1, *SHAPES[name])
        pm = PrunableModel(model, example)
        cm = CostModel(pm)
        models = {"unpruned": model}
        for frac in (0.5, 0.3):
            budget = Budget("macs", frac, frac * cm.base_macs, cm.base_macs, lambda p: cm.estimate(p)[0],
                            lambda m: count_macs(m, example))
            plan = SearchSpace.build(pm, budget, None, 0.05).uniform()
            models[f"{int(frac * 100)}% MACs"] = pm.apply(plan)
        for batch in (1, 64):
            x = torch.randn(batch, *SHAPES[name])
            base = None
            for label, m in models.items():
                st = measure_latency(m, x, threads=args.threads, time_budget_s=3.0)
                base = base or st.median_ms
                rows.append((name, batch, label, count_macs(m, example) / cm.base_macs, st.median_ms, base / st.median_ms))
    print(f"{'model':<12} {'batch':>5} {'plan':<10} {'MACs':>6} {'median ms':>10} {'speed-up':>9}")
    for r in rows:
        print(f"{r[0]:<12} {r[1]:>5} {r[2]:<10} {r[3]:>6.2f} {r[4]:>10.3f} {r[5]:>8.2f}x")


if __name__ == "__main__":
    main()
