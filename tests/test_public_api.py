"""The public API on one screen: `import autoprune` exposes it, and its docstring examples run (doctest); the
layout keeps its promises (no import circles, nothing importing up the pipeline, deprecated paths still work)."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import warnings
from pathlib import Path

import pytest

import autoprune
import autoprune.model.task
import autoprune.pruning.plan
import autoprune.settings

PKG = Path(autoprune.__file__).parent
# the pipeline, bottom to top: a module may import only from its own stage or a stage below it
STAGES = ["errors", "settings", "_progress", "spec", "model", "pruning", "costs", "sensitivity", "searching",
          "results", "exporting", "app", "api", "__init__"]


def test_import_autoprune_exposes_the_api():
    for name in ("search", "load", "export", "Spec", "load_spec", "PruningPlan", "Task"):
        assert hasattr(autoprune, name), name
    from autoprune.app import api  # the front door behind it
    # importing the export and search stages must not shadow the API's functions of the same names
    importlib.import_module("autoprune.exporting.files")
    importlib.import_module("autoprune.searching.study")

    assert inspect.isfunction(autoprune.search) and inspect.isfunction(autoprune.export)
    assert api.search is not None


def test_docstring_examples_run():
    for module in (autoprune, autoprune.model.task, autoprune.settings, autoprune.pruning.plan):
        res = doctest.testmod(module)
        assert res.attempted >= 1 and res.failed == 0, module.__name__


def _stage(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else "__init__"
    return STAGES.index(part.removesuffix(".py"))


def test_imports_only_point_down_the_pipeline():
    up = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts).removesuffix(".__init__") if rel.name == "__init__" else ".".join(rel.parts)
        if mod == "autoprune":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for target in names:
                if target.startswith("autoprune.") and _stage(target) > _stage(mod):
                    up.append(f"{mod} -> {target}")
    assert not up, up


def test_deprecated_paths_still_work_with_a_warning():
    import sys

    sys.modules.pop("autoprune.api", None)
    with pytest.warns(DeprecationWarning, match="autoprune.api is deprecated"):
        api = importlib.import_module("autoprune.api")
    assert api.search is autoprune.app.api.search
    from autoprune.model.factories import import_object

    with pytest.warns(DeprecationWarning, match="write 'autoprune.model.zoo:cnn1d'"):
        assert import_object("autoprune.zoo:cnn1d") is autoprune.model.zoo.cnn1d


def test_settings_are_typed_and_read_from_the_environment():
    s = autoprune.settings.Settings.from_env({"AUTOPRUNE_PROGRESS": "0", "AUTOPRUNE_LATENCY_PREDICTOR": "measure"})
    assert s.progress is False and s.latency_predictor == "measure" and s.latency_max_error == 0.05
    with pytest.raises(autoprune.AutopruneError, match="AUTOPRUNE_LATENCY_MAX_ERROR='x'"):
        autoprune.settings.Settings.from_env({"AUTOPRUNE_LATENCY_MAX_ERROR": "x"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert autoprune.settings.configure(s) is autoprune.settings.get()
    autoprune.settings.configure()  # back to the environment
