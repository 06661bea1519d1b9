"""Helpers the benchmark scripts share for their markdown tables."""

from __future__ import annotations

import pandas as pd


def mean_pm(x: pd.Series, scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' (sample std) of the non-missing values, the value alone for one, '–' for none."""
    x = x.dropna().astype(float) * scale
    if x.empty:
        return "–"
    if len(x) == 1:
        return f"{x.iloc[0]:.{digits}f}"
    return f"{x.mean():.{digits}f} ± {x.std(ddof=1):.{digits}f}"
