"""Progress bars (tqdm), quiet when not on a terminal unless forced with AUTOPRUNE_PROGRESS=1."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(*, total: int | None = None, desc: str = "", disable: bool = False, **kw):
    """A tqdm bar; disabled when stderr is not a TTY (CI logs) unless AUTOPRUNE_PROGRESS=1."""
    from autoprune import settings

    forced = settings.get().progress
    if forced is not None:
        disable = disable or not forced
    else:
        disable = disable or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, **kw)
