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
    """Run (or resume) the search a spec describes (a path, a dict or a `Spec`); returns the result, which is
    also written to the run directory (`autoprune.app.api.search` has the options).

    >>> import tempfile, autoprune
    >>> spec = {"name": "doc", "model": {"factory": "autoprune.model.zoo:digits_cnn", "input_shape": [1, 8, 8]},
    ...         "data": {"factory": "autoprune.model.data:digits"}, "train": {"epochs": 1},
    ...         "budget": {"macs": 0.5}, "search": {"n_trials": 2, "priors": "none"}, "output": tempfile.mkdtemp()}
    >>> result = autoprune.search(spec, show_progress=False, test=False)
    >>> result["n_trials_complete"], result["best"]["macs_ratio"] <= 0.5
    (2, True)
    """
    from autoprune.app import api

    return api.search(spec, **kwargs)


def load(run_dir: Any, **kwargs: Any) -> Any:
    """A run directory (or its spec) read back as pandas DataFrames: `runs.trials` (one row per trial),
    `runs.summary()`, `runs.sensitivity`, `runs.groups`; it works while a search is still running.

    >>> import tempfile, autoprune
    >>> spec = {"name": "doc", "model": {"factory": "autoprune.model.zoo:digits_cnn", "input_shape": [1, 8, 8]},
    ...         "data": {"factory": "autoprune.model.data:digits"}, "train": {"epochs": 1},
    ...         "budget": {"macs": 0.5}, "search": {"strategy": "uniform"}, "output": tempfile.mkdtemp()}
    >>> _ = autoprune.search(spec, show_progress=False, test=False)
    >>> runs = autoprune.load(autoprune.load_spec(spec).run_dir)
    >>> list(runs.trials.state), list(runs.summary().strategy)
    (['COMPLETE'], ['uniform'])
    """
    from autoprune.results.tables import load as _load

    return _load(run_dir, **kwargs)


def export(spec: Any, **kwargs: Any) -> Any:
    """Apply the best (or a given) plan and write the physically smaller model: `model.pt` (a state dict),
    `example.pt`, `manifest.json`, `costs.json`, `model.onnx` (unless `onnx=False`) and, for a `transformers`
    model, `hf/` (`save_pretrained`); `autoprune.exporting.files.load_pruned(dir)` rebuilds it.

    >>> import tempfile, autoprune
    >>> spec = {"name": "doc", "model": {"factory": "autoprune.model.zoo:digits_cnn", "input_shape": [1, 8, 8]},
    ...         "data": {"factory": "autoprune.model.data:digits"}, "train": {"epochs": 1},
    ...         "budget": {"macs": 0.5}, "search": {"strategy": "uniform"}, "output": tempfile.mkdtemp()}
    >>> _ = autoprune.search(spec, show_progress=False, test=False)
    >>> out = autoprune.export(spec, strategy="uniform", onnx=False, show_progress=False)
    >>> sorted(p.name for p in out.iterdir())
    ['costs.json', 'example.pt', 'manifest.json', 'model.pt']
    """
    from autoprune.app import api

    return api.export(spec, **kwargs)


__all__ = ["search", "load", "export", "Spec", "load_spec", "PruningPlan", "Task", "AutopruneError"]
