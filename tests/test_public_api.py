"""The public API on one screen: `import autoprune` exposes it, and its docstring examples run (doctest)."""

from __future__ import annotations

import doctest

import autoprune
import autoprune.task


def test_import_autoprune_exposes_the_api():
    for name in ("search", "load", "export", "Spec", "load_spec", "PruningPlan", "Task"):
        assert hasattr(autoprune, name), name
    from autoprune import api  # still there

    assert api.search is not None


def test_docstring_examples_run():
    for module in (autoprune, autoprune.task):
        res = doctest.testmod(module)
        assert res.attempted >= 2 and res.failed == 0, module.__name__
