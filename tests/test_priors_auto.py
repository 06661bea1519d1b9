"""search.priors: auto: under search.timeout_s the sensitivity sweep runs only when it fits in 2/3 of the time left."""

from __future__ import annotations

from autoprune.app.api import summarize
from autoprune.app.session import Session
from autoprune.searching.objective import trial_attrs
from autoprune.searching.study import run_search
from autoprune.spec import load_spec

# each test sweeps with its own sensitivity.stop_drop, so no sweep is found in the session's shared cache


def _search(spec: dict):
    return run_search(Session(load_spec(spec), show_progress=False), show_progress=False)


def _warm_starts(run) -> list[str]:
    return sorted(a["warm_start"] for a in (trial_attrs(t) for t in run.study.trials) if "warm_start" in a)


def test_auto_priors_skip_a_sweep_that_would_outlast_two_thirds_of_the_time_limit_and_a_resume_keeps_that(make_spec):
    spec = make_spec("cnn1d", search={"n_trials": 4, "timeout_s": 1e-3}, sensitivity={"stop_drop": 0.61})
    run = _search(spec)
    assert run.priors == "none"
    assert sum("skipped the sensitivity sweep" in n for n in run.notes) == 1
    assert run.sensitivity_evaluations == 1  # the evaluation that timed it, and no sweep
    pm = run.space.pm
    assert all(run.space.bounds[n] == pm.max_ratio for n in pm.prunable_names)  # no bounds
    assert 1 <= run.n_complete < 4
    assert summarize(run, test=False)["priors"] == "none"
    # resumed without a limit, the study keeps the space it began with: no sweep, the same three warm starts
    spec["search"] = {**spec["search"], "timeout_s": None, "n_trials": 6}
    again = _search(spec)
    assert again.priors == "none" and again.sensitivity_evaluations == 0 and again.n_complete == 6
    assert _warm_starts(again) == ["global", "lamp", "uniform"]


def test_auto_priors_keep_a_sweep_that_fits_and_it_reuses_the_timing_evaluation(make_spec):
    timed = _search(make_spec("cnn1d", search={"n_trials": 3, "timeout_s": 3600}, sensitivity={"stop_drop": 0.62}))
    plain = _search(make_spec("cnn1d", search={"n_trials": 3}, sensitivity={"stop_drop": 0.63}))
    assert timed.priors == plain.priors == "sensitivity"
    assert not any("skipped" in n for n in timed.notes)
    assert timed.sensitivity_evaluations == plain.sensitivity_evaluations > 10
    a, b = (r.session.sensitivity().table for r in (timed, plain))
    assert a[["group", "ratio", "metric", "drop"]].equals(b[["group", "ratio", "metric", "drop"]])
    assert _warm_starts(timed) == ["global", "lamp", "sensitivity-greedy", "uniform"]


def test_explicit_sensitivity_priors_sweep_under_any_limit_and_a_cached_sweep_is_used_by_auto(make_spec):
    explicit = _search(make_spec("cnn1d", search={"n_trials": 2, "timeout_s": 1e-3, "priors": "sensitivity"},
                                 sensitivity={"stop_drop": 0.64}))
    assert explicit.priors == "sensitivity" and explicit.sensitivity_evaluations > 10
    cached = _search(make_spec("cnn1d", search={"n_trials": 2, "timeout_s": 1e-3}, sensitivity={"stop_drop": 0.64}))
    assert cached.priors == "sensitivity" and cached.sensitivity_evaluations == 0
    assert not any("skipped" in n for n in cached.notes)


def test_the_cli_time_limit_flag_reaches_the_search_and_its_note_is_printed(make_spec, tmp_path, capsys):
    import yaml

    from autoprune.app.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(make_spec("cnn1d", search={"n_trials": 3}, sensitivity={"stop_drop": 0.65})))
    try:
        main(["search", str(path), "--timeout-s", "0.001"])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr().out
    assert code == 0
    assert "note: search.priors: auto skipped the sensitivity sweep" in out
    assert "note: search.timeout_s (0.001 s) stopped the search after 1 of 3 trials" in out
