"""The task interface end to end: dict batches and dict outputs, regression, label-free distillation, a custom
task; streamed evaluation bounded by max_val_samples; the user's own DataLoaders."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from autoprune.app import api
from autoprune.sensitivity.evaluate import Evaluator
from autoprune.exporting.files import load_pruned
from autoprune.pruning.schedules import Schedule, finetune
from autoprune.model.task import Classification, Distillation, Regression, call_model, make_task, resize_batch

BASE = {"evaluation": {"calibration_batches": 4}, "sensitivity": {"ratios": [0.25, 0.5, 0.75]}}

CASES = {
    "classification-dict": dict(model={"factory": "task_fixtures:kwargs_cnn"},
                                data={"factory": "task_fixtures:dict_digits", "batch_size": 64},
                                train={"epochs": 6, "lr": 0.01}),
    "regression": dict(model={"factory": "task_fixtures:mlp"}, data={"factory": "task_fixtures:regression_data", "batch_size": 64},
                       task={"kind": "regression"}, train={"epochs": 15, "lr": 0.01}),
    "distillation": dict(model={"factory": "task_fixtures:tiny_encoder"}, data={"factory": "task_fixtures:tokens", "batch_size": 32},
                         task={"kind": "distillation", "output": "pooled"}, train={"epochs": 0}),
    "custom": dict(model={"factory": "task_fixtures:kwargs_cnn"}, data={"factory": "task_fixtures:dict_digits", "batch_size": 64},
                   task={"factory": "task_fixtures:top2"}, train={"epochs": 6, "lr": 0.01}),
    # a causal LM (transformers' Llama) trained and scored on next tokens, no labels in the data
    "language-modeling": dict(model={"factory": "task_fixtures:tiny_llama_lm"},
                              data={"factory": "task_fixtures:counting_tokens", "batch_size": 32},
                              task={"kind": "language_modeling"}, train={"epochs": 10, "lr": 0.01}),
    # a detector (transformers' DETR) trained and scored by its own loss: the labels (a list of one dict of boxes
    # and classes per image, from the user's DataLoader) go to the model
    "model-loss-detector": dict(model={"factory": "task_fixtures:tiny_detector"},
                                data={"factory": "task_fixtures:squares"},
                                task={"kind": "model_loss"}, train={"epochs": 4, "lr": 1e-3}),
}


def _spec(runs_root, case: str, **over) -> dict:
    name = case
    spec = {"name": f"task-{name}", "budget": {"macs": 0.5}, "search": {"n_trials": 5}, "output": str(runs_root), **BASE}
    spec.update(CASES[case])
    spec.update(over)
    return spec


def _tensor(out):
    return out if isinstance(out, torch.Tensor) else (out.get("logits") if "logits" in out else out["last_hidden_state"])


@pytest.mark.parametrize("name", list(CASES))
def test_every_builtin_and_a_custom_task_searches_meets_the_budget_and_exports(name, runs_root):
    if name in ("language-modeling", "model-loss-detector"):
        pytest.importorskip("transformers")
    spec = _spec(runs_root, name)
    s = api.session(spec, show_progress=False)
    base = s.baseline_metric
    result = api.search(s, show_progress=False)
    best = result["best"]
    assert best["macs_ratio"] <= 0.5 + 1e-9
    assert math.isfinite(best["metric_val"])
    if name == "classification-dict":
        assert s.evaluator.metric_name == "accuracy"
        assert base > 0.8 and best["metric_val"] > 0.3  # chance is 0.1
    elif name == "regression":
        assert s.evaluator.metric_name == "neg_mse"
        assert -0.3 < base <= 0 and best["metric_val"] <= 0  # target variance ~1.4: a trained MLP is far below it
    elif name == "distillation":
        assert s.evaluator.metric_name == "cosine"
        assert base == pytest.approx(1.0, abs=1e-6)  # the unpruned model is its own teacher
        assert 0.5 < best["metric_val"] < 1.0
    elif name == "language-modeling":
        assert s.evaluator.metric_name == "neg_nll"
        # trained: ~0.2 nats a token (the first step of a sequence is a guess); guessing is log(49) = 3.9
        assert -0.5 < base < 0 and -3.0 < best["metric_val"] < base
        tuned = api.finetune(s, steps=150, show_progress=False)["metrics"]["val"]
        assert tuned > best["metric_val"] + 0.05  # recovery on the next-token loss
    elif name == "model-loss-detector":
        assert s.evaluator.metric_name == "neg_loss"
        assert "labels" not in s.target.example_input  # traced, counted and timed as inference
        total = n = 0
        with torch.no_grad():  # the model's own loss over the val split, a mean over images
            for batch in s.target.datasets["val"]:
                total += s.target.model.eval()(**batch).loss.item() * len(batch["labels"])
                n += len(batch["labels"])
        assert s.evaluator.score(s.target.model) == pytest.approx(-total / n, rel=1e-5)
        assert base < 0 and math.isfinite(best["metric_test"])
    else:
        assert s.evaluator.metric_name == "top2"
        top1 = Evaluator(s.target.datasets, task=Classification(output="logits")).score(s.target.model)
        assert base >= top1 and base > 0.9
    # export and reload: same outputs on a real batch (dict inputs are saved as example.pt)
    out = api.export(spec, show_progress=False, onnx=False)
    small = load_pruned(out)
    model = s.pruner.apply(api.plan_of(s.run_dir))
    s.evaluator(model)  # the exported model is recalibrated the same way
    x = resize_batch(s.target.example_input, 4)
    with torch.no_grad():
        a, b = _tensor(call_model(model.eval(), x)), _tensor(call_model(small, x))
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    assert (out / "example.pt").exists()


def test_distillation_fine_tune_recovers_toward_the_teacher(runs_root):
    s = api.session(_spec(runs_root, "distillation", name="task-distill-ft"), show_progress=False)
    plan = s.pruner.uniform_plan(0.6)
    before = s.evaluator.score(s.pruner.apply(plan))
    tuned = finetune(s.pruner, plan, s.target.datasets, schedule=Schedule("oneshot", steps=60), lr=3e-3, batch_size=32)
    after = s.evaluator.score(tuned)
    assert isinstance(s.pruner.task, Distillation)
    assert 1 - after < 0.5 * (1 - before), (before, after)  # the distance to the teacher at least halves


class Counting(Dataset):
    """Counts item reads, to check that evaluation reads no more than max_val_samples."""

    def __init__(self, base) -> None:
        self.base, self.reads = base, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        return self.base[i]


def test_evaluation_streams_and_stops_at_max_val_samples():
    from task_fixtures import dict_digits, kwargs_cnn

    data = dict_digits()
    val = Counting(data["val"])
    data["val"] = val
    ev = Evaluator(data, batch_size=32, calibration_batches=1, max_val_samples=100, eval_batch_size=64)
    ev.score(kwargs_cnn())
    assert val.reads == 128  # two batches of 64 read, 100 samples scored
    assert sum(len(b[1]) for b in ev.iter_batches("val")) == 100


def test_small_splits_are_collated_once_and_kept():
    """A Dataset split is read once and its batches kept (the same batches, the same scores); a split over
    BATCH_CACHE_NUMEL, an incomplete pass and a user's DataLoader are read again every time; pickling drops them."""
    import pickle

    from task_fixtures import dict_digits, kwargs_cnn

    data = dict_digits()
    val = Counting(data["val"])
    data["val"] = val
    ev = Evaluator(data, batch_size=32, calibration_batches=1, eval_batch_size=64)
    model = kwargs_cnn()
    first = ev.score_and_loss(model)
    reads = val.reads
    assert reads == len(val)
    assert ev.score_and_loss(model) == first  # from the kept batches: identical metric and loss
    assert val.reads == reads
    ev.datasets["test"] = Counting(data["test"])
    next(ev.iter_batches("test"))  # a pass stopped early keeps nothing
    assert "test" not in ev._batch_cache
    list(ev.iter_batches("test"))
    assert ev.datasets["test"].reads == 64 + len(data["test"]) and "test" in ev._batch_cache
    ev.max_val_samples = 50  # another limit: read again, then kept under the new one
    assert sum(len(b[1]) for b in ev.iter_batches("val")) == 50
    assert val.reads == reads + 64
    assert "_batch_cache" in vars(ev) and pickle.loads(pickle.dumps(ev))._batch_cache == {}

    small = Evaluator({**data, "val": Counting(data["val"].base)}, batch_size=32, calibration_batches=1)
    small.BATCH_CACHE_NUMEL = 10  # every batch is larger: streamed each time
    small.score(model), small.score(model)
    assert small.datasets["val"].reads == 2 * len(val) and small._batch_cache == {}

    loader = DataLoader(data["val"].base, batch_size=64)
    streamed = Evaluator({**data, "val": loader}, batch_size=32, calibration_batches=1)
    assert streamed.score(model) == pytest.approx(first[0])
    streamed.score(model)
    assert streamed._batch_cache == {}


def test_user_dataloaders_are_used_as_they_are(runs_root):
    """A data factory may return DataLoaders (its own batch size and collation): evaluation and search use them."""
    spec = _spec(runs_root, "classification-dict", name="task-loaders",
                 data={"factory": "test_tasks:digit_loaders", "batch_size": 64}, search={"n_trials": 3})
    s = api.session(spec, show_progress=False)
    assert isinstance(s.target.datasets["val"], DataLoader)
    assert s.baseline_metric > 0.8
    assert api.search(s, show_progress=False)["best"]["macs_ratio"] <= 0.5 + 1e-9


def digit_loaders():
    from task_fixtures import dict_digits

    return {k: DataLoader(v, batch_size=50, shuffle=(k == "train"), generator=torch.Generator().manual_seed(0))
            for k, v in dict_digits().items()}


def test_language_modeling_scores_next_tokens_as_transformers_computes_its_own_loss():
    transformers = pytest.importorskip("transformers")
    from task_fixtures import counting_tokens, tiny_llama_lm

    from autoprune.model.task import LanguageModeling

    model = tiny_llama_lm().eval()
    data = counting_tokens(8, 8, 8)["val"]
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask")}
    assert (batch["attention_mask"] == 0).any()  # padded sequences among them
    t = make_task(type("T", (), {"kind": "language_modeling"})())
    assert isinstance(t, LanguageModeling) and not t.needs_labels
    inputs, target = t.split(batch)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert torch.equal(target == -100, batch["attention_mask"] == 0)  # padding is not scored
    with torch.no_grad():
        out = call_model(model, inputs)
        hf = model(**inputs, labels=target).loss  # transformers shifts the labels itself and skips -100
    logits = t.output(out, inputs)
    assert t.loss(logits, target).item() == pytest.approx(hf.item(), rel=1e-5)
    st = t.metric_state()
    t.update(st, logits, target)
    assert st["count"] == int((target[:, 1:] != -100).sum())
    assert t.compute(st) == pytest.approx(-hf.item(), rel=1e-5)  # neg_nll: minus the mean over scored tokens
    # labels in the batch are the targets (not the model's input), token_accuracy counts argmax hits
    labels = batch["input_ids"].clone()
    labels[:, :4] = -100
    inputs, target = t.split({**batch, "labels": labels})
    assert "labels" not in inputs and torch.equal(target, labels)
    acc = LanguageModeling(metric="token_accuracy")
    st = acc.metric_state()
    acc.update(st, logits, target)
    hits = (logits[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != -100]
    assert acc.compute(st) == pytest.approx(hits.float().mean().item())
    # what it refuses, by name: hidden states instead of a LM head's logits, batches without token ids
    with pytest.raises(ValueError, match="language-model head"):
        t.loss(torch.zeros(8, 12, 16), target.clamp_min(0) + 20)
    with pytest.raises(ValueError, match="token ids"):
        t.split((torch.randn(4, 3), torch.zeros(4)))
    with pytest.raises(Exception, match="neg_nll"):
        make_task(type("T", (), {"kind": "language_modeling", "metric": "accuracy"})())


def test_model_loss_hands_labels_to_the_model_and_slices_per_image_label_lists():
    pytest.importorskip("transformers")
    from task_fixtures import squares, tiny_detector

    from autoprune.model.task import ModelLoss, slice_batch
    from autoprune.model.training import distill_loss

    batch = next(iter(squares(batch_size=4)["val"]))
    t = make_task(type("T", (), {"kind": "model_loss"})())
    assert isinstance(t, ModelLoss) and not t.needs_labels and t.metric_name == "neg_loss"
    inputs, target = t.split(batch)
    assert target is None and inputs["labels"] is batch["labels"]
    assert set(t.inference_inputs(inputs)) == {"pixel_values"}
    # a per-image list (a detector's labels) is sliced and repeated with the images, not item by item
    two = slice_batch(batch, 1, 3)
    assert two["pixel_values"].shape[0] == 2 and two["labels"] == batch["labels"][1:3]
    assert len(resize_batch(batch, 6)["labels"]) == 6
    model = tiny_detector().eval()
    with torch.no_grad():
        out = t.output(model(**inputs), inputs)
    assert out.shape == (4,) and torch.all(out == out[0]) and out[0] > 0  # the batch's loss, once per image
    assert distill_loss(t, out, out.clone()) is None  # loss values are not distilled
    with pytest.raises(ValueError, match="has no labels"):
        with torch.no_grad():
            t.output(model(pixel_values=batch["pixel_values"]), {"pixel_values": batch["pixel_values"]})
    with pytest.raises(ValueError, match="dict batches"):
        t.split((batch["pixel_values"], torch.zeros(4)))
    with pytest.raises(Exception, match="neg_loss"):
        make_task(type("T", (), {"kind": "model_loss", "metric": "accuracy"})())


def test_task_units():
    t = Distillation(output="pooled")
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 1, 0]])
    pooled = t.output({"last_hidden_state": hidden}, {"attention_mask": mask})
    assert torch.allclose(pooled, torch.tensor([[0.5, 0.5]]))  # the padded token is left out
    assert t.loss(pooled, None, pooled).item() == pytest.approx(0.0, abs=1e-6)
    r = Regression()
    st = r.metric_state()
    r.update(st, torch.zeros(4, 1), torch.full((4, 1), 2.0))
    assert r.compute(st) == pytest.approx(-4.0)
    c = Classification()
    st = c.metric_state()
    c.update(st, torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    assert c.compute(st) == 0.5
    assert make_task(None).name == "classification"
    kl = Distillation(output="logits")
    assert (kl.loss_kind, kl.metric_kind) == ("kl", "agreement")
