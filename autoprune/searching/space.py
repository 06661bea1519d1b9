"""The search space: one ratio per group, bounded by sensitivity priors, projected onto the budget."""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Callable, Sequence

import pandas as pd

from autoprune.costs.budgets import Budget
from autoprune.errors import BudgetUnreachableError
from autoprune.pruning.groups import PrunableModel
from autoprune.pruning.plan import PruningPlan, channels_kept
from autoprune.sensitivity.sweep import upper_bounds


PRIOR_ROOM = 0.6  # sensitivity bounds must be able to reach this fraction of the budget


@dataclass
class SearchSpace:
    """Bounds per group and the projection of a proposal onto the budget."""

    pm: PrunableModel
    budget: Budget
    bounds: dict[str, float]  # upper bound of each prunable group's ratio
    notes: list[str] = field(default_factory=list)
    # a centred space (search.centre): each group's kept fraction in a reference plan; a proposal is then one
    # log-multiplier per group in [-1, 1], scaling that fraction by up to `span` either way (see `project_centred`)
    centre: dict[str, float] | None = None
    span: float = 2.0
    centre_name: str = "none"  # search.centre as resolved for this space ("none" or "lamp")

    @classmethod
    def build(cls, pm: PrunableModel, budget: Budget, sensitivity: pd.DataFrame | None, tolerance: float) -> "SearchSpace":
        names = pm.prunable_names
        full = {n: pm.max_ratio for n in names}
        min_cost = budget.estimate(pm.plan(full))
        if min_cost > budget.limit:
            # on a device where widths barely move the latency (a GPU at a small batch is launch-bound: measured on
            # an H100, ResNet-20 on 8x8 digits took 1.3 ms at batch 256 whatever its widths), say so
            flat = budget.kind == "latency_ms" and min_cost >= 0.8 * budget.base
            raise BudgetUnreachableError(
                f"budget {budget.kind} <= {_fmt(budget.limit, budget)} is unreachable: pruning every group at "
                f"max_ratio {pm.max_ratio} still costs {_fmt(min_cost, budget)} "
                f"({min_cost / budget.base:.1%} of the unpruned model). Raise the budget to at least "
                f"{min_cost / budget.base:.3f}, or raise pruning.max_ratio / shrink pruning.ignore."
                + (" Pruning hardly changes the latency on this device at this batch size (per-call overhead, "
                   "not compute, dominates it): a larger budget.batch_size, or a MACs budget, measures what "
                   "pruning saves." if flat else "")
            )
        notes: list[str] = []
        if sensitivity is None or sensitivity.empty:
            return cls(pm, budget, full, ["no priors: every group searched in [0, max_ratio]"])
        # The bounds must leave room to choose: the bounded space has to reach PRIOR_ROOM x the budget, not just
        # the budget, or the projection pins every trial to the bound vector (measured in benchmarks/allocators:
        # at 30 % MACs, bounds that just reached the budget cost the CNNs 10-20 pp of val accuracy).
        target = max(budget.limit * PRIOR_ROOM, min_cost)
        tol = tolerance
        while True:
            ub = upper_bounds(sensitivity, names, tol, pm.max_ratio)
            if budget.estimate(pm.plan(ub)) <= target or tol > 10:
                break
            tol *= 1.5  # relax the tolerance until the bounds leave that room
        if budget.estimate(pm.plan(ub)) > target:
            ub, tol = full, float("inf")
        if tol != tolerance:
            notes.append(f"tolerance relaxed from {tolerance} to {tol:.3g} so that the bounds can reach "
                         f"{PRIOR_ROOM:.0%} of the budget")
        return cls(pm, budget, ub, notes)

    @property
    def dims(self) -> list[str]:
        """Groups with a non-zero upper bound: the search dimensions."""
        return [n for n in self.pm.prunable_names if self.bounds.get(n, 0) > 0]

    def param_range(self, name: str) -> tuple[float, float]:
        """What the sampler proposes for a group: its ratio in [0, bound], or in a centred space a log-multiplier
        of the centre plan's kept width in [-1, 1]."""
        return (-1.0, 1.0) if self.centre is not None else (0.0, self.bounds[name])

    def point(self, plan: PruningPlan) -> dict[str, float]:
        """The sampler's view of a plan (a warm start): its ratios clipped into the bounds, or in a centred space
        the proposal closest to its shape (`centred_point`)."""
        return self.centred_point(plan) if self.centre is not None else self.clip(plan.ratios)

    def clip(self, values: dict[str, float]) -> dict[str, float]:
        return {n: min(max(float(values.get(n, 0.0)), 0.0), self.bounds[n]) for n in self.dims}

    def scaled(self, proposal: dict[str, float], s: float) -> PruningPlan:
        return self.pm.plan({n: round(min(max(s * proposal.get(n, 0.0), 0.0), self.bounds[n]), 6) for n in self.dims})

    def project(self, proposal: dict[str, float], iters: int = 40, tol: float = 1e-3) -> tuple[PruningPlan, bool]:
        """Scale the proposal (a relative allocation) by one factor, within the bounds, so that the
        estimated cost lands just under the budget, then top it up channel by channel (see `top_up`) so
        that it lands within ~1 % under. Returns (plan, feasible)."""
        p = {n: max(float(proposal.get(n, 0.0)), 0.0) for n in self.dims}
        if sum(p.values()) <= 0:
            p = {n: self.bounds[n] for n in self.dims}
        if self.budget.estimate(self.scaled(p, 0.0)) <= self.budget.limit:
            return self.scaled(p, 0.0), True
        hi = max(self.bounds[n] / p[n] for n in self.dims if p[n] > 0)
        if self.budget.estimate(self.scaled(p, hi)) > self.budget.limit:
            # this direction saturates before the budget: fill the remaining groups uniformly
            plan, ok = self.fill(self.scaled(p, hi))
            return (self.top_up(plan, p), True) if ok else (plan, False)
        # the plan is discrete (whole channels): a relative tolerance is enough
        s = _bisect(lambda t: self.budget.estimate(self.scaled(p, t)) <= self.budget.limit, 0.0, hi,
                    iters=iters, rel_tol=tol)
        return self.top_up(self.scaled(p, s), p), True

    def centred_ratios(self, u: dict[str, float], s: float) -> dict[str, float]:
        """Ratios whose kept fractions are the centre's, times span**u, times one factor s, within the bounds."""
        out = {}
        for n in self.dims:
            keep = s * self.centre[n] * self.span ** min(max(float(u.get(n, 0.0)), -1.0), 1.0)
            out[n] = round(min(max(1.0 - keep, 0.0), self.bounds[n]), 6)
        return out

    def project_centred(self, u: dict[str, float], iters: int = 40, tol: float = 1e-3) -> tuple[PruningPlan, bool]:
        """A centred proposal onto the budget: the largest common factor s on the kept widths (so relative
        widths stay those proposed, a group at its bound or its full width aside) whose plan meets the budget,
        then `top_up`. u = 0 everywhere gives the centre plan's shape."""
        def fits(s: float) -> bool:
            return self.budget.estimate(self.pm.plan(self.centred_ratios(u, s))) <= self.budget.limit

        if not fits(0.0):
            return self.pm.plan(self.centred_ratios(u, 0.0)), False
        lo, hi = 0.0, 1.0
        while fits(hi):  # grow the factor until its plan is over
            if hi > 1e3:  # every group whole still fits (a budget at or over the unpruned cost): nothing to cut
                return self.pm.plan(self.centred_ratios(u, hi)), True
            lo, hi = hi, 2 * hi
        ratios = self.centred_ratios(u, _bisect(fits, lo, hi, fits_high=False, iters=iters, rel_tol=tol))
        return self.top_up(self.pm.plan(ratios), ratios), True

    def centred_point(self, plan: PruningPlan) -> dict[str, float]:
        """The proposal (log-multipliers, clipped to [-1, 1]) closest to a plan's shape, up to scale: what the
        sampler is told a warm start was."""
        logs = {n: math.log(max(1.0 - plan.ratios.get(n, 0.0), 1e-6) / self.centre[n], self.span) for n in self.dims}
        shift = sorted(logs.values())[len(logs) // 2] if logs else 0.0  # scale is free: centre the median
        return {n: min(max(v - shift, -1.0), 1.0) for n, v in logs.items()}

    def top_up(self, plan: PruningPlan, weights: dict[str, float] | None = None) -> PruningPlan:
        """Give channels back while the budget allows: one scaling factor moves every group by whole
        channels at once, which leaves up to a few % of the budget unused on small models. Round robin over
        the groups (most-pruned relative to its proposal weight first), each group keeps `round_to` more
        channels as long as the cost stays under the limit; a group that no longer fits is dropped (costs
        only grow as channels come back). Costs one estimate per channel given back plus one per group.

        Not when every estimate is a latency measured on the device (`Budget.measured`): a channel's worth of
        latency is within a measurement's noise, and each step cost a whole-model measurement (most of a trial's
        ~20 on a GPU, where the search ran minutes per trial); the bisection's plan stands."""
        if self.budget.measured:
            return plan
        pm, limit = self.pm, self.budget.limit
        ratios = {n: float(plan.ratios.get(n, 0.0)) for n in self.dims}
        groups = {n: pm.group(n) for n in self.dims}
        w = weights or {}
        order = sorted(self.dims, key=lambda n: -(ratios[n] - w.get(n, ratios[n])))
        live = [n for n in order if ratios[n] > 0]
        while live:
            nxt = []
            for n in live:
                g = groups[n]
                keep = channels_kept(g.channels, ratios[n], pm.round_to) + pm.round_to
                if keep > g.channels:
                    continue
                r = (g.channels - keep) / g.channels  # exact: rounding could skip a channel
                trial = {**ratios, n: r}
                if self.budget.estimate(pm.plan(trial)) <= limit:
                    ratios = trial
                    if r > 0:
                        nxt.append(n)
            live = nxt
        return pm.plan(ratios)

    def fill(self, plan: PruningPlan) -> tuple[PruningPlan, bool]:
        base = dict(plan.ratios)
        room = {n: self.bounds[n] - base.get(n, 0.0) for n in self.dims}

        def at(t: float) -> PruningPlan:
            return self.pm.plan({n: round(base.get(n, 0.0) + t * room[n], 6) for n in self.dims})

        if self.budget.estimate(at(1.0)) > self.budget.limit:
            return at(1.0), False
        return at(_bisect(lambda t: self.budget.estimate(at(t)) <= self.budget.limit, 0.0, 1.0, abs_tol=1e-3)), True

    # ------------------------------------------------------------ warm starts
    def uniform(self) -> PruningPlan:
        """One ratio for every group (within max_ratio), bisected to the budget."""
        names = self.pm.prunable_names
        hi = self.pm.max_ratio
        if self.budget.estimate(self.pm.plan({n: hi for n in names})) > self.budget.limit:
            return self.pm.plan({n: hi for n in names})
        hi = _bisect(lambda r: self.budget.estimate(self.pm.plan({n: r for n in names})) <= self.budget.limit, 0.0, hi)
        # round *up*: a ratio rounded down can keep one more channel and overshoot the budget
        r = min(math.ceil(hi * 1e6) / 1e6, self.pm.max_ratio)
        return self.pm.plan({n: r for n in names})

    @property
    def bounded(self) -> list[str]:
        """The groups whose sensitivity bound is below `pruning.max_ratio` (none without priors)."""
        return [n for n in self.pm.prunable_names if self.bounds.get(n, self.pm.max_ratio) < self.pm.max_ratio - 1e-9]

    def bound_contacts(self, plan: PruningPlan) -> dict[str, dict]:
        """The groups whose sensitivity bound `plan` reaches: those below `pruning.max_ratio` where it keeps no more
        channels than the bound allows. Each gives the bound, the plan's own ratio (from its kept channels) and
        whether it goes past the bound (keeps fewer: a heuristic's plan can, a searched one cannot)."""
        pm = self.pm
        bounded = self.bounded
        if not bounded:
            return {}
        at = pm.kept(pm.plan({n: self.bounds[n] for n in bounded}))
        kept = pm.kept(plan)
        out = {}
        for n in bounded:
            if kept[n] <= at[n]:
                out[n] = {"bound": float(self.bounds[n]), "ratio": round(1 - kept[n] / pm.group(n).channels, 4),
                          "past": kept[n] < at[n]}
        return out

    def greedy(self, sensitivity: pd.DataFrame) -> PruningPlan:
        """Sensitivity-greedy: repeatedly take the grid step with the smallest drop per cost saved."""
        curves: dict[str, list[tuple[float, float]]] = {}
        for n in self.dims:
            rows = sensitivity[(sensitivity.group == n) & (sensitivity.ratio <= self.bounds[n] + 1e-9)].sort_values("ratio")
            curves[n] = list(zip(rows.ratio.astype(float), rows["drop"].astype(float)))
        ratios = {n: 0.0 for n in self.dims}
        step = {n: 0 for n in self.dims}
        drop_now = {n: 0.0 for n in self.dims}
        cost = self.budget.estimate(self.pm.plan(ratios))
        while cost > self.budget.limit:
            best, best_score = None, None
            for n in self.dims:
                if step[n] >= len(curves[n]):
                    continue
                r, d = curves[n][step[n]]
                c = self.budget.estimate(self.pm.plan({**ratios, n: r}))
                saved = cost - c
                if saved <= 0:
                    step[n] += 1
                    continue
                score = (max(d, 0.0) - max(drop_now[n], 0.0) + 1e-6) / saved
                if best_score is None or score < best_score:
                    best, best_score = n, score
            if best is None:
                break
            r, d = curves[best][step[best]]
            ratios[best], drop_now[best] = r, d
            step[best] += 1
            cost = self.budget.estimate(self.pm.plan(ratios))
        return self.pm.plan(ratios)


def _bisect(fits: Callable[[float], bool], lo: float, hi: float, *, fits_high: bool = True, iters: int = 40,
            rel_tol: float = 0.0, abs_tol: float = 0.0) -> float:
    """The end of [lo, hi] that `fits` (hi when `fits_high`, else lo), narrowed by bisection to within
    max(rel_tol * hi, abs_tol) of where `fits` turns, or for `iters` steps: the one search every projection onto
    the budget makes (a cost is monotone in the scale being bisected)."""
    for _ in range(iters):
        if hi - lo <= max(rel_tol * hi, abs_tol):
            break
        mid = (lo + hi) / 2
        if fits(mid) == fits_high:
            hi = mid
        else:
            lo = mid
    return hi if fits_high else lo


def _fmt(x: float, budget: Budget) -> str:
    if budget.kind == "latency_ms":
        return f"{x:.3f} ms"
    return f"{x:,.0f}"


def pareto_mask(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Non-dominated points for (maximise first, minimise second)."""
    out = []
    for i, (m, c) in enumerate(points):
        dominated = any((m2 >= m and c2 <= c) and (m2 > m or c2 < c) for j, (m2, c2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out
