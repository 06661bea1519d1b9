"""The budgets the search asks: `estimate(plan)` (fast, analytic or from the latency table) and
`measure(model)` (counted, or timed on the target device), behind one small `Budget`. MACs and parameter budgets
come from the cost model; latency budgets from the device (this machine or a remote agent) and its table."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from autoprune.costs.agent import AgentClient, AgentUnavailable
from autoprune.costs.counting import CostModel, LatencyStats, count_macs, count_nonzero, count_params
from autoprune.costs.latency import TABLE_VERSION, LatencyTable, digest, build_table, device_fingerprint, measure_model
from autoprune import settings
from autoprune.errors import AutopruneError, TrialFailed
from autoprune.pruning.groups import PrunableModel
from autoprune.pruning.plan import PruningPlan

log = logging.getLogger(__name__)


@dataclass
class Budget:
    """An absolute cost limit, a fast estimate of a plan's cost and a real measurement of a model's."""

    kind: str  # macs | params | latency_ms
    fraction: float | None  # of the unpruned model, when given as a fraction
    limit: float
    base: float
    estimate: Callable[[PruningPlan], float]
    measure: Callable[[nn.Module], float]
    table: Any = None  # latency: the lookup table behind `estimate` (None when every plan is measured)
    notes: list[str] = field(default_factory=list)
    device: Any = None  # latency: the device that measures
    # latency: `measure` with the measurement's spread (a LatencyStats: median, p10, p90); None for counted budgets
    measure_stats: Callable[[nn.Module], Any] | None = None
    # latency: `estimate` measures each plan on the device (the table was not trusted, or
    # AUTOPRUNE_LATENCY_PREDICTOR=measure): each estimate costs a measurement and is as noisy as one
    measured: bool = False

    @classmethod
    def from_spec(cls, spec, pm: PrunableModel, cost_model: CostModel) -> "Budget":
        kind, value = spec.budget.kind, spec.budget.value
        example = pm.example
        if kind == "macs":
            return cls("macs", value, value * cost_model.base_macs, cost_model.base_macs,
                       lambda p: cost_model.estimate(p)[0], lambda m: count_macs(m, example))
        if kind == "params":
            if spec.pruning.mode == "unstructured":
                return cls("params", value, value * cost_model.base_params, cost_model.base_params,
                           lambda p: _unstructured_params(pm, p), count_nonzero)
            return cls("params", value, value * cost_model.base_params, cost_model.base_params,
                       lambda p: cost_model.estimate(p)[1], count_params)
        return latency_budget(spec, pm, cost_model)

    def overshoot(self, cost: float) -> float:
        """Constraint value for Optuna: <= 0 means the budget is met."""
        return cost / self.limit - 1.0


def _unstructured_params(pm: PrunableModel, plan: PruningPlan) -> float:
    import math

    mods = dict(pm.base.named_modules())
    total = sum(p.numel() for p in pm.base.parameters())
    for g in pm.groups:
        r = plan.ratios.get(g.name, 0.0)
        for layer in g.layers:
            n = mods[layer].weight.numel()
            total -= round(r * n) if r > 0 else 0
    return float(total)


class LocalDevice:
    """This machine's CPU or CUDA device."""

    def __init__(self, device: str = "cpu", threads: int | None = 1, batch_size: int = 1) -> None:
        self.device, self.threads, self.batch_size = device, threads, batch_size
        self.url = device

    def fingerprint(self) -> dict[str, Any]:
        return device_fingerprint(self.device, self.threads, self.batch_size)

    def measure_model(self, model: nn.Module, example: torch.Tensor) -> LatencyStats:
        return measure_model(model, example, self.device, self.threads, self.batch_size)

    def measure_plan(self, pm, plan: PruningPlan) -> LatencyStats:
        return self.measure_model(pm.apply(plan, check=False), pm.example)

    def build_table(self, pm, groups: list[str], model_key: dict, **kw) -> LatencyTable:
        return build_table(pm, groups, device=self.device, threads=self.threads, batch_size=self.batch_size,
                           model_key=model_key, **kw)


def make_device(spec) -> "LocalDevice | Any":
    """The budget's device: local cpu/cuda, or an agent (``agent://HOST:PORT``)."""
    b = spec.budget
    if b.device.startswith("agent://"):
        if spec.model.input_shape is None:
            raise AutopruneError("budget.device agent://... rebuilds the model on the agent from model.input_shape: set it "
                                 "(the agent takes single-tensor inputs; measure other models on device: cpu or cuda)")

        return AgentClient(b.device, model=spec.model.model_dump(), pruning=spec.pruning.model_dump(),
                           threads=b.threads, batch_size=b.batch_size)
    if b.device != "cpu" and not b.device.startswith("cuda"):
        raise AutopruneError(f"budget.device {b.device!r} is not one of cpu, cuda, cuda:N, agent://HOST:PORT")
    if b.device.startswith("cuda") and not torch.cuda.is_available():
        raise AutopruneError(f"budget.device is {b.device!r} but torch sees no CUDA device; use device: cpu "
                             "or run an agent on the GPU machine (device: agent://HOST:PORT)")
    return LocalDevice(b.device, b.threads, b.batch_size)


def model_key(spec, groups: list[str]) -> dict[str, Any]:
    p = spec.pruning
    return {"factory": spec.model.factory, "kwargs": spec.model.kwargs, "input_shape": list(spec.model.input_shape or []),
            "data": None if spec.model.input_shape else [spec.data.factory, spec.data.kwargs],
            "ignore": list(p.ignore), "round_to": p.round_to, "max_ratio": p.max_ratio, "groups": groups,
            "version": TABLE_VERSION}


def table_path(spec, fingerprint: dict, key: dict) -> Path:
    slug = spec.model.factory.rsplit(":", 1)[-1]
    return Path(spec.output) / "_cache" / "latency" / f"{slug}-{digest([fingerprint, key])}.json"


def load_or_build_table(spec, pm, dev=None, *, rebuild: bool = False) -> tuple[LatencyTable, Path, bool]:
    """The cached table for this (device fingerprint, model), built (and cached) when missing."""
    dev = dev or make_device(spec)
    groups = pm.prunable_names
    key = model_key(spec, groups)
    fp = dev.fingerprint()
    path = table_path(spec, fp, key)
    if path.exists() and not rebuild:
        try:
            return LatencyTable.from_dict(json.loads(path.read_text())), path, False
        except (AutopruneError, KeyError, TypeError, ValueError) as e:
            log.warning("latency table %s unusable (%s); rebuilding", path, e)
    log.info("building the latency table of %s on %s", spec.model.factory, dev.url)
    table = dev.build_table(pm, groups, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table.to_dict()))
    os.replace(tmp, path)
    return table, path, True


def latency_budget(spec, pm, cost_model=None):
    """A `Budget` in ms: the table predicts (or, when it is not trusted, the device measures) each plan;
    `measure` re-measures a pruned model on the device. Selected by `budget: {latency_ms: ...}` (absolute) or
    `budget: {latency: 0.6}` (a fraction of the unpruned model, measured here and now)."""
    b = spec.budget
    dev = make_device(spec)
    if hasattr(dev, "base_params"):  # an agent tells the unpruned model by its size
        dev.base_params = sum(p.numel() for p in pm.base.parameters())
    mode, max_error = settings.get().latency_predictor, settings.get().latency_max_error
    notes: list[str] = []
    if pm.round_to == 1:
        notes.append("pruning.round_to is 1: odd channel counts run slowly and are hard to predict; "
                     "round_to: 8 is recommended for latency budgets")
    base = _guard(lambda: dev.measure_plan(pm, pm.plan({})), dev).median_ms
    table = None
    if mode != "measure":
        try:
            table, path, built = _guard(lambda: load_or_build_table(spec, pm, dev), dev)
        except Exception as e:  # noqa: BLE001 - a layer the table cannot time: every plan is measured instead
            if not isinstance(dev, LocalDevice):  # (an agent that cannot be reached stays an error)
                raise
            notes.append(f"the latency table cannot be built ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                         "measuring every plan on the device instead (slow)")
            mode, table = "measure", None
        else:
            if table.median_error > max_error:
                notes.append(f"latency table median error {table.median_error:.1%} > {max_error:.0%}: "
                             "falling back to measuring every plan on the device (slow)")
                mode = "measure"
    if mode == "measure":
        cache: dict[str, float] = {}

        def estimate(plan: PruningPlan) -> float:
            k = json.dumps(pm.kept(plan), sort_keys=True)
            if k not in cache:
                cache[k] = _guard(lambda: dev.measure_plan(pm, plan), dev, trial=True).median_ms
            return cache[k]
    else:
        # the table was measured at another time: follow the device's drift since, plus the table's own error
        drift = base / table.base_ms if table.base_ms > 0 else 1.0
        margin = min(table.median_error, max_error)

        def estimate(plan: PruningPlan) -> float:
            return drift * table.predict(pm.kept(plan)) * (1 + margin)

        if abs(drift - 1) > 0.1:
            notes.append(f"device latency drifted {drift:.2f}x since the table was built; predictions scaled")

    def measure_stats(model: nn.Module):
        return _guard(lambda: dev.measure_model(model, pm.example), dev, trial=True)

    def measure(model: nn.Module) -> float:
        return measure_stats(model).median_ms

    limit = float(b.latency_ms) if b.latency_ms is not None else float(b.latency) * float(base)
    budget = Budget("latency_ms", b.latency, limit, float(base), estimate, measure, table, notes, dev, measure_stats,
                    measured=mode == "measure")
    for n in notes:
        log.warning(n)
    return budget


def _guard(fn: Callable[[], Any], dev, *, trial: bool = False) -> Any:
    """Run a device call; an unreachable agent becomes TrialFailed inside a trial, else an AutopruneError."""
    try:
        return fn()
    except AgentUnavailable as e:
        if trial:
            raise TrialFailed(str(e)) from e
        raise AutopruneError(str(e)) from None
