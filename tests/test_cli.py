"""The command line: help and exit codes, --set overrides, JSON output, and the real console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autoprune.app.cli import main


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_command(capsys):
    code, out, _ = _cli(["--help"], capsys)
    assert code == 0
    for cmd in ("groups", "train", "sensitivity", "search", "report", "export", "demo", "finetune", "serve", "agent"):
        assert f"  {cmd} " in out or f"  {cmd}\n" in out, cmd


def test_usage_errors_exit_2(capsys):
    code, _, err = _cli(["no-such-command"], capsys)
    assert code == 2 and "No such command 'no-such-command'" in err
    code, _, err = _cli(["search", "x.yaml", "--no-such-option"], capsys)
    assert code == 2 and "No such option: --no-such-option" in err
    code, _, err = _cli(["search", "x.yaml", "--n-trials", "many"], capsys)
    assert code == 2 and "Invalid value for '--n-trials'" in err
    assert "Traceback" not in err


def test_groups_json_and_set_overrides(make_spec, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(make_spec("cnn1d")))
    code, out, err = _cli(["groups", str(path), "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    names = [r["group"] for r in rows]
    assert len(rows) == 4 and all(r["prunable"] for r in rows)
    assert all(0 < r["macs_share"] <= 1 for r in rows)
    # --set reaches nested keys and parses YAML values: ignoring a group's root makes it unprunable
    code, out, err = _cli(["groups", str(path), "--json", "--set", f"pruning.ignore=[{names[0]}]"], capsys)
    assert code == 0, err
    assert [r["group"] for r in json.loads(out)] == names[1:]


def test_search_report_export_through_the_cli(make_spec, tmp_path, capsys):
    spec = make_spec("cnn1d", search={"n_trials": 3, "priors": "none"})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = _cli(["search", str(path), "--set", "search.n_trials=4"], capsys)
    assert code == 0, err
    assert "[optuna] val" in out and "4 trials, 0 failed" in out
    assert "note: no priors: every group searched in [0, max_ratio]" in out  # result.json's notes, printed
    run_dir = Path(spec["output"]) / spec["name"]
    code, out, err = _cli(["report", str(run_dir), "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["optuna"]["n_trials_complete"] == 4
    code, out, err = _cli(["export", str(path), "--out", str(tmp_path / "exp"), "--no-onnx"], capsys)
    assert code == 0, err
    costs = json.loads((tmp_path / "exp" / "costs.json").read_text())
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["costs.json", "example.pt", "manifest.json", "model.pt"]
    assert costs["macs_ratio"] <= 0.5 + 1e-9 and costs["macs"] < costs["macs"] / costs["macs_ratio"]
    # the run directory stands for its spec (the one the search ran with, --set included), from anywhere, moved too
    moved = tmp_path / "elsewhere" / spec["name"]
    moved.parent.mkdir()
    shutil.move(str(run_dir), str(moved))
    assert json.loads((moved / "spec.json").read_text())["search"]["n_trials"] == 4
    code, out, err = _cli(["export", str(moved), "--out", str(tmp_path / "exp2"), "--no-onnx"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "exp2" / "costs.json").read_text()) == costs
    code, out, err = _cli(["export", str(tmp_path / "elsewhere"), "--no-onnx"], capsys)  # a directory, no run
    assert code == 2 and "is a directory without spec.json" in err and err.count("\n") == 1


@pytest.mark.skipif(shutil.which("autoprune") is None and not (Path(sys.executable).parent / "autoprune").exists(),
                    reason="console script not installed")
def test_console_script_exit_code_and_one_line(tmp_path):
    exe = shutil.which("autoprune") or str(Path(sys.executable).parent / "autoprune")
    (tmp_path / "bad.yaml").write_text("name: x\nmodel: {factory: m:f, input_shape: [1]}\nbudget: {macs: 2}\n")
    r = subprocess.run([exe, "groups", str(tmp_path / "bad.yaml")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "AUTOPRUNE_PROGRESS": "0"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: invalid spec {tmp_path / 'bad.yaml'}:",
                                     "  budget.macs: Value error, must be a fraction strictly between 0 and 1, got 2.0"]


def test_demo_compares_every_strategy_after_the_same_recovery(make_spec, tmp_path, capsys):
    """`autoprune demo` on a given spec: the search, the four baselines, the export, and each strategy's best plan
    fine-tuned the same number of steps, compared after it (what the default search ranks plans for)."""
    path = tmp_path / "spec.yaml"
    spec = make_spec("cnn1d", budget={"macs": 0.5})
    path.write_text(yaml.safe_dump(spec))
    code, out, err = _cli(["demo", "--spec", str(path), "--n-trials", "6", "--recover-steps", "20"], capsys)
    assert code == 0, err
    rows = _recovered_rows(out, 20)
    assert set(rows) == {"optuna", "uniform", "global", "lamp", "netadapt"}
    assert all(0 < min(v[:3]) and max(v[:3]) <= 1 and v[3] <= 0.5 + 1e-9 for v in rows.values())
    run_dir = Path(spec["output"]) / spec["name"]
    assert len(list(run_dir.glob("recovered/*/manifest.json"))) == 5  # each recovered model exported
    assert "recovered_test" not in out.split("after the same", 1)[0]
    # again on the same run: the table before the recovery does not show the first run's recovery, which is redone
    code, out2, err = _cli(["demo", "--spec", str(path), "--n-trials", "6", "--recover-steps", "20"], capsys)
    assert code == 0, err
    assert "recovered_test" not in out2.split("after the same", 1)[0]
    assert _recovered_rows(out2, 20) == rows  # the same plans recover to the same numbers


def _recovered_rows(out: str, steps: int) -> dict[str, list[float]]:
    """The after-recovery table the CLI prints: strategy -> [val_before, val, test, macs_ratio]."""
    table = out.split(f"after the same {steps}-step fine-tune of each strategy's best plan", 1)[1].splitlines()[1:]
    rows = {ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in table if ln.split() and ln.split()[0] in
            ("optuna", "uniform", "global", "lamp", "netadapt")}
    assert all(len(v) == 4 for v in rows.values())
    return rows


def test_search_baselines_compare_after_recovery_and_the_report_reads_it_back(make_spec, tmp_path, capsys,
                                                                               monkeypatch):
    from autoprune.results.tables import load

    spec = make_spec("cnn1d", search={"n_trials": 4, "priors": "none"})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = _cli(["search", str(path), "--recover-steps", "10"], capsys)
    assert code == 2 and "--baselines" in err  # a comparison needs the baselines
    from autoprune.app.session import Session

    opened, real_init = [], Session.__init__
    monkeypatch.setattr(Session, "__init__", lambda self, *a, **k: opened.append(1) or real_init(self, *a, **k))
    code, out, err = _cli(["search", str(path), "--baselines", "--recover-steps", "10"], capsys)
    monkeypatch.undo()
    assert code == 0, err
    assert len(opened) == 1  # the search, the baselines and the four recoveries share one session (was one each)
    rows = _recovered_rows(out, 10)
    assert sorted(rows) == ["global", "lamp", "optuna", "uniform"]
    run_dir = Path(spec["output"]) / spec["name"]
    res = load(run_dir)
    summary = res.summary().set_index("strategy")
    assert (summary.recovered_steps == 10).all()
    for st, (val_before, val, test, macs) in rows.items():
        assert summary.loc[st, "metric_val"] == pytest.approx(val_before, abs=1e-4)
        assert summary.loc[st, "recovered_test"] == pytest.approx(test, abs=1e-4)
    code, out, err = _cli(["report", str(run_dir)], capsys)
    assert code == 0 and "recovered_test" in out and "--recover-steps 300" not in out
    # a recovery of another plan than the strategy's best (a search resumed since) is not reported
    rec = run_dir / "recovered" / "lamp" / "recovery.json"
    data = json.loads(rec.read_text())
    data["plan"]["ratios"] = {k: 0.0 for k in data["plan"]["ratios"]}
    rec.write_text(json.dumps(data))
    assert load(run_dir).recovered("lamp") is None and load(run_dir).recovered("uniform")["steps"] == 10
    # without --recover-steps the baselines are compared before recovery, and the CLI says so
    code, out, err = _cli(["search", str(path), "--baselines"], capsys)
    assert code == 0 and "--recover-steps 300" in out
    for d in (run_dir / "recovered").iterdir():  # no recovery on record: the report says how to compare after one
        (d / "recovery.json").unlink()
    code, out, err = _cli(["report", str(run_dir)], capsys)
    assert code == 0 and "recovered_test" not in out and "--recover-steps 300" in out


def test_notes_fold_to_the_width_with_the_text_indented():
    from autoprune.app.cli import wrap_note

    note = ("search.priors: auto skipped the sensitivity sweep: it would take 12.3 s of the 10.0 s left; "
            "set search.priors: sensitivity to sweep anyway, or raise search.timeout_s")
    out = wrap_note(note, width=60)
    lines = out.splitlines()
    assert len(lines) == 4 and all(len(line) <= 60 for line in lines)
    assert lines[0].startswith("note: search.priors: auto") and all(line.startswith("      ") for line in lines[1:])
    assert " ".join(line.strip() for line in lines) == "note: " + note  # nothing lost or broken inside a word
    assert wrap_note("short", width=60) == "note: short"


def test_the_summary_line_names_the_metric_and_gives_a_next_token_loss_as_perplexity():
    from autoprune.app.cli import _metric

    assert _metric(0.9123, "accuracy") == "accuracy 0.9123"
    assert _metric(-0.6931, "neg_nll") == "neg_nll -0.6931 (perplexity 2)"  # exp(0.6931)
    assert _metric(0.5, None) == "0.5000"  # a result.json written before results named their metric
