"""Projection vs constraint budget handling: best feasible val metric after N trials, several seeds.

    python benchmarks/budget_mode.py [--n-trials 40] [--seeds 0 1 2] [--out /tmp/budget_mode]

Each (model, mode, seed) is a fresh study in a temporary output root; the trained checkpoint and the
sensitivity table are cached there and shared by all runs of a model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")

from autoprune.app import api  # noqa: E402
from autoprune.searching.study import run_search  # noqa: E402
from autoprune.app.session import Session  # noqa: E402
from autoprune.spec import load_spec  # noqa: E402

MODELS = {
    "cnn1d": {"model": {"factory": "autoprune.model.zoo:cnn1d", "input_shape": [1, 40]},
              "data": {"factory": "autoprune.model.data:mnist1d", "kwargs": {"num_samples": 4000}, "batch_size": 128},
              "train": {"epochs": 10, "lr": 0.01}},
    "resnet20": {"model": {"factory": "autoprune.model.zoo:resnet20", "input_shape": [1, 8, 8]},
                 "data": {"factory": "autoprune.model.data:digits", "batch_size": 64},
                 "train": {"epochs": 15, "lr": 0.01}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-trials", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--out", default="/tmp/budget_mode")
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for seed in args.seeds:
            for mode in ("projection", "constraint"):
                spec = {**MODELS[model], "name": f"{model}-{mode}-s{seed}", "output": args.out,
                        "budget": {"macs": args.budget},
                        "search": {"n_trials": args.n_trials, "budget_mode": mode, "seed": seed},
                        "evaluation": {"calibration_batches": 8}}
                s = Session(load_spec(spec), show_progress=False)
                t0 = time.perf_counter()
                run = run_search(s, show_progress=False)
                df = api.load(s.run_dir).trials if False else None  # noqa: F841
                from autoprune.results.tables import trials_frame

                tf = trials_frame(run.study)
                ok = tf[(tf.state == "COMPLETE") & tf.feasible]
                row = {"model": model, "mode": mode, "seed": seed, "best_val": float(ok.metric.max()) if len(ok) else None,
                       "feasible": int(len(ok)), "complete": int((tf.state == "COMPLETE").sum()),
                       "wall_s": round(time.perf_counter() - t0, 1),
                       "prune_s_med": float(tf.prune_s.median()), "eval_s_med": float(tf.eval_s.median()),
                       "trial_s_med": float(tf.duration_s.median())}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\nsummary (mean best feasible val over seeds):")
    for model in args.models:
        for mode in ("projection", "constraint"):
            v = [r["best_val"] for r in rows if r["model"] == model and r["mode"] == mode and r["best_val"] is not None]
            f = [r["feasible"] for r in rows if r["model"] == model and r["mode"] == mode]
            print(f"{model:9s} {mode:10s} best_val mean {statistics.mean(v) if v else float('nan'):.4f} "
                  f"per seed {[round(x, 4) for x in v]} feasible trials {f}")


if __name__ == "__main__":
    main()
