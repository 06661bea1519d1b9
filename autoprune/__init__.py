"""autoprune: find how much to prune each layer of a PyTorch model under a real budget.

The public API fits on one screen:

    import autoprune
    result = autoprune.search("search_spaces/mnist1d-cnn-macs50.yaml", n_trials=40)   # run or resume a search
    runs = autoprune.load("runs/mnist1d-cnn-macs50")          # DataFrames: runs.trials, runs.summary()
    out = autoprune.export("search_spaces/mnist1d-cnn-macs50.yaml")   # the physically smaller model
    autoprune.Spec, autoprune.load_spec                        # the validated spec
    autoprune.PruningPlan                                      # one ratio per prunable group
    autoprune.Task                                             # subclass it to bring your own loss and metric

`search`, `load` and `export` import the pipeline on first use, so `import autoprune` stays light.

    >>> import autoprune
    >>> spec = autoprune.load_spec({"name": "demo", "model": {"factory": "autoprune.model.zoo:cnn1d"}, "budget": {"macs": 0.5}})
    >>> spec.task.kind, spec.budget.kind, spec.budget.value
    ('classification', 'macs', 0.5)
"""

from __future__ import annotations

from typing import Any

from autoprune.errors import AutopruneError
from autoprune.pruning.plan import PruningPlan
from autoprune.spec import Spec, load_spec
from autoprune.model.task import Task


def search(spec: Any, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) the search a spec describes; see `autoprune.app.api.search`."""
    from autoprune.app import api

    return api.search(spec, **kwargs)


def load(run_dir: Any, **kwargs: Any) -> Any:
    """A run directory's trials, results and sensitivity as DataFrames; see `autoprune.results.tables.load`."""
    from autoprune.results.tables import load as _load

    return _load(run_dir, **kwargs)


def export(spec: Any, **kwargs: Any) -> Any:
    """Apply the best (or a given) plan and write the smaller model; see `autoprune.app.api.export`."""
    from autoprune.app import api

    return api.export(spec, **kwargs)


__all__ = ["search", "load", "export", "Spec", "load_spec", "PruningPlan", "Task", "AutopruneError"]
