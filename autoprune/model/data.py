"""Built-in offline datasets: MNIST-1D (generated locally, cached) and sklearn digits."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["mnist1d", "digits", "input_shape_of", "default_cache_dir", "make_loader", "first_batch"]

_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """Cache directory: settings.cache (``$AUTOPRUNE_CACHE``) if set, else ``~/.cache/autoprune``."""
    from autoprune import settings

    return settings.get().cache or Path.home() / ".cache" / "autoprune"


def _to_datasets(arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> dict[str, TensorDataset]:
    """Wrap ``{split}_x`` / ``{split}_y`` numpy arrays into float32/int64 TensorDatasets."""
    out: dict[str, TensorDataset] = {}
    for split in ("train", "val", "test"):
        x = torch.as_tensor(np.ascontiguousarray(arrays[f"{split}_x"]), dtype=torch.float32)
        y = torch.as_tensor(np.ascontiguousarray(arrays[f"{split}_y"]), dtype=torch.int64)
        out[split] = TensorDataset(x.reshape(len(x), *shape), y)
    return out


def _generate_mnist1d(num_samples: int, seed: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Generate MNIST-1D locally (never downloads) and split train into train/val."""
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global `random` / `numpy` RNGs; restore them afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        args = get_dataset_args()
        args.num_samples = num_samples
        args.seed = seed
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    x, y = np.asarray(data["x"], dtype=np.float32), np.asarray(data["y"], dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_val = int(round(len(y) * val_fraction))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return {
        "train_x": x[train_idx],
        "train_y": y[train_idx],
        "val_x": x[val_idx],
        "val_y": y[val_idx],
        "test_x": np.asarray(data["x_test"], dtype=np.float32),
        "test_y": np.asarray(data["y_test"], dtype=np.int64),
    }


def mnist1d_cache_path(
    num_samples: int = 6250, seed: int = 42, val_fraction: float = 0.2, cache_dir: str | None = None
) -> Path:
    """Path of the ``.npz`` cache file for the given MNIST-1D arguments."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"mnist1d_v{_CACHE_VERSION}_n{num_samples}_s{seed}_val{val_fraction:g}.npz"
    return root / name


def mnist1d(
    num_samples: int = 6250,
    seed: int = 42,
    val_fraction: float = 0.2,
    cache_dir: str | None = None,
) -> dict[str, TensorDataset]:
    """MNIST-1D as {"train","val","test"} TensorDatasets of (N,1,40) float32 inputs, int64 targets.

    The data are generated locally with ``mnist1d.data.make_dataset`` (80% train / 20% test,
    as in the reference generator); the train part is split deterministically into train/val.
    Arrays are cached as an ``.npz`` in ``cache_dir`` (default ``$AUTOPRUNE_CACHE`` or
    ``~/.cache/autoprune``) and loaded from there on later calls.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    path = mnist1d_cache_path(num_samples, seed, val_fraction, cache_dir)
    arrays: dict[str, np.ndarray] | None = None
    if path.is_file():
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, KeyError):
            arrays = None  # corrupt cache: regenerate below
    if arrays is None:
        arrays = _generate_mnist1d(num_samples, seed, val_fraction)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **arrays)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        except OSError:
            pass  # an unwritable cache directory is not fatal
    return _to_datasets(arrays, (1, arrays["train_x"].shape[-1]))


def digits(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> dict[str, TensorDataset]:
    """sklearn digits as {"train","val","test"} TensorDatasets of (N,1,8,8) inputs in [0,1].

    The split is stratified and deterministic given ``seed``; fractions are of the 1797 samples.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise ValueError("need 0 < val_fraction, test_fraction and val_fraction + test_fraction < 1")
    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    idx = np.arange(len(y))
    rest_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    train_idx, val_idx = train_test_split(
        rest_idx,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=y[rest_idx],
        random_state=seed,
    )
    arrays = {}
    for split, ix in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        ix = np.sort(ix)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x[ix], y[ix]
    return _to_datasets(arrays, (1, 8, 8))


def input_shape_of(dataset: Dataset) -> tuple[int, ...]:
    """Per-sample input shape of a dataset whose items are ``(input, target)`` pairs."""
    if isinstance(dataset, TensorDataset):
        return tuple(dataset.tensors[0].shape[1:])
    x = dataset[0][0]
    return tuple(torch.as_tensor(x).shape)


def make_loader(split, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False):
    """Batches of one split: the user's own DataLoader (or any re-iterable of batches) as it is, or a
    DataLoader over a Dataset (seeded shuffle; `drop_last` only when the split has more than one batch).
    Items may be tensors, tuples or dicts: torch's default collation stacks each field."""
    if isinstance(split, DataLoader) or not hasattr(split, "__getitem__"):
        return split
    g = torch.Generator().manual_seed(seed)
    return DataLoader(split, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None,
                      drop_last=drop_last and len(split) > batch_size)


def first_batch(split, n: int = 1):
    """The first `n` items of a split, collated as the loaders collate them (the example input comes from it)."""
    from torch.utils.data import default_collate

    if isinstance(split, DataLoader) or not hasattr(split, "__getitem__"):
        from autoprune.model.task import slice_batch

        return slice_batch(next(iter(split)), 0, n)
    return default_collate([split[i] for i in range(min(n, len(split)))])
