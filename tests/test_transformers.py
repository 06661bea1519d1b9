"""Raw `transformers` models (no wrapper): dict inputs, ModelOutput, attention heads pruned whole."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from autoprune.costs.counting import CostModel, cost_report, count_macs, count_params  # noqa: E402
from autoprune.pruning.groups import PrunableModel  # noqa: E402
from autoprune.model.task import call_model  # noqa: E402


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def bert_inputs(batch: int = 1, seq: int = 16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_bert_heads_are_a_search_dimension_and_go_whole():
    model, x = tiny_bert(), bert_inputs()
    pm = PrunableModel(model, x, ignore=["pooler.dense"])
    heads = [g for g in pm.groups if g.name.endswith("attention.self.value")]
    ffn = [g for g in pm.groups if g.name.endswith("intermediate.dense")]
    assert len(heads) == 2 and len(ffn) == 2, [(g.name, g.prunable, g.reason) for g in pm.groups]
    assert all(g.prunable and g.multiple == 16 and g.channels == 64 for g in heads)  # 4 heads of 16
    assert {m.module.rsplit(".", 1)[1] for m in heads[0].members if m.role == "out"} >= {"query", "key", "value"}
    plan = pm.plan({heads[0].name: 0.5, ffn[1].name: 0.5})
    idx = pm.pruned_indices(plan)[heads[0].name]
    assert len(idx) == 32 and {i // 16 for i in idx} == {i // 16 for i in idx[:1]} | {i // 16 for i in idx[16:17]}
    assert all(sorted(idx[k:k + 16]) == list(range(idx[k], idx[k] + 16)) for k in (0, 16))  # two whole heads
    small = pm.apply(plan)
    att = small.encoder.layer[0].attention.self
    assert (att.num_attention_heads, att.all_head_size, att.query.out_features) == (2, 32, 32)
    assert small.encoder.layer[1].attention.self.num_attention_heads == 4
    assert small.encoder.layer[1].intermediate.dense.out_features == 64
    with torch.no_grad():
        out = call_model(small, bert_inputs(3))
    assert out.last_hidden_state.shape == (3, 16, 64)
    base = cost_report(model, x)
    rep = cost_report(small, x, base)
    cm = CostModel(pm, base.macs, base.params)
    macs, params = cm.estimate(plan)
    print("counted", rep.macs, rep.params, "estimated", macs, params)
    assert cm.exact and (macs, params) == (rep.macs, rep.params) and rep.macs_ratio < 0.9  # attention matmuls too


def test_groups_say_which_are_heads_and_which_are_ffn_neurons():
    pm = PrunableModel(tiny_bert(), bert_inputs(), ignore=["pooler.dense"])
    kinds = dict(zip(pm.table().group, pm.table().kind))
    assert {kinds[g] for g in kinds if g.endswith("attention.self.value")} == {"attention heads (4 of 16)"}
    assert {kinds[g] for g in kinds if g.endswith("intermediate.dense")} == {"neurons"}


def test_a_pruned_bert_round_trips_through_save_pretrained_and_from_pretrained(tmp_path):
    from autoprune.exporting import hf as hfexport

    model, x = tiny_bert(), bert_inputs()
    pm = PrunableModel(model, x, ignore=["pooler.dense"])
    heads = [g.name for g in pm.groups if g.name.endswith("attention.self.value")]
    ffn = [g.name for g in pm.groups if g.name.endswith("intermediate.dense")]
    small = pm.apply(pm.plan({heads[0]: 0.5, heads[1]: 0.25, ffn[1]: 0.5}))
    hfexport.save_pretrained(small, tmp_path)
    shapes = __import__("json").loads((tmp_path / "config.json").read_text())["autoprune_shapes"]
    assert shapes["encoder.layer.0.attention.self"]["attributes"] == {"num_attention_heads": 2, "all_head_size": 32}
    assert shapes["encoder.layer.1.intermediate.dense"]["sizes"]["out"] == 64
    assert not hasattr(small.config, "autoprune_shapes")  # the live model's config is left as it was
    # with transformers alone (remote code written beside the weights), and through autoprune without it
    remote = transformers.AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    local = hfexport.from_pretrained(tmp_path)
    assert type(remote).__name__ == "AutoprunedBertModel" and type(local) is transformers.BertModel
    xs = bert_inputs(3)
    with torch.no_grad():
        want = call_model(small, xs).last_hidden_state
        for m in (remote, local):
            assert m.encoder.layer[1].attention.self.num_attention_heads == 3
            assert torch.equal(call_model(m, xs).last_hidden_state, want)
    # an unpruned model round-trips with nothing recorded, and a non-transformers model is refused by name
    hfexport.save_pretrained(model, tmp_path / "full")
    assert __import__("json").loads((tmp_path / "full" / "config.json").read_text())["autoprune_shapes"] == {}
    with pytest.raises(Exception, match="not a transformers PreTrainedModel"):
        hfexport.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")


@pytest.mark.parametrize("shown", [False, True])
def test_transformers_bars_in_an_export_follow_autoprunes_progress_setting(shown, tmp_path, capfd):
    # transformers prints "Writing model shards" and "Loading weights" bars of its own; under AUTOPRUNE_PROGRESS=0
    # (or in a log) autoprune's export showed them anyway, and a search with show_progress off printed them
    from autoprune import settings
    from autoprune.exporting import hf as hfexport

    hf_logging = transformers.utils.logging
    small = PrunableModel(tiny_bert(), bert_inputs(), ignore=["pooler.dense"]).base
    settings.configure(settings.Settings(progress=shown))
    try:
        capfd.readouterr()
        hfexport.save_pretrained(small, tmp_path)
        hfexport.from_pretrained(tmp_path)
        err = capfd.readouterr().err
    finally:
        settings.configure()
    assert ("Loading weights" in err) is shown
    assert hf_logging.is_progress_bar_enabled()  # transformers' own setting is left as it was


def test_a_bfloat16_model_that_onnx_cannot_export_is_exported_in_float32_and_the_manifest_says_so(tmp_path):
    # transformers 5 loads a checkpoint in its stored dtype by default, often bfloat16; the TorchScript exporter
    # fails on a bfloat16 BERT ("ScalarType ComplexDouble is an unexpected tensor scalar type"), which failed the
    # whole export
    ort = pytest.importorskip("onnxruntime")
    from autoprune.exporting.files import export_model

    pm = PrunableModel(tiny_bert().to(torch.bfloat16), bert_inputs(), ignore=["pooler.dense"])
    plan = pm.plan({n: 0.5 for n in pm.prunable_names})
    small = pm.apply(plan)
    manifest = export_model(small, tmp_path, plan=plan, model_spec={"factory": "m:f"}, example=bert_inputs(),
                            pruning={"ignore": [], "round_to": 1, "mode": "structured", "criterion": "l2"})
    assert "model.onnx" in manifest["files"] and "float32" in manifest["notes"][0] and "ComplexDouble" in manifest["notes"][0]
    assert next(small.parameters()).dtype == torch.bfloat16  # the model itself is left as it was
    from autoprune.model.onnx import export_onnx
    with pytest.raises(Exception, match="ComplexDouble"):  # the agent times the file: no float32 stand-in there
        export_onnx(small, bert_inputs(), tmp_path / "agent.onnx")
    xs = bert_inputs(2)
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"))
    got = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in xs.items()})[0])
    with torch.no_grad():
        want = call_model(small, xs).last_hidden_state.float()
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=0.1)  # bfloat16's own precision
    import copy
    with torch.no_grad():
        exact = call_model(copy.deepcopy(small).float(), xs).last_hidden_state
    assert torch.allclose(got, exact, atol=1e-4)


def test_properties_on_a_transformer():
    # any plan over heads and FFN neurons: the output shape is unchanged (another batch size and sequence length
    # too), the attention modules agree with their widths, and the analytic costs are the counted ones
    model, x = tiny_bert(), bert_inputs()
    pm = PrunableModel(model, x, ignore=["pooler.dense"])
    cm = CostModel(pm)
    assert cm.exact and len(pm.prunable_names) == 4, [(g.name, g.reason) for g in pm.groups if not g.prunable]

    @settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def check(data) -> None:
        ratios = {n: data.draw(st.floats(0.0, pm.max_ratio)) for n in pm.prunable_names}
        plan = pm.plan(ratios)
        small = pm.apply(plan, check=False)
        with torch.no_grad():
            assert call_model(small, bert_inputs(2, 24)).last_hidden_state.shape == (2, 24, 64)
        for layer in small.encoder.layer:
            att = layer.attention.self
            assert att.num_attention_heads * att.attention_head_size == att.all_head_size == att.query.out_features
        assert cm.estimate(plan) == (count_macs(small, x), count_params(small))

    check()


def test_finetune_paths_cut_the_heads_the_search_scored():
    """`autoprune finetune` prunes through `schedules.prune_to`: one-shot, and gradual on a re-scored copy. Both must
    give the model the search evaluated (`pm.apply`), whole heads included (the copy is not probed for heads)."""
    import copy

    from autoprune.pruning.schedules import prune_to

    model, x = tiny_bert(), bert_inputs()
    pm = PrunableModel(model, x, ignore=["pooler.dense"])
    plan = pm.plan({n: 0.5 if n.endswith("value") else 0.25 for n in pm.prunable_names})
    searched = pm.apply(plan)
    oneshot = prune_to(pm, copy.deepcopy(pm.base), plan, 1.0)
    gradual = prune_to(pm, prune_to(pm, copy.deepcopy(pm.base), plan, 0.5), plan, 1.0)
    with torch.no_grad():
        want = call_model(searched, bert_inputs(2)).last_hidden_state
        for got in (oneshot, gradual):
            assert torch.allclose(call_model(got, bert_inputs(2)).last_hidden_state, want, atol=1e-6)
    for small in (oneshot, gradual):
        att = small.encoder.layer[0].attention.self
        assert (att.num_attention_heads, att.attention_head_size, att.query.out_features) == (2, 16, 32)
