"""`sensitivity.skip_insensitive` (off by default): each group is evaluated at its largest ratio first; a group whose
drop there is within the search's tolerance gets one row and no further evaluations, every other group's rows are
exactly the full sweep's, and the evaluation count is the number of evaluations really run."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ZOO_SPECS

from autoprune.app import api
from autoprune.sensitivity.sweep import _key, run_sensitivity, upper_bounds

RATIOS = [0.25, 0.5, 0.75]


class Counting:
    """The session's evaluator, counting its calls."""

    def __init__(self, ev) -> None:
        self.ev, self.calls = ev, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.ev(*a, **k)

    def __getattr__(self, name):
        return getattr(self.ev, name)


@pytest.fixture(scope="module")
def session(runs_root):
    """The conftest's cnn1d (its checkpoint shared with the other tests), one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = {**copy.deepcopy(ZOO_SPECS["cnn1d"]), "name": "skip-insensitive", "output": str(runs_root),
            "budget": {"macs": 0.5}, "evaluation": {"calibration_batches": 4}}
    yield api.session(spec, show_progress=False)
    torch.set_num_threads(threads)


def sweep(s, **kw):
    ev = Counting(s.evaluator)
    res = run_sensitivity(s.pruner, ev, s.cost_model, ratios=RATIOS, show_progress=False, **kw)
    assert res.evaluations == ev.calls  # the count is what ran, probes that left no row included
    return res


def test_insensitive_groups_get_one_row_and_the_others_the_full_sweep(session):
    full = sweep(session, stop_drop=0.5)
    assert full.evaluations == 1 + len(full.table)
    top = full.table[full.table.ratio == RATIOS[-1]].set_index("group")["drop"]
    # a tolerance between the groups' drops at 0.75, so that both kinds of group are there
    tol = float(top.sort_values().iloc[len(top) // 2 - 1]) + 1e-9
    insensitive = set(top[top <= tol].index)
    assert 0 < len(insensitive) < full.table.group.nunique(), top.to_dict()

    skip = sweep(session, stop_drop=0.5, skip_within=tol)
    for g, rows in skip.table.groupby("group"):
        ref = full.table[full.table.group == g]
        if g in insensitive:
            assert rows.ratio.tolist() == [RATIOS[-1]]
            assert rows.metric.iloc[0] == pytest.approx(ref[ref.ratio == RATIOS[-1]].metric.iloc[0], abs=1e-9)
        else:
            assert rows.ratio.tolist() == ref.ratio.tolist()
            assert rows.metric.to_numpy() == pytest.approx(ref.metric.to_numpy(), abs=1e-9)
    assert skip.evaluations == full.evaluations - 2 * len(insensitive)
    # an insensitive group is bounded by max_ratio either way
    names = session.pruner.prunable_names
    ub_full = upper_bounds(full.table, names, tol, session.pruner.max_ratio)
    ub_skip = upper_bounds(skip.table, names, tol, session.pruner.max_ratio)
    assert all(ub_skip[g] == ub_full[g] == session.pruner.max_ratio for g in insensitive)


def test_a_probe_past_where_the_sweep_stops_is_counted_but_left_out(session):
    # every drop above 1e-9 stops a group's sweep: the probe at 0.75 runs, fails, and the ascending sweep stops
    # before it, so the table is the full sweep's and the evaluation count has one more per such group
    full = sweep(session, stop_drop=1e-9)
    skip = sweep(session, stop_drop=1e-9, skip_within=-1.0)  # no group is within a negative tolerance
    assert skip.table[["group", "ratio"]].values.tolist() == full.table[["group", "ratio"]].values.tolist()
    stopped_early = sum(RATIOS[-1] not in set(r.ratio) for _, r in full.table.groupby("group"))
    assert stopped_early > 0
    assert skip.evaluations == full.evaluations + stopped_early


def test_the_setting_reaches_the_sweep_and_the_cache_keeps_them_apart(session, tmp_path):
    assert not session.spec.sensitivity.skip_insensitive  # the default: the full sweep
    pm, ev = session.pruner, session.evaluator
    assert _key(pm, ev, RATIOS, 0.5, None) != _key(pm, ev, RATIOS, 0.5, None, 0.05)
    # a tolerance no drop exceeds: every group is insensitive, one evaluation each after the baseline's
    spec = session.spec.model_dump(mode="json")
    spec["search"]["tolerance"] = 1.0
    # ratios of its own: the run root's cache must not serve another test's full table (0 evaluations)
    ratios = [0.3, 0.55, 0.8]
    spec["sensitivity"]["ratios"] = ratios
    off = api.session({**spec, "name": "skip-off"}, show_progress=False).sensitivity()
    on = api.session({**spec, "name": "skip-on", "sensitivity": {**spec["sensitivity"], "skip_insensitive": True}},
                     show_progress=False).sensitivity()
    n = len(session.pruner.prunable_names)
    assert off.evaluations == 1 + len(off.table) == 1 + n * len(ratios)
    assert on.evaluations == 1 + len(on.table) == 1 + n
    assert on.table.ratio.tolist() == [max(ratios)] * n


def test_the_cli_marks_what_was_not_evaluated(session, tmp_path, capsys):
    import yaml

    from autoprune.app.cli import main

    full = sweep(session, stop_drop=0.5)
    top = full.table[full.table.ratio == RATIOS[-1]].set_index("group")["drop"]
    tol = float(top.sort_values().iloc[len(top) // 2 - 1]) + 1e-9  # some groups within it, some not
    spec = session.spec.model_dump(mode="json")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec, "name": "skip-cli"}))
    try:
        main(["sensitivity", str(path), "--set", "sensitivity.skip_insensitive=true", "--set", f"search.tolerance={tol}"])
    except SystemExit as e:
        assert not e.code
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.split() and ln.split()[0] in top.index}
    assert len(rows) == len(top), out
    for g, cells in rows.items():
        if top[g] <= tol:  # insensitive: only its largest ratio was evaluated
            assert cells[:2] == ["-", "-"] and float(cells[2]) == pytest.approx(top[g], abs=1e-3), out
        else:  # the full sweep's numbers ('-' past where its drop passed stop_drop)
            ref = full.table[full.table.group == g].set_index("ratio")["drop"]
            want = [round(float(ref[r]), 3) if r in ref.index else "-" for r in RATIOS]
            assert [c if c == "-" else float(c) for c in cells] == pytest.approx(want, abs=1e-3), out
    assert "-: not evaluated" in out and "nan" not in out.lower()


def test_a_timeout_note_offers_the_cheaper_sweep_only_while_it_is_off():
    from autoprune.searching.studies import timeout_note

    off = timeout_note(10.0, 3, 60, 8.0, sweep_skips=False)
    on = timeout_note(10.0, 3, 60, 8.0, sweep_skips=True)
    assert "after 3 of 60 trials" in off and "8.0 s of it (80%)" in off
    assert "skip_insensitive: true" in off and "skip_insensitive" not in on
    assert "search.priors: none" in off and "search.priors: none" in on
    assert "skip_insensitive" not in timeout_note(10.0, 3, 60, 2.0, sweep_skips=False)  # the sweep was not the cost
    # a sweep that search.priors: auto chose (it fitted 2/3 of the limit) is not second-guessed
    chosen = timeout_note(10.0, 3, 60, 6.0, sweep_skips=True, auto_swept=True)
    assert chosen.endswith("6.0 s of it (60%); raise timeout_s") and "priors" not in chosen
