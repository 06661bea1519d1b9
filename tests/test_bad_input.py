"""Bad input: every malformed input gives one clear message naming the problem, exit code 2, no traceback.

Table-driven: each case builds a spec (or a file) from a small valid one, runs the CLI in-process through
`autoprune.app.cli.main`, and checks the exit code, the exact message fragment and that no traceback is printed.
Factories used by the cases live in this module (`test_bad_input:...`), importable because pytest puts
tests/ on sys.path (subprocess runs set PYTHONPATH=tests).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import yaml
from torch.utils.data import TensorDataset

from autoprune.app.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- factories the cases point at
def tiny_data(shape=(1, 40), n: int = 96, classes: int = 3, drop: str | None = None):
    g = torch.Generator().manual_seed(0)
    out = {}
    for split in ("train", "val", "test"):
        x = torch.randn(n, *shape, generator=g)
        out[split] = TensorDataset(x, torch.randint(0, classes, (n,), generator=g))
    if drop:
        out.pop(drop)
    return out


def not_a_dict():
    return [1, 2, 3]


def not_a_model():
    return {"weights": 1}


def raising_model():
    raise ValueError("width must be even")


class OnnxUnfriendly(nn.Module):
    """A conv net whose forward uses torch.special.i0e: the TorchScript ONNX exporter (opset 17) rejects it."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        y = torch.special.i0e(self.bn(self.conv(x)))
        return self.fc(y.mean(-1))


def onnx_unfriendly():
    return OnnxUnfriendly()


class AllGroupsBroken(nn.Module):
    """Every conv output is scaled by a raw tensor attribute that Torch-Pruning does not know about, so pruning
    any group breaks the forward: there is nothing to search."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 3, padding=1)
        self.scale = torch.linspace(0.5, 1.5, 8).view(1, 8, 1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc((self.conv(x) * self.scale).mean(-1))


def all_groups_broken():
    return AllGroupsBroken()


TINY = "test_bad_input:tiny_data"


# ----------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    fragment: str  # must appear verbatim in stderr
    edit: dict[str, Any] = field(default_factory=dict)  # dotted key -> value (None deletes the key)
    cmd: str = "groups"
    extra: list[str] = field(default_factory=list)
    raw: str | None = None  # spec text instead of the edited spec
    prepare: Callable[[Path, dict], list[str] | None] | None = None  # may edit the spec / return the argv
    absent: str | None = None  # must NOT appear in stderr (e.g. a password)


def _set(spec: dict, key: str, value: Any) -> None:
    node = spec
    *head, last = key.split(".")
    for k in head:
        node = node.setdefault(k, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value


def _tiny(spec: dict, model: str, shape=(1, 40)) -> None:
    spec["model"] = {"factory": model, "input_shape": list(shape)}
    spec["data"] = {"factory": TINY, "batch_size": 32}
    spec["train"] = {"epochs": 1, "lr": 0.01}


def _other_arch_checkpoint(tmp: Path, spec: dict) -> None:
    from autoprune.model.zoo import resnet1d

    path = tmp / "resnet1d.pt"
    torch.save(resnet1d().state_dict(), path)
    spec["model"]["checkpoint"] = str(path)


def _garbage_checkpoint(tmp: Path, spec: dict) -> None:
    path = tmp / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    spec["model"]["checkpoint"] = str(path)


def _corrupt_journal(tmp: Path, spec: dict) -> None:
    j = tmp / "corrupt.journal"
    j.write_text('{"op_code": 0, "worker_id": "x", "study_name": "s", "directions": [1]}\nGARBAGE{{{\n{"op_code": 1}\n')
    spec.setdefault("search", {})["storage"] = str(j)


def _output_is_a_file(tmp: Path, spec: dict) -> None:
    f = tmp / "a-file"
    f.write_text("x")
    spec["output"] = str(f)


def _plan_for_other_model(tmp: Path, spec: dict) -> list[str]:
    p = tmp / "other.json"
    p.write_text('{"ratios": {"layer3.0.conv1": 0.5}, "mode": "structured", "criterion": "l2", "round_to": 1}')
    return ["--plan", str(p), "--out", str(tmp / "exp"), "--no-onnx"]


def _plan_bad_json(tmp: Path, spec: dict) -> list[str]:
    p = tmp / "bad.json"
    p.write_text("{ratios: ")
    return ["--plan", str(p), "--out", str(tmp / "exp")]


def _plan_ratio_too_big(tmp: Path, spec: dict) -> list[str]:
    p = tmp / "big.json"
    p.write_text('{"ratios": {"features.0.0": 1.5}}')
    return ["--plan", str(p), "--out", str(tmp / "exp"), "--no-onnx"]


def _onnx_export(tmp: Path, spec: dict) -> list[str]:
    _tiny(spec, "test_bad_input:onnx_unfriendly")
    p = tmp / "empty-plan.json"
    p.write_text('{"ratios": {}}')
    return ["--plan", str(p), "--out", str(tmp / "exp")]


def _all_broken(tmp: Path, spec: dict) -> None:
    _tiny(spec, "test_bad_input:all_groups_broken")


def _report_missing(tmp: Path, spec: dict) -> list[str]:
    return ["report", str(tmp / "no-such-run")]


def _report_bad_format(tmp: Path, spec: dict) -> list[str]:
    (tmp / "run").mkdir()
    return ["report", str(tmp / "run"), "--format", "xml"]


CASES = [
    # --- the spec file itself
    Case("malformed-yaml", "is not valid YAML", raw="name: x\nmodel: [unclosed\n"),
    Case("empty-spec", "must be a mapping of keys (name, model, budget, ...), got NoneType", raw=""),
    Case("spec-is-a-list", "must be a mapping of keys (name, model, budget, ...), got list", raw="- a\n- b\n"),
    Case("missing-spec-file", "does not exist", prepare=lambda t, s: ["groups", str(t / "nope.yaml")]),
    Case("set-without-equals", "--set 'search.n_trials': expected KEY=VALUE", extra=["--set", "search.n_trials"]),
    Case("set-into-a-value", "override 'name.x': 'name' is not a section", extra=["--set", "name.x=1"]),
    # --- unknown keys and wrong types
    Case("unknown-top-key", "foo: unknown key", edit={"foo": 1}),
    Case("unknown-nested-key", "search.n_trails: unknown key", edit={"search.n_trails": 5}),
    Case("missing-model", "model: Field required", edit={"model": None}),
    Case("n-trials-wrong-type", "search.n_trials: Input should be a valid integer", edit={"search.n_trials": "many"}),
    Case("n-trials-zero", "search.n_trials: Input should be greater than 0", edit={"search.n_trials": 0}),
    Case("input-shape-wrong-type", "model.input_shape: Input should be a valid list", edit={"model.input_shape": "1x40"}),
    Case("input-shape-negative", "model.input_shape: Value error, must be a non-empty list of positive integers",
         edit={"model.input_shape": [1, -40]}),
    Case("bad-run-name", "name: Value error, '../evil' must start with a letter or digit", edit={"name": "../evil"}),
    Case("rungs-not-increasing", "search.recovery_rungs: Value error, recovery_rungs must be increasing positive step "
         "counts, e.g. [50, 200]; got [50, 20]", edit={"search.recovery_rungs": [50, 20]}),
    Case("rungs-multi-objective", "search: Value error, recovery_rungs (multi-fidelity) needs one objective",
         edit={"search.recovery_rungs": [50], "search.objectives": ["accuracy", "macs"]}),
    # --- budgets
    Case("budget-zero", "budget.macs: Value error, must be a fraction strictly between 0 and 1, got 0.0",
         edit={"budget": {"macs": 0}}),
    Case("budget-negative", "must be a fraction strictly between 0 and 1, got -0.5", edit={"budget": {"macs": -0.5}}),
    Case("budget-one", "must be a fraction strictly between 0 and 1, got 1.0", edit={"budget": {"macs": 1}}),
    Case("budget-above-one", "budget.params: Value error, must be a fraction strictly between 0 and 1, got 1.5",
         edit={"budget": {"params": 1.5}}),
    Case("two-budgets", "give exactly one of macs, params, latency_ms, latency (got ['macs', 'params'])",
         edit={"budget": {"macs": 0.5, "params": 0.5}}),
    Case("no-budget", "give exactly one of macs, params, latency_ms, latency (got none)", edit={"budget": {}}),
    Case("latency-zero", "budget.latency_ms: Input should be greater than 0", edit={"budget": {"latency_ms": 0}}),
    Case("latency-fraction-above-one", "budget.latency: Value error, must be a fraction strictly between 0 and 1, got 1.2",
         edit={"budget": {"latency": 1.2}}),
    Case("latency-both", "give exactly one of macs, params, latency_ms, latency (got ['latency_ms', 'latency'])",
         edit={"budget": {"latency_ms": 2.0, "latency": 0.5}}),
    Case("budget-unreachable", "is unreachable: pruning every group at max_ratio 0.5 still costs",
         edit={"budget": {"macs": 0.05}, "pruning.max_ratio": 0.5}, cmd="search"),
    Case("budget-unreachable-says-minimum", "still costs 157,440 (25.3% of the unpruned model). Raise the budget to at least 0.253",
         edit={"budget": {"macs": 0.05}, "pruning.max_ratio": 0.5}, cmd="search"),
    # --- choices
    Case("unknown-strategy", "search.strategy: Input should be 'optuna', 'uniform', 'global', 'lamp', 'netadapt' or 'random'",
         edit={"search.strategy": "bayes"}),
    Case("unknown-sampler", "search.sampler: Input should be 'tpe', 'nsga2', 'gp' or 'random'", edit={"search.sampler": "cma"}),
    Case("unknown-criterion", "pruning.criterion: Input should be 'l1', 'l2'", edit={"pruning.criterion": "hessian"}),
    Case("cli-unknown-strategy", "search.strategy: Input should be", cmd="search", extra=["--strategy", "bayes"]),
    Case("sensitivity-ratio-out-of-range", "sensitivity.ratios: Value error, ratios must be in (0, 1)",
         edit={"sensitivity.ratios": [0.5, 1.5]}),
    Case("first-objective-not-metric", "the first objective must be 'accuracy'", edit={"search.objectives": ["macs"]}),
    # --- factories, data, model
    Case("factory-no-colon", "model.factory: Value error, 'autoprune.model.zoo.cnn1d' is not of the form 'package.module:callable'",
         edit={"model.factory": "autoprune.model.zoo.cnn1d"}),
    Case("factory-module-missing", "model factory 'no_such_pkg.models:net': cannot import module 'no_such_pkg.models'",
         edit={"model.factory": "no_such_pkg.models:net"}),
    Case("factory-attr-missing", "model factory 'autoprune.model.zoo:resnet999': module 'autoprune.model.zoo' has no attribute 'resnet999'",
         edit={"model.factory": "autoprune.model.zoo:resnet999"}),
    Case("factory-wrong-type", "returned dict, not a torch.nn.Module", edit={"model.factory": "test_bad_input:not_a_model",
                                                                           "data": {"factory": TINY}}),
    Case("factory-raises", "failed with kwargs {}: ValueError: width must be even",
         edit={"model.factory": "test_bad_input:raising_model", "data": {"factory": TINY}}),
    Case("data-factory-wrong-type", "must return a dict with keys ['train', 'val', 'test'], got list",
         edit={"data": {"factory": "test_bad_input:not_a_dict"}}),
    Case("data-missing-split", "returned no 'test' split (needs ['train', 'val', 'test'])",
         edit={"data": {"factory": TINY, "kwargs": {"drop": "test"}}}),
    Case("input-shape-vs-data", "model.input_shape is [1, 50] but the data's inputs have shape [1, 40]",
         edit={"model.input_shape": [1, 50], "data": {"factory": TINY}}),
    Case("input-shape-vs-model", "forward failed on an input of shape [1, 3, 40] (batch, *input_shape)",
         edit={"model.input_shape": [3, 40], "data": {"factory": TINY, "kwargs": {"shape": [3, 40]}}}),
    Case("ignore-missing-module", "pruning.ignore names modules that do not exist: 'features.99'",
         edit={"pruning.ignore": ["features.99"]}),
    Case("checkpoint-other-arch", "does not match the model", prepare=_other_arch_checkpoint),
    Case("checkpoint-garbage", "cannot be loaded safely (weights_only=True)", prepare=_garbage_checkpoint),
    Case("checkpoint-missing", "checkpoint '/nonexistent/model.pt' does not exist",
         edit={"model.checkpoint": "/nonexistent/model.pt"}),
    Case("no-prunable-group", "no prunable group found: conv: pruning fails", prepare=_all_broken),
    # --- storage and run directory
    Case("corrupted-journal", "line 2 is not a journal record (the file is corrupted); move it away",
         prepare=_corrupt_journal, cmd="search"),
    Case("storage-cannot-connect", "cannot connect to storage ...@127.0.0.1:1/db", cmd="search",
         extra=["--storage", "postgresql://u:secretpw@127.0.0.1:1/db"], absent="secretpw"),
    Case("run-dir-not-writable", "is not writable (NotADirectoryError", prepare=_output_is_a_file),
    # --- plans, export, report
    Case("plan-for-other-model", "plan names unknown group 'layer3.0.conv1'", cmd="export", prepare=_plan_for_other_model),
    Case("plan-not-json", "plan is not valid JSON", cmd="export", prepare=_plan_bad_json),
    Case("plan-ratio-out-of-range", "plan ratio for group 'features.0.0' is 1.5; it must be in [0, 0.9]", cmd="export",
         prepare=_plan_ratio_too_big),
    Case("onnx-unsupported-op", "ONNX export failed (UnsupportedOperatorError: Exporting the operator 'aten::special_i0e'",
         cmd="export", prepare=_onnx_export),
    # the task (tests/task_fixtures.py): outputs, dict keys, batches and labels checked on a real batch
    Case("task-output-unreadable", "task 'bad-output' cannot read the output of model 'task_fixtures:kwargs_cnn'",
         edit={"model": {"factory": "task_fixtures:kwargs_cnn"}, "data": {"factory": "task_fixtures:dict_digits"},
               "task": {"factory": "task_fixtures:bad_output_task"}}, cmd="groups"),
    Case("task-dict-key-not-taken", "forward failed on the data's first batch {'pixels': tensor[1, 1, 8, 8] float32}: "
         "TypeError: KwargsCNN.forward() got an unexpected keyword argument 'pixels'",
         edit={"model": {"factory": "task_fixtures:kwargs_cnn"},
               "data": {"factory": "task_fixtures:dict_digits", "kwargs": {"image_key": "pixels"}}}, cmd="groups"),
    Case("task-batch-not-consumable", "forward failed on the data's first batch {'input_ids': tensor[1, 12] int64, "
         "'attention_mask': tensor[1, 12] int64}", edit={"model": {"factory": "autoprune.model.zoo:cnn1d"},
                                                     "data": {"factory": "task_fixtures:tokens"}}, cmd="groups"),
    Case("task-labels-missing", "task 'classification' needs labels, but the data's batches have none",
         edit={"model": {"factory": "task_fixtures:kwargs_cnn"},
               "data": {"factory": "task_fixtures:dict_digits", "kwargs": {"labels": False}}}, cmd="groups"),
    Case("task-label-free-accuracy", "task.metric 'accuracy': distillation is label-free; it takes cosine or agreement",
         edit={"task": {"kind": "distillation", "metric": "accuracy"}}, cmd="groups"),
    Case("task-distill-untrained", "task 'distillation' learns from the unpruned model, so that model must be trained",
         edit={"task": {"kind": "distillation"}}, cmd="groups"),
    Case("task-factory-not-a-task", "task factory 'task_fixtures:mlp' returned Sequential, not an autoprune.model.task.Task",
         edit={"task": {"factory": "task_fixtures:mlp"}}, cmd="groups"),
    Case("task-metric-wrong-target", "task 'classification': its metric/loss cannot read the model's output",
         edit={"model": {"factory": "task_fixtures:mlp"}, "data": {"factory": "task_fixtures:regression_data"}},
         cmd="groups"),
    Case("task-input-shape-dict", "model.input_shape is [1, 40] but the data's inputs are {'input_ids'",
         edit={"model": {"factory": "task_fixtures:tiny_encoder", "input_shape": [1, 40]},
               "data": {"factory": "task_fixtures:tokens"}, "task": {"kind": "distillation"}, "train": {"epochs": 0}},
         cmd="groups"),
    Case("task-language-modeling-on-images", "task 'language_modeling' cannot split the data's batches "
         "((tensor[1, 1, 40] float32, tensor[1] int64)) into inputs and target: ValueError: language_modeling needs "
         "batches of token ids", edit={"task": {"kind": "language_modeling"}}, cmd="groups"),
    Case("task-model-loss-without-dict-batches", "task 'model_loss' cannot split the data's batches ((tensor[1, 1, "
         "40] float32, tensor[1] int64)) into inputs and target: ValueError: model_loss hands the batch to the model "
         "by name", edit={"task": {"kind": "model_loss"}}, cmd="groups"),
    Case("task-model-loss-model-without-loss", "got an unexpected keyword argument 'labels' (task 'model_loss' hands "
         "the model the batch's 'labels' to compute its own loss from; a model that computes none needs another task)",
         edit={"model": {"factory": "task_fixtures:kwargs_cnn"}, "data": {"factory": "task_fixtures:dict_digits"},
               "task": {"kind": "model_loss"}}, cmd="groups"),
    Case("report-missing-run", "does not exist; run `autoprune search SPEC` first", prepare=_report_missing),
    Case("report-bad-format", "--format 'xml': use table, json or csv", prepare=_report_bad_format),
]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _argv(case: Case, tmp_path: Path, make_spec) -> list[str]:
    spec = make_spec("cnn1d", search={"n_trials": 2})
    argv_extra = None
    for k, v in case.edit.items():
        _set(spec, k, copy.deepcopy(v))
    if case.prepare is not None:
        argv_extra = case.prepare(tmp_path, spec)
    path = tmp_path / "spec.yaml"
    path.write_text(case.raw if case.raw is not None else yaml.safe_dump(spec))
    if argv_extra and argv_extra[0] in ("groups", "report"):
        return argv_extra
    return [case.cmd, str(path), *case.extra, *(argv_extra or [])]


def test_the_table_is_big_enough():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_error(case: Case, tmp_path, make_spec, capsys):
    code, out, err = _run(_argv(case, tmp_path, make_spec), capsys)
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert case.fragment in err, err
    assert "Traceback" not in err and "Traceback" not in out
    assert err.startswith("error: ") or "Error:" in err  # ours, or click's usage error
    if case.absent:
        assert case.absent not in err


def test_debug_shows_the_traceback(tmp_path, make_spec):
    spec = make_spec("cnn1d")
    spec["model"]["factory"] = "no_such_pkg.models:net"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "autoprune.app.cli", "groups", str(path)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [
        "error: model factory 'no_such_pkg.models:net': cannot import module 'no_such_pkg.models' "
        "(ModuleNotFoundError: No module named 'no_such_pkg')"]
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "AutopruneError" in debug.stderr


def test_usage_error_exits_2_without_traceback(capsys):
    code, out, err = _run(["search"], capsys)  # missing SPEC argument
    assert code == 2 and "Missing argument 'spec'" in err and "Traceback" not in err
