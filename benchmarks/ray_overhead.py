"""Ray Tune backend overhead vs the in-process Optuna loop, and trials/minute with 1 and 2 concurrent trials.

    python benchmarks/ray_overhead.py [--trials 60] [--real-trials 40] [--finetune-steps 30] [--out ray_overhead.json]

1. Overhead: the same spec (MNIST-1D CNN, 4 groups, TPE, journal storage) searched by both backends with a
   no-op evaluation (the evaluator returns a constant; pruning the copy and costing the plan still run, in
   both): overhead/trial = Ray's time per trial - Optuna's.
   Per-trial times are steady-state (from the trials' completion times in the study); Ray's fixed cost per
   search (starting actors, which import torch, and Tune's set-up) is reported separately.
2. Throughput: a real search (BN recalibration + val accuracy per trial; then again with a short fine-tune
   per trial) on the ray backend with max_concurrent_trials 1 and 2 (1 CPU, one torch thread each), and the
   in-process backend (torch's default threads) for reference.

`ray.init` (2-4 s) is paid once, before any timing. Everything runs in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from autoprune.app import api  # noqa: E402
from autoprune.searching.study import run_search  # noqa: E402

BASE = {
    "model": {"factory": "autoprune.model.zoo:cnn1d", "input_shape": [1, 40]},
    "data": {"factory": "autoprune.model.data:mnist1d", "kwargs": {"num_samples": 3000}, "batch_size": 128},
    "train": {"epochs": 6, "lr": 0.01},
    "budget": {"macs": 0.5},
    "evaluation": {"calibration_batches": 4},
}
_n = 0


def session(root: str, backend: str, *, concurrent: int = 1, noop: bool = False, finetune_steps: int = 0):
    global _n
    _n += 1
    spec = {**BASE, "evaluation": {**BASE["evaluation"], "finetune_steps": finetune_steps}, "name": f"bench-{backend}-{concurrent}-{'noop' if noop else 'real'}-{_n}", "output": root,
            "search": {"backend": backend, "priors": "none", "max_concurrent_trials": concurrent,
                       "cpus_per_trial": 1, "sampler": "tpe"}}
    s = api.session(spec, show_progress=False)
    s.cost_model  # build model, groups and costs outside the timed region
    if noop:
        s.__dict__["evaluator"] = _NoOp(s.evaluator)
    return s


class _NoOp:
    """An evaluator that scores every candidate 0.5 without touching data (picklable for Ray)."""

    def __init__(self, real):
        self.metric_name = real.metric_name

    def __call__(self, model, split: str = "val") -> float:
        return 0.5


def timed(s, n: int) -> tuple[float, float]:
    """(wall seconds of the whole search, steady-state seconds per trial).

    The steady state comes from the trials' own completion times in the study: the span from the first
    to the last completion divided by the trials in between, which leaves out start-up and tear-down."""
    from optuna.trial import TrialState

    t0 = time.perf_counter()
    run = run_search(s, n_trials=n, show_progress=False)
    wall = time.perf_counter() - t0
    assert run.n_complete >= n, (run.n_complete, n)
    ends = sorted(t.datetime_complete for t in run.study.trials if t.state == TrialState.COMPLETE)
    steady = (ends[-1] - ends[0]).total_seconds() / max(len(ends) - 1, 1)
    return wall, steady


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=60, help="no-op trials for the overhead measurement")
    ap.add_argument("--real-trials", type=int, default=40, help="real trials for the throughput measurement")
    ap.add_argument("--finetune-steps", type=int, default=30,
                    help="a heavier evaluation (short fine-tune per trial) for a second throughput run")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here too")
    args = ap.parse_args()

    from autoprune.searching.ray_backend import init_ray

    root = tempfile.mkdtemp(prefix="ray-overhead-")
    session(root, "optuna").target  # train (cached) once
    t0 = time.perf_counter()
    init_ray(num_cpus=2)
    ray_init_s = time.perf_counter() - t0

    n = args.trials
    optuna_wall, optuna_steady = timed(session(root, "optuna", noop=True), n)
    ray_wall, ray_steady = timed(session(root, "ray", noop=True), n)
    out = {
        "machine": f"{os.cpu_count()} CPUs (shared)",
        "ray_init_s": round(ray_init_s, 2),
        "noop": {
            "trials": n,
            "optuna_ms_per_trial": round(1000 * optuna_steady, 1),
            "ray_ms_per_trial": round(1000 * ray_steady, 1),
            "overhead_ms_per_trial": round(1000 * (ray_steady - optuna_steady), 1),
            "optuna_wall_s": round(optuna_wall, 2),
            "ray_wall_s": round(ray_wall, 2),
            "ray_fixed_s": round(ray_wall - n * ray_steady, 2),  # actor start-up (imports torch), Tune set-up
        },
    }
    print(json.dumps(out, indent=2), flush=True)

    m = args.real_trials
    for key, ft in (("real", 0), (f"real_finetune{args.finetune_steps}", args.finetune_steps)):
        real = {"trials": m, "finetune_steps": ft}
        runs = [("optuna_in_process", session(root, "optuna", finetune_steps=ft))]
        runs += [(f"ray_{c}_concurrent", session(root, "ray", concurrent=c, finetune_steps=ft)) for c in (1, 2)]
        for label, s in runs:
            w, steady = timed(s, m)
            real[label] = {"wall_s": round(w, 1), "trials_per_min": round(60 * m / w, 1),
                           "steady_trials_per_min": round(60 / steady, 1) if steady > 0 else None}
        out[key] = real
        print(json.dumps({key: real}, indent=2), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    ok = out["noop"]["overhead_ms_per_trial"] < 200
    print(f"overhead per trial {out['noop']['overhead_ms_per_trial']} ms: {'OK' if ok else 'OVER'} the 200 ms target")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
