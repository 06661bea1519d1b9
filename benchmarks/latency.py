"""Latency benchmark: per zoo model, unpruned vs pruned latency at 50 % MACs (uniform plan), the lookup
table's predictor error on random plans (median, p90) and its build time.

    python benchmarks/latency.py [--device cpu|cuda] [--batch-size 1] [--round-to 8] [--models cnn1d,...]
"""

from __future__ import annotations

import argparse

import torch

from autoprune.model import zoo
from autoprune.costs.counting import CostModel
from autoprune.pruning.groups import PrunableModel
from autoprune.costs.latency import build_table, measure_model

SHAPES = {"cnn1d": [1, 40], "resnet1d": [1, 40], "digits_cnn": [1, 8, 8], "resnet20": [1, 8, 8], "resnext20": [1, 8, 8], "mobilenetv2": [1, 8, 8]}


def uniform_at_macs(pm: PrunableModel, cm: CostModel, frac: float):
    lo, hi = 0.0, pm.max_ratio
    for _ in range(30):
        mid = (lo + hi) / 2
        if cm.estimate(pm.uniform_plan(mid))[0] <= frac * cm.base_macs:
            hi = mid
        else:
            lo = mid
    return pm.uniform_plan(hi)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--models", default=",".join(SHAPES))
    a = ap.parse_args()
    print(f"device={a.device} batch={a.batch_size} threads={a.threads} round_to={a.round_to}")
    print(f"{'model':12} {'unpruned ms':>11} {'50%MACs ms':>10} {'speed-up':>8} {'err med':>7} {'err p90':>7} {'build s':>7}")
    for name in a.models.split(","):
        torch.manual_seed(0)
        pm = PrunableModel(zoo.ZOO[name](), torch.zeros(1, *SHAPES[name]), round_to=a.round_to)
        cm = CostModel(pm)
        plan = uniform_at_macs(pm, cm, 0.5)
        t = build_table(pm, device=a.device, threads=a.threads, batch_size=a.batch_size)
        full = measure_model(pm.base, pm.example, a.device, a.threads, a.batch_size).median_ms
        half = measure_model(pm.apply(plan), pm.example, a.device, a.threads, a.batch_size).median_ms
        print(f"{name:12} {full:11.4f} {half:10.4f} {full / half:7.2f}x {t.median_error:7.1%} {t.p90_error:7.1%} {t.build_s:7.1f}",
              flush=True)


if __name__ == "__main__":
    main()
