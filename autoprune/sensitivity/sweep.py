"""Sensitivity analysis: prune each group alone at a grid of ratios and record the metric drop.

Results are cached on disk keyed by the model's weights and every setting that changes them, so a
second call evaluates nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from autoprune.costs.counting import CostModel
from autoprune.sensitivity.evaluate import Evaluator
from autoprune.pruning.groups import PrunableModel
from autoprune.pruning.plan import PruningPlan
from autoprune._progress import progress
from autoprune.model.loading import weights_digest

log = logging.getLogger(__name__)
COLUMNS = ["group", "ratio", "channels", "channels_kept", "metric", "drop", "macs", "macs_saved", "params", "params_saved"]


@dataclass
class SensitivityResult:
    table: pd.DataFrame
    baseline_metric: float
    cache_path: Path | None
    evaluations: int  # how many evaluations this call ran (0 when served from cache)


def _key(pm: PrunableModel, ev: Evaluator, ratios: Sequence[float], stop_drop: float, extra: dict | None,
         skip_within: float | None = None) -> str:
    settings = {
        "weights": weights_digest(pm.base),
        "criterion": pm.criterion,
        "round_to": pm.round_to,
        "mode": pm.mode,
        "ratios": list(ratios),
        "stop_drop": stop_drop,
        "calibration_batches": ev.calibration_batches,
        "finetune_steps": ev.finetune_steps,
        "metric": ev.metric_name,
        "batch_size": ev.batch_size,
        "seed": ev.seed,
        "max_val_samples": ev.max_val_samples,
        "extra": extra or {},
    }
    task = getattr(ev, "task", None)
    if task is not None and task.name != "classification":  # only then, so zoo tables cached before tasks stay valid
        settings["task"] = task.describe()
    if getattr(ev, "reconstruct", False):  # only when on, so tables cached before the setting existed stay valid
        settings["reconstruct"] = True
    if skip_within is not None:  # only when on, so tables swept in full stay valid for a full sweep
        settings["skip_within"] = skip_within
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_sensitivity(
    pm: PrunableModel,
    evaluator: Evaluator,
    cost_model: CostModel,
    *,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),  # spec.DEFAULT_SENSITIVITY_RATIOS
    stop_drop: float = 0.5,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    extra_key: dict | None = None,
    map_fn: Callable | None = None,
    skip_within: float | None = None,
    baseline: float | None = None,
) -> SensitivityResult:
    """Sweep every prunable group over `ratios` (clipped to max_ratio); one row per evaluation kept.

    A group's sweep stops early once its drop exceeds `stop_drop`. With `skip_within` (the search's
    tolerance), each group is evaluated at its largest ratio first, and a group whose drop there is within
    `skip_within` is insensitive: its smaller ratios are not evaluated (one row). Otherwise the sweep goes on
    from the smallest ratio as without it (the largest ratio's evaluation is reused when the sweep gets there,
    and left out of the table when it stops before, so that the table is the full sweep's). `map_fn(fn, items)`
    can fan the per-group sweeps out (e.g. over Ray); by default they run in this process. `baseline`: the
    unpruned model's metric through `evaluator`, when the caller measured it already (`sweep_estimate`).
    """
    ratios = _swept(pm, ratios)
    path = parts = None
    if cache_dir is not None:
        path = _cache_file(pm, evaluator, ratios, stop_drop, extra_key, skip_within, cache_dir)
        if path.exists():
            df = pd.read_csv(path)
            meta = json.loads(path.with_suffix(".json").read_text())
            log.info("sensitivity served from cache %s", path)
            return SensitivityResult(df, float(meta["baseline_metric"]), path, 0)
        # every finished group is persisted on its own as it completes, so a killed sweep resumes
        parts = path.with_suffix(".parts")
        parts.mkdir(parents=True, exist_ok=True)
    n_eval = 0
    base_file = parts / "baseline.json" if parts is not None else None
    if base_file is not None and base_file.exists():
        baseline = float(json.loads(base_file.read_text())["baseline_metric"])
    elif baseline is not None:
        if base_file is not None:
            _write_atomic(base_file, json.dumps({"baseline_metric": baseline}))
    else:
        baseline = evaluator(pm.apply(pm.plan({})))
        n_eval += 1
        if base_file is not None:
            _write_atomic(base_file, json.dumps({"baseline_metric": baseline}))
    base_macs, base_params = cost_model.base_macs, cost_model.base_params
    names = pm.prunable_names
    done: dict[str, pd.DataFrame] = {}
    if parts is not None:
        for n in names:
            f = parts / _part_name(n)
            if f.exists():
                done[n] = pd.read_csv(f)
    todo = [n for n in names if n not in done]
    if done:
        log.info("sensitivity: %d of %d groups found in %s", len(done), len(names), parts)
    bar = progress(total=len(todo) * len(ratios), desc="sensitivity")

    def evaluate(name: str, r: float, plan: PruningPlan, kept: int) -> dict:
        metric = evaluator(pm.apply(plan, check=False))  # reconstructs from the plan the model carries
        macs, params = cost_model.estimate(plan)
        return dict(group=name, ratio=r, channels=pm.group(name).channels, channels_kept=kept, metric=metric,
                    drop=baseline - metric, macs=macs, macs_saved=base_macs - macs, params=params,
                    params_saved=base_params - params)

    def sweep(name: str) -> tuple[list[dict], int]:
        plans = [pm.plan({name: r}) for r in ratios]
        kepts = [pm.kept(plan)[name] for plan in plans]
        rows, n = [], 0
        probe = None
        if skip_within is not None and len(ratios) > 1:  # the largest ratio first: is the group insensitive?
            probe, n = evaluate(name, ratios[-1], plans[-1], kepts[-1]), 1
            if probe["drop"] <= skip_within:
                bar.update(len(ratios))
                rows = [probe]
        if not rows:
            last_kept = None
            for i, r in enumerate(ratios):
                if kepts[i] == last_kept:  # rounding made this ratio identical to the previous one
                    bar.update(1)
                    continue
                last_kept = kepts[i]
                if probe is not None and i == len(ratios) - 1:
                    row = probe
                else:
                    row, n = evaluate(name, r, plans[i], kepts[i]), n + 1
                rows.append(row)
                bar.update(1)
                if row["drop"] > stop_drop:
                    bar.update(len(ratios) - i - 1)
                    break
        if parts is not None:
            _write_atomic(parts / _part_name(name), pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False))
        return rows, n

    mapper = map_fn or (lambda fn, items: [fn(i) for i in items])
    swept = dict(zip(todo, mapper(sweep, todo)))
    bar.close()
    new = {n: rows for n, (rows, _) in swept.items()}
    n_eval += sum(k for _, k in swept.values())
    frames = [done[n] if n in done else pd.DataFrame(new[n], columns=COLUMNS) for n in names]
    df = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else pd.DataFrame(columns=COLUMNS)
    df = df[COLUMNS]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps({"baseline_metric": baseline, "evaluations": n_eval}))
        _write_atomic(path, df.to_csv(index=False))
        if parts is not None:
            for f in parts.iterdir():
                f.unlink()
            parts.rmdir()
    return SensitivityResult(df, baseline, path, n_eval)


def sensitivity_cached(pm: PrunableModel, evaluator: Evaluator, *, ratios: Sequence[float], stop_drop: float,
                       cache_dir: str | Path, extra_key: dict | None = None, skip_within: float | None = None) -> bool:
    """Whether `run_sensitivity` with these arguments would be served from its cache (no evaluation)."""
    return _cache_file(pm, evaluator, _swept(pm, ratios), stop_drop, extra_key, skip_within, cache_dir).exists()


def sweep_evaluations(pm: PrunableModel, ratios: Sequence[float]) -> int:
    """The most evaluations a sweep over `ratios` can take: the unpruned baseline and every group at every ratio
    up to `max_ratio` (early stops, rounding and `skip_within` make it fewer)."""
    return 1 + len(pm.prunable_names) * len(_swept(pm, ratios))


def _swept(pm: PrunableModel, ratios: Sequence[float]) -> list[float]:
    """The ratios a sweep evaluates: those up to `max_ratio`, in order."""
    return sorted(r for r in ratios if r <= pm.max_ratio + 1e-9)


def _cache_file(pm: PrunableModel, evaluator: Evaluator, ratios: Sequence[float], stop_drop: float,
                extra_key: dict | None, skip_within: float | None, cache_dir: str | Path) -> Path:
    """Where a finished sweep with these settings is cached (its `.json` and `.parts` sit beside it)."""
    return Path(cache_dir) / f"sensitivity-{_key(pm, evaluator, ratios, stop_drop, extra_key, skip_within)}.csv"


def _part_name(group: str) -> str:
    """File of one group's finished sweep (group names are module paths: dots, letters, digits)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in group)
    return f"{safe}-{hashlib.sha1(group.encode()).hexdigest()[:8]}.csv"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def upper_bounds(df: pd.DataFrame, names: Sequence[str], tolerance: float, max_ratio: float) -> dict[str, float]:
    """Each group's largest swept ratio whose drop stays within `tolerance` (0 when none does); a group within
    the tolerance at every swept ratio gets `max_ratio`.

    Why the last rule: the sweep is a grid (default 0.25/0.5/0.75), and a group that passes its largest point
    has shown no drop that would stop it; capping it at that point (0.75) would forbid the allocations that
    prune wide, insensitive layers hardest (LAMP's at 15 % MACs cuts ResNet-20's last stage by 86 %)."""
    ub = {}
    for n in names:
        rows = df[df.group == n].sort_values("ratio")
        ok, passed_all = 0.0, len(rows) > 0
        for r, d in zip(rows["ratio"], rows["drop"]):
            if d <= tolerance:
                ok = float(r)
            else:
                passed_all = False
                break
        ub[n] = max_ratio if passed_all else min(ok, max_ratio)
    return ub
