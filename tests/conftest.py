"""Shared fixtures: small, fast specs over the zoo, with one output root per test session so that each zoo
model is trained once (its checkpoint is cached under <root>/_cache) and reused by every test."""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path

import pytest

os.environ.setdefault("AUTOPRUNE_PROGRESS", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ZOO_SPECS = {
    "cnn1d": {"model": {"factory": "autoprune.model.zoo:cnn1d", "input_shape": [1, 40]},
              "data": {"factory": "autoprune.model.data:mnist1d", "kwargs": {"num_samples": 3000}, "batch_size": 128},
              "train": {"epochs": 6, "lr": 0.01}},
    "resnet1d": {"model": {"factory": "autoprune.model.zoo:resnet1d", "input_shape": [1, 40]},
                 "data": {"factory": "autoprune.model.data:mnist1d", "kwargs": {"num_samples": 3000}, "batch_size": 128},
                 "train": {"epochs": 6, "lr": 0.01}},
    "digits_cnn": {"model": {"factory": "autoprune.model.zoo:digits_cnn", "input_shape": [1, 8, 8]},
                   "data": {"factory": "autoprune.model.data:digits", "batch_size": 64},
                   "train": {"epochs": 10, "lr": 0.01}},
    "resnet20": {"model": {"factory": "autoprune.model.zoo:resnet20", "input_shape": [1, 8, 8]},
                 "data": {"factory": "autoprune.model.data:digits", "batch_size": 64},
                 "train": {"epochs": 8, "lr": 0.01}},
    "resnext20": {"model": {"factory": "autoprune.model.zoo:resnext20", "input_shape": [1, 8, 8]},
                  "data": {"factory": "autoprune.model.data:digits", "batch_size": 64},
                  "train": {"epochs": 8, "lr": 0.01}},
    "mobilenetv2": {"model": {"factory": "autoprune.model.zoo:mobilenetv2", "input_shape": [1, 8, 8]},
                    "data": {"factory": "autoprune.model.data:digits", "batch_size": 64},
                    "train": {"epochs": 8, "lr": 0.01}},
}
_counter = itertools.count()


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    """One output root per session: trained checkpoints and sensitivity tables are shared through its _cache."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture
def make_spec(runs_root):
    """make_spec("cnn1d", budget={"macs": 0.5}, search={...}, name=None) -> a spec dict with a unique name."""

    def make(model: str = "cnn1d", *, name: str | None = None, budget: dict | None = None, **sections) -> dict:
        spec = copy.deepcopy(ZOO_SPECS[model])
        spec["name"] = name or f"{model}-{next(_counter)}-{os.getpid()}"
        spec["budget"] = budget or {"macs": 0.5}
        spec["output"] = str(runs_root)
        spec.setdefault("search", {}).update({"n_trials": 8})
        spec["evaluation"] = {"calibration_batches": 4}
        spec["sensitivity"] = {"ratios": [0.25, 0.5, 0.75]}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key].update(value)
            else:
                spec[key] = value
        return spec

    return make


def require_service(name: str, available: bool, why: str) -> None:
    """Skip when a system service is missing, except in CI (AUTOPRUNE_REQUIRE_SERVICES=1), where it fails."""
    if available:
        return
    if os.environ.get("AUTOPRUNE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{name} is required in CI but unavailable: {why}")
    pytest.skip(f"{name} unavailable: {why}")


def stored_study(spec_dict: dict, strategy: str = "optuna"):
    """The Optuna study a search of this spec wrote, read from its storage."""
    import optuna

    from autoprune.searching.studies import open_storage, storage_url, study_name
    from autoprune.spec import load_spec

    spec = load_spec(spec_dict)
    return optuna.load_study(study_name=study_name(spec, strategy), storage=open_storage(storage_url(spec)))


@pytest.fixture(scope="module")
def ray_runtime():
    """One local Ray runtime for a module (2-4 s and ~700 MB each time it starts): `pytestmark = usefixtures`."""
    ray = pytest.importorskip("ray")
    from autoprune.searching.ray_backend import init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(num_cpus=2)
    yield
    ray.shutdown()
