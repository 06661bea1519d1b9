"""Where a trial's time goes: applying the plan (copy + cut), evaluating it (BN recalibration, reconstruction,
the val forward passes), and everything else (proposal, budget projection, storage writes).

    python benchmarks/trial_overhead.py                      # ResNet-20 on digits and all-MiniLM-L6-v2
    python benchmarks/trial_overhead.py --models resnet20 --trials 20 --out /tmp/overhead

Runs a real search per model (sensitivity priors off, so that only trials are timed) and reads each trial's
`prune_s` (apply + cost estimate) and `eval_s` (the evaluator) from the study; "other" is the rest of the trial's
wall time. It also times, inside the evaluator, the model's forward passes and the least-squares reconstruction
(`ForwardClock`), so the strict share, everything but forward passes and reconstruction, is printed too: the
evaluator's own bookkeeping (BN resets, mode switches, the metric) counts as overhead there. The whole loop's share also counts the time between trials (a trial's end written, the progress bar,
the next ask), from the first trial's start to the last one's end. It also times the previous way of applying a
plan (copy, re-trace Torch-Pruning's graph, prune the groups one after another) on the same plans, for the
before/after of issue 16's "a trial costs evaluation and nothing else". A second table splits what a trial spends
outside the forward passes: the sampler's proposal, the budget projection, apply + cost, the record's storage
write, the evaluator's own work and the rest. Prints markdown tables; a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")

import optuna  # noqa: E402

from autoprune import PruningPlan  # noqa: E402
from autoprune.app import api  # noqa: E402
from autoprune.searching.objective import trial_attrs  # noqa: E402
from autoprune.searching.studies import open_storage, storage_url, study_name  # noqa: E402

MODELS = {
    "resnet20": ("search_spaces/digits-resnet20-macs50.yaml", {}),
    "minilm": ("search_spaces/minilm-distill-macs60.yaml",
               {"data.kwargs": {"n_train": 256, "n_val": 128, "n_test": 64, "seq_len": 32},
                "evaluation.max_val_samples": 128}),
}


def legacy_apply_s(pm, plan) -> float:
    """The pre-0.2 apply: copy, trace a new dependency graph, prune group after group (seconds)."""
    t0 = time.perf_counter()
    work = copy.deepcopy(pm.base)
    dg = pm.trace(work)
    for name, idxs in pm.pruned_indices(plan).items():
        root = work.get_submodule(name)
        dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs).prune()
    return time.perf_counter() - t0


class ForwardClock:
    """Times every model forward pass the evaluator makes (BN recalibration, val, a distillation teacher's) and
    the least-squares reconstruction (`evaluation.reconstruct`, the proxy the issue asks for; its own forward
    passes count as reconstruction): `call_model` and `reconstruct_plan`, patched where the evaluator and the
    task look them up. What a trial spends outside both is the issue's "everything but forward/backward"."""

    def __init__(self) -> None:
        # (wall start, s) per kind; "sample", "project" and "record" split what a trial spends outside evaluation
        self.spans: dict[str, list[tuple[float, float]]] = {k: [] for k in ("forward", "reconstruct", "sample",
                                                                             "project", "record")}
        self._depth = 0  # > 0 inside a reconstruction

    def _timed(self, kind: str, fn):
        def timed(*args, **kwargs):
            t0, w0 = time.perf_counter(), time.time()
            self._depth += kind == "reconstruct"
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= kind == "reconstruct"
                if kind == "reconstruct" or not self._depth:
                    self.spans[kind].append((w0, time.perf_counter() - t0))
        return timed

    def __enter__(self) -> "ForwardClock":
        from autoprune.model import task
        from autoprune.pruning import reconstruct
        from autoprune.searching import objective
        from autoprune.sensitivity import evaluate

        fwd = self._timed("forward", task.call_model)  # one wrapper wherever the task and the evaluator look it up
        timed = {  # (owner, name) -> the kind its time counts as
            (task, "call_model"): "forward", (evaluate, "call_model"): "forward",
            (reconstruct, "call_model"): "forward", (reconstruct, "reconstruct_plan"): "reconstruct",
            # the sampler's proposal (Optuna's TPE, through the trial's suggest_float calls), the budget
            # projection, and the trial's record written to the storage
            (objective.Objective, "suggest"): "sample", (objective.Objective, "plan_for"): "project",
            (objective, "record"): "record",
        }
        self._saved = [(owner, n, owner.__dict__[n]) for owner, n in timed]
        for owner, n, orig in self._saved:
            kind = timed[owner, n]
            setattr(owner, n, fwd if kind == "forward" else self._timed(kind, orig))
        return self

    def __exit__(self, *exc) -> None:
        for owner, n, orig in self._saved:
            setattr(owner, n, orig)

    def within(self, kind: str, start: float, end: float) -> float:
        return sum(d for w, d in self.spans[kind] if start <= w <= end)


def run(name: str, trials: int, out: str) -> dict:
    path, over = MODELS[name]
    over = {**over, "output": out, "search.n_trials": trials, "search.priors": "none", "name": f"overhead-{name}"}
    s = api.session(path, over, show_progress=False)
    with ForwardClock() as clock:
        api.search(s, show_progress=False, test=False)
    study = optuna.load_study(storage=open_storage(storage_url(s.spec)), study_name=study_name(s.spec, "optuna"))
    rows = []
    for t in study.trials:
        a = trial_attrs(t)
        if t.datetime_complete is None or "eval_s" not in a:
            continue
        total = (t.datetime_complete - t.datetime_start).total_seconds()
        span = (t.datetime_start.timestamp(), t.datetime_complete.timestamp())
        rows.append((total, a["prune_s"], a["eval_s"], clock.within("forward", *span),
                     clock.within("reconstruct", *span), clock.within("sample", *span),
                     clock.within("project", *span), clock.within("record", *span)))
    done = [t for t in study.trials if t.datetime_complete is not None]
    # the whole loop, the time between trials included (a trial's end written, the progress bar, the next ask)
    loop_s = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    plans = [PruningPlan.from_dict(trial_attrs(t)["plan"]) for t in study.trials if "plan" in trial_attrs(t)][:5]
    legacy = statistics.median(legacy_apply_s(s.pruner, p) for p in plans)
    new = statistics.median(_timed(lambda p=p: s.pruner.apply(p, check=False)) for p in plans)
    tot = statistics.median(r[0] for r in rows)
    prune = statistics.median(r[1] for r in rows)
    ev = statistics.median(r[2] for r in rows)
    # the share a user pays over the whole search: total non-evaluation time over total trial time (a median
    # trial hides the rare slow ones, e.g. a full garbage collection)
    mean_share = 1 - sum(r[2] for r in rows) / sum(r[0] for r in rows)
    fwd_share = 1 - sum(r[3] + r[4] for r in rows) / sum(r[0] for r in rows)
    return {"model": name, "trials": len(rows), "trial_s": tot, "apply_s": prune, "eval_s": ev,
            "forward_s": statistics.median(r[3] for r in rows), "recon_s": statistics.median(r[4] for r in rows),
            "forward_share": fwd_share,
            "other_s": max(tot - prune - ev, 0.0), "legacy_apply_s": legacy, "apply_only_s": new,
            "mean_share": mean_share, "loop_share": 1 - sum(r[2] for r in rows) / loop_s,
            # outside the forward passes, per trial (medians): what each part costs
            "sample_s": statistics.median(r[5] for r in rows), "project_s": statistics.median(r[6] for r in rows),
            "record_s": statistics.median(r[7] for r in rows),
            "evaluator_own_s": statistics.median(r[2] - r[3] - r[4] for r in rows),
            "rest_s": statistics.median(r[0] - r[1] - r[2] - r[5] - r[6] - r[7] for r in rows)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,minilm")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--out", default=None, help="where to make this run's directory (default: the system's temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's); 1 gives "
                    "steady shares while another job holds a core")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # always a new directory: a study left by an earlier run would be resumed, and its trials (timed under
    # other conditions, by other code) would be mixed into this run's medians
    if args.out:
        os.makedirs(args.out, exist_ok=True)  # --out names a parent; this run gets a new directory under it
    out = tempfile.mkdtemp(prefix="autoprune-overhead-", dir=args.out)
    rows = [run(m, args.trials, out) for m in args.models.split(",")]
    print("| model | trials | trial (median) | apply + cost | evaluation | other | non-evaluation share (medians) | "
          "non-evaluation share (all trials' time) | non-evaluation share (the whole loop) | "
          "forward passes (median) | reconstruction (median) | everything but forward passes and reconstruction "
          "(all trials' time) | apply before (copy + re-trace) | apply now |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = (r["trial_s"] - r["eval_s"]) / r["trial_s"]
        print(f"| {r['model']} | {r['trials']} | {r['trial_s'] * 1e3:.1f} ms | {r['apply_s'] * 1e3:.1f} ms | "
              f"{r['eval_s'] * 1e3:.1f} ms | {r['other_s'] * 1e3:.1f} ms | {share:.1%} | {r['mean_share']:.1%} | "
              f"{r['loop_share']:.1%} | {r['forward_s'] * 1e3:.1f} ms | {r['recon_s'] * 1e3:.1f} ms | "
              f"{r['forward_share']:.1%} | "
              f"{r['legacy_apply_s'] * 1e3:.0f} ms | {r['apply_only_s'] * 1e3:.1f} ms |")
    print("\nOutside the forward passes, per trial (medians, ms): the sampler's proposal (TPE, `suggest_float`), the "
          "budget projection, applying the plan with its cost estimate, the record's storage write, the evaluator's "
          "own work (BN resets, mode switches, the metric), and the rest (trial creation, the end written, Optuna's "
          "loop).\n")
    print("| model | sampling | projection | apply + cost | record | evaluator's own work | the rest |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(f"{r[k] * 1e3:.2f}" for k in (
            "sample_s", "project_s", "apply_s", "record_s", "evaluator_own_s", "rest_s")) + " |")


if __name__ == "__main__":
    main()
