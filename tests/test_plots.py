"""Figures on a real small run: an Optuna search in constraint mode (so some trials are over the budget), the
uniform and NetAdapt baselines, and the sensitivity table; plus the same run while its study is still running."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import optuna
import pytest

from autoprune.app import api

from autoprune.results import plots
from autoprune.errors import AutopruneError
from autoprune.results.tables import load
from autoprune.searching.space import pareto_mask
from autoprune.searching.studies import open_storage

from conftest import ZOO_SPECS

N_TRIALS = 10
BUDGET = 0.35  # with constraint mode, TPE proposes plans on both sides of it (the 4 warm starts are on budget)


def build_run(root: Path, name: str = "plots-cnn1d") -> Path:
    """A real small run under `root` (the session's shared runs root, so the model is trained once)."""
    spec = copy.deepcopy(ZOO_SPECS["cnn1d"])  # the same settings as conftest.make_spec("cnn1d", ...)
    spec.update(name=f"{name}-{os.getpid()}", budget={"macs": BUDGET}, output=str(root),
                evaluation={"calibration_batches": 4}, sensitivity={"ratios": [0.25, 0.5, 0.75]},
                search={"n_trials": N_TRIALS, "budget_mode": "constraint", "seed": 0})
    s = api.session(spec, show_progress=False)
    api.search(s, show_progress=False)
    for b in ("uniform", "global"):  # one evaluation each
        api.search(s, strategy=b, show_progress=False, test=False)
    return s.run_dir


@pytest.fixture(scope="session")
def plot_run(runs_root) -> Path:
    return build_run(runs_root)


@pytest.fixture(scope="module")
def res(plot_run):
    return load(plot_run)


def _by_role(fig, role):
    return [t for t in fig.data if (t.meta or {}).get("role") == role]


def test_pareto_figure_draws_every_trial_once_and_infeasible_never_on_the_front(res):
    t = res.trials[(res.trials.strategy == "optuna") & (res.trials.state == "COMPLETE")]
    assert len(t) == N_TRIALS
    n_infeasible = int((~t.feasible).sum())
    assert 0 < n_infeasible < N_TRIALS  # constraint mode: the sampler proposed some plans over the budget
    fig = plots.pareto_figure(res, "macs")
    front, dominated, infeasible = _by_role(fig, "Pareto front"), _by_role(fig, "dominated"), _by_role(fig, "infeasible")
    assert len(front) == len(dominated) == len(infeasible) == 1
    drawn = [int(n) for tr in (front + dominated + infeasible) for n in tr.customdata]
    assert sorted(drawn) == sorted(t.number.astype(int))  # every completed trial exactly once
    assert len(infeasible[0].x) == n_infeasible
    feasible = set(t[t.feasible].number.astype(int))
    on_front = [int(n) for n in front[0].customdata]
    assert on_front and set(on_front) <= feasible  # no infeasible trial is a Pareto point
    assert all(x > BUDGET for x in infeasible[0].x)  # infeasible = over the MACs budget
    pts = list(zip(front[0].y, front[0].x))
    assert all(pareto_mask(pts))  # the drawn front is mutually non-dominated
    # every dominated feasible trial really is dominated by a front point
    for x, y in zip(dominated[0].x, dominated[0].y):
        assert any(fy >= y and fx <= x and (fy > y or fx < x) for fx, fy in zip(front[0].x, front[0].y))
    # budget line at the MACs fraction, axis titles
    shapes = [s for s in fig.layout.shapes if s.name == "budget"]
    assert len(shapes) == 1 and shapes[0].x0 == shapes[0].x1 == pytest.approx(BUDGET)
    assert fig.layout.xaxis.title.text.startswith("MACs")
    assert fig.layout.yaxis.title.text == "val accuracy"
    # baselines and the chosen plan as labelled markers at their result's coordinates
    base = {t.meta["strategy"]: t for t in _by_role(fig, "baseline")}
    assert set(base) == {"uniform", "global"}
    for s, tr in base.items():
        b = res.results[s]["best"]
        assert (tr.x[0], tr.y[0]) == pytest.approx((b["macs_ratio"], b["metric_val"]))
    labels = {a.text.replace("<b>", "").replace("</b>", "") for a in fig.layout.annotations}
    assert {"uniform", "global", "chosen (optuna)"} <= labels
    (star,) = _by_role(fig, "chosen")
    assert star.y[0] == pytest.approx(res.results["optuna"]["best"]["metric_val"]) and star.x[0] <= BUDGET
    (unpruned,) = _by_role(fig, "unpruned")
    assert unpruned.x[0] == 1.0 and unpruned.y[0] == pytest.approx(res.results["optuna"]["baseline"]["metric_val"])
    # hover shows the trial number and plan summary
    assert any(f"trial {on_front[0]}" in h and "features.0.0:" in h for h in front[0].hovertext)


def test_pareto_figure_other_axes_and_inputs(res, plot_run):
    fig = plots.pareto_figure(res, "params")
    assert fig.layout.xaxis.title.text.startswith("parameters")
    assert not [s for s in fig.layout.shapes if s.name == "budget"]  # the budget is on MACs, not params
    # a run path and the trials DataFrame give the same trial points
    by_path = plots.pareto_figure(plot_run)
    by_df = plots.pareto_figure(res.trials)
    n = lambda f: sum(len(t.x) for t in f.data if (t.meta or {}).get("role") in ("Pareto front", "dominated", "infeasible"))
    assert n(by_path) == n(by_df) == N_TRIALS
    with pytest.raises(AutopruneError, match="x='flops'"):
        plots.pareto_figure(res, "flops")


def test_figures_work_while_the_study_is_still_running(plot_run, tmp_path):
    run = tmp_path / "running"
    shutil.copytree(plot_run, run)
    for p in run.glob("result*.json"):
        p.unlink()  # no result yet: the search has not finished
    st = open_storage(str(run / "study.journal"))
    study = optuna.load_study(study_name=f"{plot_run.name}:optuna", storage=st)
    study.ask()  # a trial in flight
    res = load(run)
    assert (res.trials.state == "RUNNING").sum() == 1 and not res.results
    fig = plots.pareto_figure(run)
    drawn = sum(len(t.x) for t in fig.data if (t.meta or {}).get("role") in ("Pareto front", "dominated", "infeasible"))
    assert drawn == N_TRIALS  # the running trial has no metric yet and is not drawn
    assert [s.x0 for s in fig.layout.shapes if s.name == "budget"] == [pytest.approx(BUDGET)]  # budget from the spec
    assert not _by_role(fig, "baseline") and not _by_role(fig, "unpruned")
    prog = plots.search_progress(run)
    assert {t.meta["strategy"] for t in prog.data} == {"optuna", "uniform", "global"}
    with pytest.raises(AutopruneError, match="no chosen plan"):
        plots.ratio_profile(run)


def test_ratio_profile_in_network_order_with_channels_and_macs_share(res):
    fig = plots.ratio_profile(res, "optuna", ["uniform", "global", "netadapt"])
    plans = [t for t in fig.data if (t.meta or {}).get("role") == "plan"]
    assert [t.meta["strategy"] for t in plans] == ["optuna", "uniform", "global"]  # netadapt has no result: left out
    chosen = res.results["optuna"]["best"]["plan"]["ratios"]
    groups = [x.split("<br>")[0] for x in plans[0].x]
    assert groups == list(chosen)  # plan key order = network order
    assert list(plans[0].y) == pytest.approx(list(chosen.values()))
    s = api.session(res.spec, show_progress=False)
    table = s.pruner.table().set_index("group")
    assert [int(x.split("<br>")[1].split()[0]) for x in plans[0].x] == [int(table.channels[g]) for g in groups]
    (share,) = [t for t in fig.data if (t.meta or {}).get("role") == "macs_share"]
    shares = s.cost_model.macs_shares()
    assert list(share.y) == pytest.approx([100 * shares[g] for g in groups])
    assert all(0 < v <= 100 for v in share.y)
    # without loading the model the shares come from the sensitivity table, and agree
    fallback = plots.group_table(res, use_session=False).set_index("group")
    assert [fallback.macs_share[g] for g in groups] == pytest.approx([shares[g] for g in groups], rel=0.02)
    assert fig.layout.yaxis.title.text == "pruning ratio" and fig.layout.xaxis2.title.text == "group (network order)"


def test_sensitivity_curves_and_heatmap(res):
    sens = res.sensitivity
    groups = list(dict.fromkeys(sens.group))
    fig = plots.sensitivity_curves(res)
    assert len(fig.data) == len(groups) == 4
    for tr, g in zip(fig.data, groups):
        d = sens[sens.group == g].sort_values("ratio")
        assert tr.name.startswith(g) and list(tr.x) == list(d.ratio) and list(tr.y) == pytest.approx(list(d["drop"]))
    assert [s.y0 for s in fig.layout.shapes if s.name == "tolerance"] == [pytest.approx(0.05)]
    assert fig.layout.xaxis.title.text == "pruning ratio of the group"
    assert fig.layout.yaxis.title.text == "val metric drop"
    hm = plots.sensitivity_heatmap(res)
    (h,) = hm.data
    assert len(h.z) == len(groups) and len(h.z[0]) == sens.ratio.nunique() == 3
    assert [y.split(" ")[0] for y in h.y] == groups
    assert sens.set_index(["group", "ratio"])["drop"][(groups[0], 0.5)] == pytest.approx(h.z[0][1])


def test_search_progress_best_so_far(res):
    fig = plots.search_progress(res)
    assert len(fig.data) == 2 * 3  # optuna, uniform, global; against evaluations and wall time
    line = plots.best_so_far(res)
    for tr in fig.data:
        s = tr.meta["strategy"]
        t = res.trials[(res.trials.strategy == s) & (res.trials.state == "COMPLETE") & res.trials.feasible]
        # the line ends at the metric of the trial the search ranks best (by its score: the default search ranks
        # by the metric plus the width balance, the heuristics by the metric)
        assert tr.y[-1] == pytest.approx(t.loc[t.score.idxmax(), "metric"])
        if set(line[line.strategy == s].ranked_by) == {"metric"}:
            assert list(tr.y) == sorted(tr.y)  # the best metric so far never decreases
    assert set(line[line.strategy == "optuna"].ranked_by) == {"metric + width balance"}
    assert set(line[line.strategy != "optuna"].ranked_by) == {"metric"}
    ev = [t for t in fig.data if t.meta["x"] == "evaluation" and t.meta["strategy"] == "optuna"][0]
    assert max(ev.x) == N_TRIALS
    assert fig.layout.xaxis.title.text.startswith("evaluations") and fig.layout.xaxis2.title.text.startswith("wall time")
    assert fig.layout.yaxis.title.text == ("best feasible val accuracy so far (the best by metric + width balance "
                                           "where search.score: balanced)")


def test_html_report_from_the_cli(plot_run, tmp_path):
    from typer.testing import CliRunner

    from autoprune.app.cli import app

    out = tmp_path / "r" / "report.html"
    r = CliRunner().invoke(app, ["report", str(plot_run), "--html", str(out)])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert page.count("Plotly.newPlot") == 5  # pareto, ratio profile, progress, sensitivity curves, heatmap
    for fid in ("pareto", "ratio_profile", "progress", "sensitivity_curves", "sensitivity_heatmap"):
        assert f'id="{fid}"' in page
    assert "<script src=" not in page and len(page) > 3_000_000  # plotly.js inlined: works offline
    assert "Best plan per strategy" in page and "global" in page
    r = CliRunner().invoke(app, ["report", str(plot_run), "--html", str(tmp_path)])
    # the app raises AutopruneError (autoprune.app.cli.main turns it into exit code 2)
    assert isinstance(r.exception, AutopruneError) and "is a directory" in str(r.exception)
