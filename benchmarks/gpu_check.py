"""On a CUDA machine: latency measured on the GPU, a latency-budget search there, GPU evaluation against the CPU's,
and least-squares reconstruction on the GPU (layer by layer and concurrent). A check run by hand when a GPU is at
hand, not a test (CI has none); prints a markdown report.

    python benchmarks/gpu_check.py --out /tmp/gpu            # needs torch with CUDA
    python benchmarks/gpu_check.py --out /tmp/gpu --device cpu --quick   # the same steps on the CPU (a dry run)
    python benchmarks/gpu_check.py --out /tmp/gpu --sections 6,7         # transformers models only

Sections 6 and 7 need the hf extra: 6 is all-MiniLM-L6-v2 on the device (latency, evaluation against the CPU's, a
latency-budget search, the recovery and its export), 7 decoders with cut heads (grouped and multi-query attention,
ALiBi, a fused multi-query projection, T5) run and `generate` on the device as on the CPU, and a Llama-shaped
decoder's latency there.
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
    ap.add_argument("--no-search", action="store_true", help="skip the latency-budget searches (slow on a CPU)")
    ap.add_argument("--sections", default="1,2,3,4,5,6,7", help="which sections to run (6 and 7 need transformers)")
    ap.add_argument("--hf-batch", type=int, default=256, help="section 6's latency batch (sentences of 32 tokens)")
    ap.add_argument("--batch", type=int, default=32768, help="latency batch size (digits are 8x8: a small batch "
                    "leaves a GPU launch-bound, every plan as fast as the unpruned model)")
    args = ap.parse_args()
    dev = args.device
    out: list[str] = []
    name = torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu"
    say(out, f"# GPU check: device `{dev}` ({name}), torch {torch.__version__}, Python {platform.python_version()}")
    if dev.startswith("cuda"):  # float32 as on the CPU, so that outputs compare
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    sections = {int(x) for x in args.sections.split(",")}
    if sections & {1, 2, 3, 4, 5}:
        cnn_sections(args, dev, sections, out)
    if 6 in sections:
        minilm_on_device(args, dev, out)
    if 7 in sections:
        decoders_on_device(args, dev, out)
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(out) + "\n")


def cnn_sections(args, dev: str, sections: set[int], out: list[str]) -> None:
    """Sections 1-5 on ResNet-20 (digits) and a ViT from its config."""
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
    if 3 in sections and not args.no_search:
        latency_search(args, spec, dev, out)
    if 4 in sections:
        reconstruction(args, dev, out)
    if 5 in sections:
        train_and_finetune(args, spec, dev, out)


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


def minilm_on_device(args, dev: str, out: list[str]) -> None:
    """6. all-MiniLM-L6-v2 (a `transformers` BertModel, distillation task) on the device: whole-model latency
    of the unpruned model and of a uniform cut, the evaluator (reconstruction + cosine to the unpruned embeddings)
    on the device against the CPU's, a latency-budget search measured there, and the recovery with its export."""
    from autoprune.exporting.files import load_pruned

    macs = "search_spaces/minilm-distill-macs60.yaml"
    quick = {"data.kwargs": {"n_train": 256, "n_val": 64, "n_test": 64, "seq_len": 32}} if args.quick else {}
    s_cpu = api.session(macs, {"output": args.out, **quick}, show_progress=False)
    s_dev = api.session(macs, {"output": args.out, "evaluation.device": dev, **quick}, show_progress=False)
    pm = s_cpu.pruner
    say(out, f"\n## 6. all-MiniLM-L6-v2 on the device\n")
    say(out, f"Latency (median ms after warm-up; batch {args.hf_batch} sentences of 32 tokens; round_to 32 keeps whole "
             "heads):\n")
    say(out, "| model | params | 1st | 2nd | p10–p90 of the 2nd | runs |")
    say(out, "|---|---|---|---|---|---|")
    for label, ratio in (("unpruned", 0.0), ("uniform 30 %", 0.3), ("uniform 50 %", 0.5)):
        model = pm.apply(pm.uniform_plan(ratio), check=False) if ratio else pm.base
        a = measure_model(model, pm.example, dev, None, args.hf_batch)
        b = measure_model(model, pm.example, dev, None, args.hf_batch)
        n = sum(p.numel() for p in model.parameters())
        say(out, f"| {label} | {n / 1e6:.1f} M | {a.median_ms:.3f} | {b.median_ms:.3f} | {b.p10_ms:.3f}–{b.p90_ms:.3f} "
                 f"| {b.runs} |")
    say(out, "\nEvaluation (least-squares reconstruction + cosine to the unpruned embeddings on val), same plans:\n")
    say(out, "| plan | CPU | device | CPU s | device s |")
    say(out, "|---|---|---|---|---|")
    for r in (0.3, 0.5):
        t0 = time.perf_counter()
        c = s_cpu.evaluator(pm.apply(pm.uniform_plan(r), check=False))
        t1 = time.perf_counter()
        g = s_dev.evaluator(s_dev.pruner.apply(s_dev.pruner.uniform_plan(r), check=False))
        t2 = time.perf_counter()
        say(out, f"| uniform {r:.1f} | {c:.5f} | {g:.5f} | {t1 - t0:.2f} | {t2 - t1:.2f} |")
    if args.no_search:
        return
    n = 6 if args.quick else 16
    over = {"output": args.out, "name": f"gpu-minilm-{dev}", "evaluation.device": dev, "search.n_trials": n, **quick,
            "budget": {"latency": 0.7, "device": dev, "batch_size": args.hf_batch, "threads": None}}
    t0 = time.perf_counter()
    s = api.session("search_spaces/minilm-distill-lat.yaml", over, show_progress=False)
    res = api.search(s, show_progress=False)
    t1 = time.perf_counter()
    best, b = res["best"], res["budget"]
    measured = best.get("measured_cost")
    say(out, f"\nLatency-budget search on the device (70 % of the unpruned latency, batch {args.hf_batch}, {n} "
             "trials):\n")
    say(out, f"- wall {t1 - t0:.1f} s (the latency table included); best val cosine {best['metric']:.4f}, test "
             f"{best.get('metric_test')}, MACs ratio {best['macs_ratio']:.3f}")
    say(out, f"- unpruned latency measured by the search {b['base']:.3f} ms, limit {b['limit']:.3f} ms; the best's: "
             f"predicted {best.get('cost'):.3f} ms, re-measured {measured if measured is None else round(measured, 3)} "
             f"ms; plans rejected by the re-measure: {len(res.get('rejected_by_remeasure') or [])}")
    say(out, f"- summary: {best.get('summary')}")
    steps = 50 if args.quick else 200
    t0 = time.perf_counter()
    ft = api.finetune(s, steps=steps, show_progress=False)
    t1 = time.perf_counter()
    back = load_pruned(ft["out"]).eval()
    where = sorted({p.device.type for p in back.parameters()})
    # the exported model scored on the CPU, as it is (no reconstruction: it is the fine-tuned model)
    plain = api.session(macs, {"output": args.out, "evaluation.reconstruct": False, **quick}, show_progress=False)
    again = plain.evaluator(back)
    say(out, f"- `finetune` ({steps} steps, distillation) on the device: {t1 - t0:.1f} s: {ft['metrics']}")
    say(out, f"- the export loads with its parameters on {where}; its val cosine on the CPU {again:.4f}")


def _decoders() -> dict:
    """Small decoders from their configs (random weights) whose heads autoprune cuts in different ways."""
    import transformers as T

    d = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, head_dim=8)
    return {
        "Llama, grouped-query (4 heads, 2 key/value)": lambda: T.LlamaForCausalLM(T.LlamaConfig(**d, num_key_value_heads=2)),
        "Gemma-3, multi-query, sliding window 4": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
            **d, num_key_value_heads=1, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
        "BLOOM (ALiBi)": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4)),
        "GPTBigCode, fused multi-query": lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True)),
        "T5 (cross-attention)": lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)),
    }


def decoders_on_device(args, dev: str, out: list[str]) -> None:
    """7. decoders with cut heads on the device: logits against the CPU's, greedy `generate` (with its key/value
    cache) against the CPU's tokens, and a save_pretrained reload run there; then a Llama-shaped decoder's latency
    on the device, unpruned and with half its heads and neurons cut."""
    import tempfile

    import transformers as T

    from autoprune.exporting import hf as hfexport
    from autoprune.pruning.groups import PrunableModel

    T.logging.set_verbosity_error()
    T.utils.logging.disable_progress_bar()
    say(out, "\n## 7. Decoders with cut heads on the device (every group at 0.5)\n")
    say(out, "| model | heads cut | max abs logit difference, device vs CPU | generate: same tokens as the CPU | "
             "reloaded on the device: same tokens |")
    say(out, "|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 100, (2, 6), generator=g)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    for label, build in _decoders().items():
        torch.manual_seed(0)
        model = build().eval()
        s2s = model.config.is_encoder_decoder
        example = {"input_ids": prompt[:1], **({"decoder_input_ids": prompt[:1, :3]} if s2s else {})}
        pm = PrunableModel(model, example)
        heads = [x.name for x in pm.groups if x.prunable and pm.kind(x).startswith("attention heads")]
        small = pm.apply(pm.plan({n: 0.5 for n in pm.prunable_names}))
        x = {"input_ids": prompt, **({"decoder_input_ids": prompt[:, :3]} if s2s else {})}
        with torch.no_grad():
            cpu_logits, cpu_tokens = small(**x).logits, small.generate(prompt, **kw)
            on = copy.deepcopy(small).to(dev)
            dev_logits = on(**to_device(x, dev)).logits.cpu()
            dev_tokens = on.generate(prompt.to(dev), **kw).cpu()
        with tempfile.TemporaryDirectory() as tmp:
            hfexport.save_pretrained(small, tmp)
            auto = T.AutoModelForSeq2SeqLM if s2s else T.AutoModelForCausalLM
            back = auto.from_pretrained(tmp, trust_remote_code=True).eval().to(dev)
            with torch.no_grad():
                back_tokens = back.generate(prompt.to(dev), **kw).cpu()
        diff = (cpu_logits - dev_logits).abs().max().item()
        say(out, f"| {label} | {len(heads)} groups | {diff:.1e} | {torch.equal(cpu_tokens, dev_tokens)} | "
                 f"{torch.equal(cpu_tokens, back_tokens)} |")
    # a Llama-shaped decoder of some size: latency of the prompt's forward pass and of generating 32 tokens
    conf = T.LlamaConfig(vocab_size=8192, hidden_size=512 if args.quick else 1024, intermediate_size=2816,
                         num_hidden_layers=4 if args.quick else 8, num_attention_heads=16, num_key_value_heads=4,
                         max_position_embeddings=512)
    torch.manual_seed(0)
    ids = torch.randint(1, 8192, (1, 128), generator=g)
    t0 = time.perf_counter()
    pm = PrunableModel(T.LlamaForCausalLM(conf).eval(), {"input_ids": ids})
    t1 = time.perf_counter()
    batch = 8
    say(out, f"\nA Llama-shaped decoder ({conf.num_hidden_layers} layers, hidden {conf.hidden_size}, 16 heads, 4 "
             f"key/value heads; groups found in {t1 - t0:.1f} s on the CPU), on the device: the forward pass of "
             f"{batch} prompts of 128 tokens (median ms) and greedy generation of 32 tokens for them (s):\n")
    say(out, "| plan | params | forward, median ms (p10–p90) | generate 32 tokens, s |")
    say(out, "|---|---|---|---|")
    for label, ratio in (("unpruned", 0.0), ("every group 0.5", 0.5)):
        model = pm.apply(pm.plan({n: ratio for n in pm.prunable_names}), check=False) if ratio else pm.base
        st = measure_model(model, {"input_ids": ids}, dev, None, batch)
        on = copy.deepcopy(model).to(dev)
        p = ids.repeat(batch, 1).to(dev)
        with torch.no_grad():
            on.generate(p, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            on.generate(p, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            gen_s = time.perf_counter() - t0
        n = sum(q.numel() for q in model.parameters())
        say(out, f"| {label} | {n / 1e6:.1f} M | {st.median_ms:.2f} ({st.p10_ms:.2f}–{st.p90_ms:.2f}) | {gen_s:.2f} |")


if __name__ == "__main__":
    main()
