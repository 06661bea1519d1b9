"""Baseline allocators the search is measured against: uniform, global magnitude, LAMP and NetAdapt.

Each produces plans that meet the budget; the study module records their evaluations as trials so that
every strategy lands in the same storage and the same tables and plots.
"""

from __future__ import annotations

from typing import Callable

import torch

from autoprune.pruning.plan import PruningPlan, channels_kept
from autoprune.searching.space import SearchSpace


def uniform_plan(space: SearchSpace) -> PruningPlan:
    """The same ratio in every prunable group, bisected onto the budget."""
    return space.uniform()


def warm_start_plans(space: SearchSpace, sensitivity=None) -> list[tuple[str, PruningPlan]]:
    """The plans a prior-guided search starts from, each meeting the budget: the sensitivity-greedy allocation
    (when a sensitivity table is given), uniform, global magnitude and LAMP. They compete as trials like any
    other, so the search's best is never worse on its own score than the heuristics it ships."""
    starts = [("sensitivity-greedy", space.greedy(sensitivity))] if sensitivity is not None else []
    return starts + [("uniform", uniform_plan(space)), ("global", ranked_plan(space, "global_l2")),
                     ("lamp", ranked_plan(space, "lamp"))]


def ranked_plan(space: SearchSpace, criterion: str) -> PruningPlan:
    """Global ranking: keep the channels whose score is above one threshold shared by all groups,
    with the threshold bisected onto the budget (global magnitude with `global_l2`, LAMP with `lamp`).

    Torch-Pruning's own global pruner works on a pruning *ratio* of the whole model, not on a cost
    budget, so the threshold search is written here on top of its importance scores.
    """
    pm = space.pm
    scores = pm.scores(criterion)
    names = [n for n in pm.prunable_names if n in scores]
    flat = torch.cat([scores[n].float() for n in names]) if names else torch.zeros(1)
    values = torch.sort(flat).values

    def plan_at(k: int) -> PruningPlan:
        thr = values[min(max(k, 0), len(values) - 1)] if k > 0 else None
        kept = {}
        for n in names:
            g = pm.group(n)
            keep = g.channels if thr is None else int((scores[n] > thr).sum())
            floor = channels_kept(g.channels, pm.max_ratio, pm.round_to)
            kept[n] = max(keep, floor)
        return pm.plan_from_kept(kept)

    lo, hi = 0, len(values)
    if space.budget.estimate(plan_at(hi)) > space.budget.limit:
        return plan_at(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if space.budget.estimate(plan_at(mid)) <= space.budget.limit:
            hi = mid
        else:
            lo = mid
    return plan_at(hi)


def netadapt(
    space: SearchSpace,
    evaluate: Callable[[PruningPlan], float],
    n_evaluations: int,
    step: float,
) -> PruningPlan:
    """NetAdapt-style greedy (Yang et al., 2018): each iteration cuts the cost by a step, trying every group
    (the smallest cut in that group that reaches the step), keeps the candidate with the best metric.

    `evaluate(plan)` scores a candidate (and records it); the step is widened when needed so that the
    budget is reached within `n_evaluations` evaluations, the same evaluation budget as the other searches.
    """
    pm, budget = space.pm, space.budget
    dims = space.dims
    ratios = {n: 0.0 for n in dims}
    cost = budget.estimate(pm.plan(ratios))
    used = 0
    while cost > budget.limit:
        iters_left = max(1, (n_evaluations - used - 1) // max(1, len(dims)))
        cut = max(step * budget.base, (cost - budget.limit) / iters_left)
        target = max(cost - cut, budget.limit)
        candidates = []
        for n in dims:
            r = _smallest_ratio_reaching(space, ratios, n, target)
            if r is not None:
                candidates.append(pm.plan({**ratios, n: r}))
        if not candidates or used + len(candidates) > n_evaluations:
            # no single group reaches the step, or the evaluations left cannot try every group: move every
            # group towards its bound at once (one evaluation), so NetAdapt never exceeds n_evaluations
            plan, _ = space.fill(pm.plan(ratios))
            evaluate(plan)
            return plan
        best, best_metric = None, None
        for plan in candidates:
            m = evaluate(plan)
            used += 1
            if best_metric is None or m > best_metric:
                best, best_metric = plan, m
        ratios = {n: best.ratios.get(n, 0.0) for n in dims}
        cost = budget.estimate(best)
    return pm.plan(ratios)


def _smallest_ratio_reaching(space: SearchSpace, ratios: dict[str, float], name: str, target: float) -> float | None:
    """The smallest ratio of group `name` (on its channel grid) that brings the cost to `target` or below."""
    pm = space.pm
    g = pm.group(name)
    current = channels_kept(g.channels, ratios.get(name, 0.0), pm.round_to)
    floor = channels_kept(g.channels, space.bounds[name], pm.round_to)
    for keep in range(current - pm.round_to, floor - 1, -pm.round_to):
        if keep < 1:
            break
        r = round((g.channels - keep) / g.channels, 6)
        if space.budget.estimate(pm.plan({**ratios, name: r})) <= target:
            return r
    return None
