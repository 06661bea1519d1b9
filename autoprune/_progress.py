"""Progress bars (tqdm), quiet when not on a terminal unless forced with AUTOPRUNE_PROGRESS=1."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def bars_shown() -> bool:
    """Whether progress bars show: AUTOPRUNE_PROGRESS when set, else whether stderr is a terminal (not a CI log)."""
    from autoprune import settings

    forced = settings.get().progress
    return forced if forced is not None else sys.stderr.isatty()


def progress(*, total: int | None = None, desc: str = "", disable: bool = False, **kw):
    """A tqdm bar; disabled when stderr is not a TTY (CI logs) unless AUTOPRUNE_PROGRESS=1."""
    return tqdm(total=total, desc=desc, disable=disable or not bars_shown(), leave=False, dynamic_ncols=True, **kw)
