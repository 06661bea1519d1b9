"""Helpers the benchmark scripts share for their markdown tables and the provenance lines above them."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pandas as pd


def mean_pm(x: pd.Series, scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' (sample std) of the non-missing values, the value alone for one, '–' for none."""
    x = x.dropna().astype(float) * scale
    if x.empty:
        return "–"
    if len(x) == 1:
        return f"{x.iloc[0]:.{digits}f}"
    return f"{x.mean():.{digits}f} ± {x.std(ddof=1):.{digits}f}"


def machine() -> str:
    """CPU count, torch threads, Python and the versions that matter, and the load average at start."""
    import torch

    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "?"
    vers = [f"torch {torch.__version__}"]
    try:
        import modelopt

        vers.append(f"nvidia-modelopt {modelopt.__version__}")
    except ImportError:
        vers.append("nvidia-modelopt not installed")
    for pkg in ("optuna", "torch_pruning", "torchprofile"):
        try:
            vers.append(f"{pkg} {__import__(pkg).__version__}")
        except Exception:
            pass
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch threads {torch.get_num_threads()}, "
            f"Python {platform.python_version()}, {', '.join(vers)}; load average at start {load}")


def git_rev(path: Path) -> str:
    """The checkout's commit, flagged when its autoprune/ has uncommitted changes; for an exported snapshot
    (`git archive HEAD autoprune search_spaces`), the commit written into its GIT_COMMIT file."""
    if (path / "GIT_COMMIT").exists():
        return (path / "GIT_COMMIT").read_text().strip() + " (snapshot)"
    try:
        rev = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "autoprune"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted changes in autoprune/" if dirty else "")
    except Exception:
        return "?"
