"""Pruning plans: how much to cut from each group. A plan is plain data and round-trips through JSON."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from autoprune.errors import AutopruneError


def channels_kept(channels: int, ratio: float, round_to: int = 1) -> int:
    """Channels left after pruning `ratio` of `channels`, rounded up to a multiple of `round_to`.

    At least one channel (and at most all of them) is kept; the result never increases with the ratio.
    """
    keep = channels - math.floor(channels * ratio + 1e-9)
    if round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    return int(min(channels, max(1, keep)))


@dataclass
class PruningPlan:
    """Group name -> fraction of its channels to remove, plus how to remove them (structured or unstructured,
    the importance criterion, channel rounding). Plans are plain data: their JSON round-trips exactly.

    >>> from autoprune import PruningPlan
    >>> plan = PruningPlan({"conv1": 0.5, "conv2": 0.25}, criterion="l1")
    >>> PruningPlan.from_json(plan.to_json()) == plan, plan.summary()
    (True, 'conv1:0.50, conv2:0.25')
    """

    ratios: dict[str, float] = field(default_factory=dict)
    mode: str = "structured"
    criterion: str = "l2"
    round_to: int = 1

    def to_dict(self) -> dict:
        # (what `dataclasses.asdict` returns, built directly: it is called twice a trial, and asdict's
        # recursive deep copy was ~40 us of it)
        return {"ratios": dict(self.ratios), "mode": self.mode, "criterion": self.criterion, "round_to": self.round_to}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        if not isinstance(data, dict) or "ratios" not in data or not isinstance(data["ratios"], dict):
            raise AutopruneError("a plan must be a JSON object with a 'ratios' mapping of group name -> ratio")
        unknown = set(data) - {"ratios", "mode", "criterion", "round_to"}
        if unknown:
            raise AutopruneError(f"plan has unknown keys {sorted(unknown)}")
        try:
            ratios = {str(k): float(v) for k, v in data["ratios"].items()}
        except (TypeError, ValueError):
            raise AutopruneError("plan ratios must be numbers") from None
        return cls(ratios, str(data.get("mode", "structured")), str(data.get("criterion", "l2")), int(data.get("round_to", 1)))

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AutopruneError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        p = Path(path)
        if not p.exists():
            raise AutopruneError(f"plan file {str(p)!r} does not exist")
        return cls.from_json(p.read_text())

    def validate(self, group_names: Iterable[str], max_ratio: float, prunable: Iterable[str] | None = None) -> None:
        """Raise an error naming the first unknown group or out-of-range ratio."""
        names = list(group_names)
        allowed = set(prunable) if prunable is not None else set(names)
        if self.mode not in ("structured", "unstructured"):
            raise AutopruneError(f"plan mode {self.mode!r} is not one of 'structured', 'unstructured'")
        for name, r in self.ratios.items():
            if name not in names:
                close = difflib.get_close_matches(name, names, n=3)
                hint = f"; did you mean {close}?" if close else f"; the groups are {names}"
                raise AutopruneError(f"plan names unknown group {name!r}{hint}")
            if not (isinstance(r, float) and math.isfinite(r)) or r < 0 or r > max_ratio + 1e-9:
                raise AutopruneError(f"plan ratio for group {name!r} is {r}; it must be in [0, {max_ratio}] (pruning.max_ratio)")
            if r > 0 and name not in allowed:
                raise AutopruneError(f"group {name!r} cannot be pruned (see `autoprune groups`), but the plan gives it ratio {r}")

    def summary(self, digits: int = 2) -> str:
        return ", ".join(f"{k}:{v:.{digits}f}" for k, v in self.ratios.items() if v > 0) or "(unpruned)"
