"""Tests for autoprune.model.zoo (model zoo) and autoprune.model.data (offline datasets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from autoprune.model import data as apdata
from autoprune.model.data import digits, input_shape_of, mnist1d
from autoprune.model.zoo import ZOO

INPUT_SHAPES = {
    "cnn1d": (1, 40),
    "resnet1d": (1, 40),
    "digits_cnn": (1, 8, 8),
    "resnet20": (1, 8, 8),
    "resnext20": (1, 8, 8),
    "mobilenetv2": (1, 8, 8),
}

# Prunable groups observed with torch-pruning 1.6 (fc ignored, roots = Conv1d/Conv2d/Linear):
# cnn1d 4, resnet1d 9, digits_cnn 4, resnet20 12, resnext20 15, mobilenetv2 10.
EXPECTED_GROUPS = {"cnn1d": 4, "resnet1d": 9, "digits_cnn": 4, "resnet20": 12, "resnext20": 15, "mobilenetv2": 10}


def test_zoo_names() -> None:
    assert set(ZOO) == set(INPUT_SHAPES)


@pytest.mark.parametrize("name", sorted(INPUT_SHAPES))
def test_forward_shape_and_fc(name: str) -> None:
    torch.manual_seed(0)
    model = ZOO[name]().eval()
    assert isinstance(model.fc, nn.Linear)
    assert model.fc.out_features == 10
    with torch.no_grad():
        out = model(torch.randn(3, *INPUT_SHAPES[name]))
    assert out.shape == (3, 10)
    # every conv is followed by a BatchNorm: counts match
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(convs) == len(bns) >= 3


@pytest.mark.parametrize("name", sorted(INPUT_SHAPES))
def test_custom_in_channels_and_classes(name: str) -> None:
    model = ZOO[name](in_channels=3, num_classes=7).eval()
    shape = (3,) + INPUT_SHAPES[name][1:]
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet20", "resnext20", "mobilenetv2"])
@pytest.mark.parametrize("size", [8, 16])
def test_image_models_any_small_size(name: str, size: int) -> None:
    model = ZOO[name]().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(INPUT_SHAPES))
def test_torch_pruning_groups_and_half_prune(name: str) -> None:
    torch.manual_seed(0)
    model = ZOO[name]().eval()
    x = torch.randn(2, *INPUT_SHAPES[name])
    n_params = sum(p.numel() for p in model.parameters())
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    groups = list(
        dg.get_all_groups(ignored_layers=[model.fc], root_module_types=[nn.Conv1d, nn.Conv2d, nn.Linear])
    )
    assert len(groups) >= 2
    assert len(groups) == EXPECTED_GROUPS[name]
    for group in groups:
        root = group[0].dep.target.module
        n_out = root.out_channels if hasattr(root, "out_channels") else root.out_features
        idxs = list(range(0, n_out, 2))
        pgroup = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs)
        pgroup.prune()
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    assert model.fc.out_features == 10
    assert sum(p.numel() for p in model.parameters()) < 0.5 * n_params


def test_mnist1d_splits_deterministic_and_cached(tmp_path, monkeypatch) -> None:
    ds = mnist1d(cache_dir=str(tmp_path))
    assert {k: len(v) for k, v in ds.items()} == {"train": 4000, "val": 1000, "test": 1250}
    for split in ds.values():
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 40)
        assert set(y.tolist()) == set(range(10))
    assert input_shape_of(ds["train"]) == (1, 40)
    cache_files = list(tmp_path.glob("*.npz"))
    assert len(cache_files) == 1
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file behind

    # the second call must load from the cache, not regenerate
    def _fail(*args, **kwargs):
        raise AssertionError("regenerated instead of loading the cache")

    monkeypatch.setattr(apdata, "_generate_mnist1d", _fail)
    ds2 = mnist1d(cache_dir=str(tmp_path))
    for split in ("train", "val", "test"):
        for a, b in zip(ds[split].tensors, ds2[split].tensors):
            assert torch.equal(a, b)
    # train and val are disjoint parts of the generator's train split
    train_x = ds["train"].tensors[0].reshape(4000, -1).numpy()
    val_x = ds["val"].tensors[0].reshape(1000, -1).numpy()
    assert not {r.tobytes() for r in train_x} & {r.tobytes() for r in val_x}


def test_mnist1d_generation_deterministic(tmp_path) -> None:
    state = np.random.get_state()
    a = mnist1d(num_samples=500, seed=3, cache_dir=str(tmp_path / "a"))
    b = mnist1d(num_samples=500, seed=3, cache_dir=str(tmp_path / "b"))
    assert {k: len(v) for k, v in a.items()} == {"train": 320, "val": 80, "test": 100}
    for split in ("train", "val", "test"):
        for ta, tb in zip(a[split].tensors, b[split].tensors):
            assert torch.equal(ta, tb)
    # the global numpy RNG is left untouched by generation
    assert np.array_equal(np.random.get_state()[1], state[1])


def test_digits_splits() -> None:
    ds = digits()
    sizes = {k: len(v) for k, v in ds.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=2)
    assert sizes["val"] == pytest.approx(0.2 * 1797, abs=2)
    for split in ds.values():
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert set(y.tolist()) == set(range(10))
    assert input_shape_of(ds["val"]) == (1, 8, 8)
    ds2 = digits()
    for split in ("train", "val", "test"):
        for a, b in zip(ds[split].tensors, ds2[split].tensors):
            assert torch.equal(a, b)
