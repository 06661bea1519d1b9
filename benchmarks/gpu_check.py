"""On a CUDA machine: latency measured on the GPU, a latency-budget search there, GPU evaluation against the CPU's,
and least-squares reconstruction on the GPU (layer by layer and concurrent). A check run by hand when a GPU is at
hand, not a test (CI has none); prints a markdown report.

    python benchmarks/gpu_check.py --out /tmp/gpu            # needs torch with CUDA
    python benchmarks/gpu_check.py --out /tmp/gpu --device cpu --quick   # the same steps on the CPU (a dry run)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")

import torch  # noqa: E402

from autoprune.app import api  # noqa: E402
from autoprune.costs.latency import measure_model  # noqa: E402
from autoprune.model.task import to_device  # noqa: E402


def say(lines: list[str], text: str = "") -> None:
    print(text, flush=True)
    lines.append(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer trials and plans (a dry run of the script)")
    ap.add_argument("--md", default=None, help="also write the report here")
    ap.add_argument("--no-search", action="store_true", help="skip the latency-budget search (slow on a CPU)")
    ap.add_argument("--batch", type=int, default=32768, help="latency batch size (digits are 8x8: a small batch "
                    "leaves a GPU launch-bound, every plan as fast as the unpruned model)")
    args = ap.parse_args()
    dev = args.device
    out: list[str] = []
    name = torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu"
    say(out, f"# GPU check: device `{dev}` ({name}), torch {torch.__version__}, Python {platform.python_version()}")
    spec = "search_spaces/digits-resnet20-macs50.yaml"
    s_cpu = api.session(spec, {"output": args.out}, show_progress=False)
    pm = s_cpu.pruner

    # 1. latency on the device: the unpruned model, and a uniform 50 % plan, each measured twice
    say(out, f"\n## 1. Latency (median ms after warm-up, CUDA synchronised around each run; batch {args.batch})\n")
    say(out, "| model | 1st | 2nd | p10–p90 of the 2nd | runs |")
    say(out, "|---|---|---|---|---|")
    lat = {}
    pm8 = api.session(spec, {"output": args.out, "pruning.round_to": 8}, show_progress=False).pruner
    for label, model in (("unpruned", pm.base), ("uniform 50 %", pm.apply(pm.uniform_plan(0.5), check=False)),
                         ("uniform 50 %, round_to 8", pm8.apply(pm8.uniform_plan(0.5), check=False))):
        a = measure_model(model, pm.example, dev, None, args.batch)
        b = measure_model(model, pm.example, dev, None, args.batch)
        lat[label] = b.median_ms
        say(out, f"| {label} | {a.median_ms:.3f} | {b.median_ms:.3f} | {b.p10_ms:.3f}–{b.p90_ms:.3f} | {b.runs} |")

    # 2. GPU evaluation against the CPU's on the same plans
    s_dev = api.session(spec, {"output": args.out, "evaluation.device": dev}, show_progress=False)
    plans = [pm.uniform_plan(r) for r in ((0.3, 0.6) if args.quick else (0.2, 0.4, 0.6, 0.8))]
    say(out, "\n## 2. Evaluation (BN recalibration + val accuracy) on the CPU and on the device, same plans\n")
    say(out, "| plan | CPU | device | CPU s | device s |")
    say(out, "|---|---|---|---|---|")
    for p in plans:
        t0 = time.perf_counter()
        c = s_cpu.evaluator(pm.apply(p, check=False))
        t1 = time.perf_counter()
        g = s_dev.evaluator(s_dev.pruner.apply(p, check=False))
        t2 = time.perf_counter()
        say(out, f"| uniform {p.ratios[pm.prunable_names[0]]:.1f} | {c:.4f} | {g:.4f} | {t1 - t0:.3f} | {t2 - t1:.3f} |")

    # 3. a latency-budget search measured on the device
    if not args.no_search:
        latency_search(args, spec, dev, out)
    reconstruction(args, dev, out)
    train_and_finetune(args, spec, dev, out)
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(out) + "\n")


def latency_search(args, spec: str, dev: str, out: list[str]) -> None:
    n = 8 if args.quick else 20
    over = {"output": args.out, "name": f"gpu-latency-{dev}", "evaluation.device": dev, "search.n_trials": n,
            "pruning.round_to": 8, "budget": {"latency": 0.7, "device": dev, "batch_size": args.batch, "threads": None}}
    t0 = time.perf_counter()
    res = api.search(spec, overrides=over, show_progress=False)
    wall = time.perf_counter() - t0
    best = res["best"]
    say(out, f"\n## 3. Latency-budget search on the device (70 % of the unpruned latency, batch {args.batch}, round_to 8, {n} trials)\n")
    say(out, f"- wall {wall:.1f} s; best val {best['metric']:.4f}, test {best.get('metric_test')}, "
             f"MACs ratio {best['macs_ratio']:.3f}")
    b = res["budget"]
    measured = best.get("measured_cost")
    say(out, f"- unpruned latency measured by the search {b['base']:.3f} ms, limit {b['limit']:.3f} ms; the best's "
             f"latency: predicted {best.get('cost'):.3f} ms, re-measured {measured if measured is None else round(measured, 3)} ms; plans "
             f"rejected by the re-measure: {len(res.get('rejected_by_remeasure') or [])}")
    say(out, f"- summary: {best.get('summary')}")


def reconstruction(args, dev: str, out: list[str]) -> None:
    """4. reconstruction on the device: layer by layer against concurrent (forced), on a ViT from its config."""
    from autoprune.pruning import reconstruct as R

    s_vit = api.session("search_spaces/vit-digits-macs50.yaml",
                        {"output": args.out, "evaluation.device": dev, "evaluation.reconstruct": True},
                        show_progress=False)
    vpm, vev = s_vit.pruner, s_vit.evaluator
    plan = vpm.uniform_plan(0.4)
    base_dev = copy.deepcopy(vpm.base).to(dev)  # the pruner's own base stays where it is
    batches = [(to_device(x, dev), y) for x, y in vev.calibration]
    models, times = {}, {}
    for mode, round_s in (("layer by layer", float("inf")), ("concurrent", 0.0)):
        R.CONCURRENT_ROUND_S = round_s
        ts = []
        for _ in range(1 if args.quick else 3):
            m = vpm.apply(plan, check=False).to(dev)
            t0 = time.perf_counter()
            rep = R.reconstruct(m, base_dev, batches, R.kept_outputs(vpm, plan))
            if dev == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        models[mode], times[mode] = m, statistics.median(ts)
    R.CONCURRENT_ROUND_S = 0.005
    diff = max((a - b).abs().max().item() / (a.abs().max().item() + 1e-12)
               for a, b in zip(models["layer by layer"].state_dict().values(), models["concurrent"].state_dict().values())
               if a.is_floating_point())
    say(out, "\n## 4. Reconstruction on the device (ViT from its config, uniform 40 %)\n")
    say(out, f"- layers refit: {rep.count}, skipped: {len(rep.skipped)}")
    say(out, f"- layer by layer {times['layer by layer']:.3f} s, concurrent {times['concurrent']:.3f} s (median)")
    say(out, f"- max relative weight difference between the two: {diff:.2e}")
    say(out, f"- evaluator (reconstruct + BN + val) on the device: {vev(vpm.apply(plan, check=False)):.4f}")



def train_and_finetune(args, spec: str, dev: str, out: list[str]) -> None:
    """5. the spec's training and `autoprune finetune` on the device (`evaluation.device`), in a new run directory."""
    over = {"output": os.path.join(args.out, f"train-{dev}"), "evaluation.device": dev, "search.n_trials": 5,
            "search.priors": "none"}
    t0 = time.perf_counter()
    s = api.session(spec, over, show_progress=False)
    baseline = s.baseline_metric
    t1 = time.perf_counter()
    api.search(s, show_progress=False, test=False)
    t2 = time.perf_counter()
    ft = api.finetune(s.spec, steps=300, show_progress=False)
    t3 = time.perf_counter()
    from autoprune.exporting.files import load_pruned

    where = sorted({p.device.type for p in load_pruned(ft["out"]).parameters()})
    say(out, "\n## 5. The spec's training and the fine-tune on the device\n")
    say(out, f"- training (30 epochs) + the session: {t1 - t0:.1f} s; unpruned val {baseline:.4f}")
    say(out, f"- 5-trial search {t2 - t1:.1f} s; `finetune` (300 steps) {t3 - t2:.1f} s: {ft['metrics']}")
    say(out, f"- the exported model loads with its parameters on: {where}")


if __name__ == "__main__":
    main()
