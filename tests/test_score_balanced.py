"""search.score: balanced: trials ranked by the metric plus BALANCE_WEIGHT x the pruned model's width balance."""

from __future__ import annotations

import pytest
import torch

from autoprune.app.session import Session
from autoprune.pruning.plan import PruningPlan
from autoprune.searching.objective import trial_attrs
from autoprune.spec import load_spec


def test_score_balanced_ranks_by_the_metric_plus_the_width_balance(make_spec):
    import optuna
    from optuna.trial import TrialState

    from autoprune.app import api
    from autoprune.results import plots
    from autoprune.results.tables import load
    from autoprune.searching.objective import BALANCE_WEIGHT, width_balance
    from autoprune.searching.studies import open_storage, storage_url, study_name

    spec = make_spec("resnet1d", budget={"macs": 0.3}, search={"n_trials": 8, "priors": "none", "score": "balanced"})
    s = Session(load_spec(spec), show_progress=False)
    result = api.search(s, show_progress=False, test=False)
    study = optuna.load_study(storage=open_storage(storage_url(s.spec)), study_name=study_name(s.spec, "optuna"))
    assert study.user_attrs["score"] == "balanced:0.2"
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 8
    for t in done:
        a = trial_attrs(t)
        widths = [m.out_channels for m in s.pruner.apply(PruningPlan.from_dict(a["plan"])).modules()
                  if isinstance(m, torch.nn.Conv1d)]
        cv = torch.tensor(widths, dtype=torch.float64).std(unbiased=False) / torch.tensor(widths, dtype=torch.float64).mean()
        assert a["width_balance"] == pytest.approx(-float(cv)) and a["width_balance"] < 0
        assert t.values[0] == pytest.approx(a["metric"] + BALANCE_WEIGHT * a["width_balance"])
    best = max((t for t in done if trial_attrs(t)["feasible"]), key=lambda t: t.values[0])
    assert result["best"]["trial"] == best.number and result["best"]["metric"] == trial_attrs(best)["metric"]
    # the balance tells plans apart: LAMP's (nearly equal widths) is more balanced than uniform's (the unpruned
    # model's proportions), and the ranking differs from the metric's
    warm = {trial_attrs(t)["warm_start"]: trial_attrs(t)["width_balance"] for t in done if "warm_start" in trial_attrs(t)}
    assert warm["lamp"] > warm["uniform"]
    assert [t.number for t in sorted(done, key=lambda t: -trial_attrs(t)["metric"])] != \
        [t.number for t in sorted(done, key=lambda t: -t.values[0])]
    assert set(plots.best_so_far(load(s.run_dir)).ranked_by) == {"metric + width balance"}
    assert "width balance" in plots.search_progress(load(s.run_dir)).layout.yaxis.title.text
    # a model with equal widths everywhere is perfectly balanced; one without two convolutions counts as balanced
    assert width_balance(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))) == 0.0
    assert width_balance(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 24, 3))) == pytest.approx(-0.5)
    assert width_balance(torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 64))) == 0.0
    # a resumed study keeps its weight: another one is an error naming both
    from autoprune.errors import AutopruneError

    other = {**spec, "search": {**spec["search"], "balance_weight": 0.1, "n_trials": 10}}
    with pytest.raises(AutopruneError, match="balanced:0.2.*balanced:0.1"):
        api.search(other, show_progress=False, test=False)
    with pytest.raises(Exception, match="search.score: balanced ranks single-objective"):
        load_spec(make_spec("cnn1d", search={"score": "balanced", "objectives": ["accuracy", "macs"]}))


def test_the_default_score_is_balanced_where_it_was_measured_and_the_metric_elsewhere(make_spec):
    from autoprune.searching.studies import search_score

    def score(strategy="optuna", **search):
        return search_score(load_spec(make_spec("cnn1d", search=search)), strategy)

    assert score() == "balanced:0.2" and score(balance_weight=0.5) == "balanced:0.5"
    assert score(objectives=["accuracy", "macs"]) == "metric"  # a Pareto front compares plans by the metric
    assert score(recovery_rungs=[10, 30]) == "metric"  # so do the rungs
    assert score("random") == "metric"  # the random baseline stays plain unless asked
    assert score("random", score="balanced") == "balanced:0.2"
    assert score("netadapt") == "metric" and score(score="metric") == "metric" and score(score="loss") == "loss"


def test_a_study_made_before_the_default_changed_resumes_by_its_own_score(make_spec):
    """A study created ranking by the metric (the default before) resumes so under the default (auto); asking for
    another score explicitly is still an error naming both."""
    import optuna

    from autoprune.app import api
    from autoprune.errors import AutopruneError
    from autoprune.searching.studies import open_storage, storage_url, study_name

    spec = make_spec("cnn1d", budget={"macs": 0.5}, search={"n_trials": 4, "priors": "none", "score": "metric"})
    api.search(spec, show_progress=False, test=False)
    auto = {**spec, "search": {**spec["search"], "score": "auto", "n_trials": 6}}
    api.search(auto, show_progress=False, test=False)
    s = Session(load_spec(auto), show_progress=False)
    study = optuna.load_study(storage=open_storage(storage_url(s.spec)), study_name=study_name(s.spec, "optuna"))
    assert study.user_attrs["score"] == "metric"
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 6 and all(t.values[0] == trial_attrs(t)["metric"] for t in done)
    with pytest.raises(AutopruneError, match="ranks its trials by the metric.*balanced:0.2"):
        api.search({**auto, "search": {**auto["search"], "score": "balanced", "n_trials": 8}}, show_progress=False,
                   test=False)
