"""Figures and the HTML report: look at a search (plotly; every function returns a ``go.Figure``).

Every figure takes a run directory (``runs/NAME``, or its spec path), a `RunResults` from
``autoprune.results.tables.load`` or, for the trial figures, the trials DataFrame itself. They read only what is on disk
(result files, the study storage, ``sensitivity.csv``), so they work on a study that is still running: trials
without a metric yet are skipped and a strategy without a result file simply has no "chosen" marker.

- `pareto_figure`: val metric against MACs / params / latency; feasible, dominated, infeasible and Pareto trials
  drawn distinctly; the budget as a vertical line; baselines and the unpruned model as labelled markers.
- `ratio_profile`: the chosen plan's ratio per group in network order, against uniform and another plan, with
  each group's channel count and MACs share.
- `sensitivity_curves`, `sensitivity_heatmap`: metric drop against ratio per group.
- `search_progress`: best feasible metric so far against evaluations and against wall time, per strategy.

The HTML report that gathers them is `autoprune.results.report`.
"""

from __future__ import annotations

import html as _html
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from autoprune.errors import AutopruneError
from autoprune.results.tables import RunResults, load, pareto_flags

BASELINES = ("uniform", "global", "lamp", "netadapt", "random")
AXES = {  # x= choice -> (trials column, axis title, budget kind it matches)
    "macs": ("macs_ratio", "MACs (fraction of the unpruned model)", "macs"),
    "params": ("params_ratio", "parameters (fraction of the unpruned model)", "params"),
    "latency": ("latency_ms", "latency (ms)", "latency_ms"),
}
# One colour per strategy, stable across figures (plotly's default qualitative palette, colour-blind friendly
# enough and matching the rest of the plotly ecosystem).
STRATEGY_COLORS = {
    "optuna": "#636EFA", "uniform": "#7F7F7F", "global": "#00CC96", "lamp": "#AB63FA",
    "netadapt": "#FFA15A", "random": "#19D3F3",
}
BASELINE_SYMBOLS = {"uniform": "square", "global": "diamond", "lamp": "triangle-up", "netadapt": "pentagon",
                    "random": "hexagon"}
TEMPLATE = "plotly_white"


# ----------------------------------------------------------------------------------------------- inputs
def as_results(res: "RunResults | str | Path | pd.DataFrame") -> RunResults:
    """A RunResults from a RunResults, a run directory / spec path, or a trials DataFrame."""
    if isinstance(res, RunResults):
        return res
    if isinstance(res, pd.DataFrame):
        df = res.copy()
        if "pareto" not in df.columns:
            df["pareto"] = False
            for _, idx in df.groupby("strategy").groups.items():
                df.loc[idx, "pareto"] = pareto_flags(df.loc[idx])
        return RunResults(Path("."), trials=df)
    if isinstance(res, (str, Path)):
        return load(res)
    raise AutopruneError(f"plots take a run directory, a RunResults or a trials DataFrame, got {type(res).__name__}")


def _color(strategy: str) -> str:
    return STRATEGY_COLORS.get(strategy, "#EF553B")


def main_strategy(res: RunResults) -> str | None:
    """The searched strategy: the spec's (optuna unless a baseline was the spec's strategy), else the busiest."""
    t = res.trials
    if t.empty:
        return next(iter(res.results), None)
    if "optuna" in set(t.strategy):
        return "optuna"
    spec_s = ((res.spec or {}).get("search") or {}).get("strategy")
    if spec_s in set(t.strategy):
        return spec_s
    return t.strategy.value_counts().index[0]


def budget_info(res: RunResults) -> dict | None:
    """{kind, fraction, limit, base} from a result file, else from the spec (a study still running)."""
    for r in res.results.values():
        if r.get("budget"):
            return r["budget"]
    b = (res.spec or {}).get("budget") or {}
    for kind in ("macs", "params", "latency_ms"):
        if b.get(kind) is not None:
            v = float(b[kind])
            return {"kind": kind, "fraction": None if kind == "latency_ms" else v,
                    "limit": v if kind == "latency_ms" else None, "base": None}
    if b.get("latency") is not None:  # a fraction of a latency not measured yet
        return {"kind": "latency_ms", "fraction": float(b["latency"]), "limit": None, "base": None}
    return None


def baseline_metric(res: RunResults) -> float | None:
    for r in res.results.values():
        v = (r.get("baseline") or {}).get("metric_val")
        if v is not None:
            return float(v)
    return None


def _plan_summary(plan_json: str | None, digits: int = 2) -> str:
    if not plan_json or (isinstance(plan_json, float) and math.isnan(plan_json)):
        return "(no plan)"
    ratios = json.loads(plan_json).get("ratios", {})
    return "<br>".join(f"{k}: {v:.{digits}f}" for k, v in ratios.items()) or "(unpruned)"


def metric_name(res: RunResults) -> str:
    spec = res.spec or {}
    m = (spec.get("evaluation") or {}).get("metric") or "metric"
    task = spec.get("task") or {}
    if task.get("factory"):
        m = "metric"
    elif task.get("kind") == "regression":
        m = "neg_mse"
    elif task.get("kind") == "distillation":
        m = task.get("metric") or ("agreement" if task.get("output") == "logits" else "cosine")
    return f"val {m}"


def _completed(res: RunResults, strategies: Iterable[str] | None = None) -> pd.DataFrame:
    t = res.trials
    if t.empty:
        return t
    t = t[(t.state == "COMPLETE") & t.metric.notna()]
    if strategies is not None:
        t = t[t.strategy.isin(list(strategies))]
    return t


# ----------------------------------------------------------------------------------------------- Pareto
def pareto_figure(
    res: "RunResults | str | Path | pd.DataFrame",
    x: str = "macs",
    *,
    strategies: Sequence[str] | None = None,
    baselines: bool = True,
    focus: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Val metric against cost for every completed trial of `strategies` (default: the searched strategy).

    Traces, per strategy: ``Pareto front`` (feasible, non-dominated, joined by a step line), ``dominated``
    (feasible), ``infeasible`` (over the budget: never part of the front); then one labelled marker per
    baseline's chosen plan (``uniform``, ``global``, ``lamp``, ``netadapt``, ``random``) and the searched
    strategy's chosen plan, and the unpruned model (a point at cost 1.0 and a dotted horizontal line). The budget
    is the vertical line (a layout shape named ``budget``) when the budget is on the plotted axis. With `focus`
    the x axis spans the trials, baselines and budget rather than reaching out to the unpruned model.
    """
    if x not in AXES:
        raise AutopruneError(f"pareto_figure x={x!r} is not one of {sorted(AXES)}")
    res = as_results(res)
    col, xtitle, kind = AXES[x]
    main = main_strategy(res)
    strategies = list(strategies) if strategies is not None else ([main] if main else [])
    fig = go.Figure()
    done = _completed(res, strategies)
    done = done[done[col].notna()] if col in done else done.iloc[0:0]
    for s in strategies:
        d = done[done.strategy == s].copy()
        if d.empty:
            continue
        d["front"] = pareto_flags(d, col) if col != "macs_ratio" or "pareto" not in d else d.pareto.astype(bool)
        d["hover"] = [
            f"<b>{s} trial {int(r.number)}</b>{' (' + str(r.warm_start) + ')' if isinstance(r.warm_start, str) else ''}"
            f"<br>{metric_name(res)}: {r.metric:.4f}<br>MACs {r.macs_ratio:.3f} · params {r.params_ratio:.3f}"
            + (f" · {r.latency_ms:.3g} ms" if pd.notna(r.latency_ms) else "")
            + f"<br>{_plan_summary(r.plan)}"
            for r in d.itertuples()
        ]
        c = _color(s)
        groups = [
            ("infeasible", d[~d.feasible.astype(bool)], dict(symbol="x-thin-open", size=8, color="#D62728", line=dict(width=2, color="#D62728"))),
            ("dominated", d[d.feasible.astype(bool) & ~d.front], dict(symbol="circle-open", size=8, color=c, line=dict(width=1.5))),
            ("Pareto front", d[d.feasible.astype(bool) & d.front].sort_values(col), dict(symbol="circle", size=10, color=c, line=dict(width=1, color="white"))),
        ]
        for label, g, marker in groups:
            if g.empty:
                continue
            front = label == "Pareto front"
            fig.add_trace(go.Scatter(
                x=g[col], y=g.metric, mode="lines+markers" if front else "markers", marker=marker,
                line=dict(shape="vh", color=c, width=1.5) if front else None,
                name=f"{label} ({s})" if len(strategies) > 1 else label, legendgroup=s,
                hovertext=g.hover, hoverinfo="text", customdata=g.number,
                meta={"role": label, "strategy": s},
            ))
    # baselines and chosen plans, from the result files; labelled by annotations fanned out so they never overlap
    labelled = []
    for s, r in res.results.items():
        b = r.get("best")
        if not b or (s not in strategies and (not baselines or s not in BASELINES)):
            continue
        xv = b.get({"macs": "macs_ratio", "params": "params_ratio", "latency": "latency_ms"}[x])
        if xv is None:
            continue
        chosen = s in strategies
        fig.add_trace(go.Scatter(
            x=[xv], y=[b["metric_val"]], mode="markers",
            marker=dict(symbol="star" if chosen else BASELINE_SYMBOLS.get(s, "circle"), size=18 if chosen else 13,
                        color=_color(s), line=dict(width=1.5, color="black")),
            name=f"chosen: {s}" if chosen else f"baseline: {s}",
            hovertext=[f"<b>{s} best (trial {b.get('trial')})</b><br>{metric_name(res)}: {b['metric_val']:.4f}"
                       + (f" · test {b['metric_test']:.4f}" if b.get("metric_test") is not None else "")
                       + f"<br>MACs {b['macs_ratio']:.3f} · params {b['params_ratio']:.3f}<br>"
                       + _plan_summary(json.dumps(b.get("plan")))],
            hoverinfo="text", meta={"role": "chosen" if chosen else "baseline", "strategy": s},
        ))
        labelled.append((float(xv), float(b["metric_val"]), f"chosen ({s})" if chosen else s, chosen))
    for side, items in ((1, [t for t in labelled if t[3]]), (-1, [t for t in labelled if not t[3]])):
        items.sort(key=lambda t: -t[1])  # top to bottom: offsets grow downwards, so labels keep their order
        for i, (xv, yv, text, _) in enumerate(items):
            fig.add_annotation(x=xv, y=yv, text=f"<b>{text}</b>" if side > 0 else text, showarrow=True,
                               arrowhead=0, arrowwidth=1, arrowcolor="#888", ax=side * 80,
                               ay=int((i - (len(items) - 1) / 2) * 24), xanchor="left" if side > 0 else "right",
                               font=dict(size=12), bgcolor="rgba(255,255,255,0.8)", name=f"label:{text}")
    base_metric = baseline_metric(res)
    budget = budget_info(res)
    base_x = 1.0 if x in ("macs", "params") else (budget or {}).get("base") if (budget or {}).get("kind") == "latency_ms" else None
    if base_metric is not None and base_x is not None:
        fig.add_trace(go.Scatter(
            x=[base_x], y=[base_metric], mode="markers", name="unpruned",
            marker=dict(symbol="circle", size=13, color="black"),
            hovertext=[f"<b>unpruned model</b><br>{metric_name(res)}: {base_metric:.4f}"], hoverinfo="text",
            meta={"role": "unpruned"},
        ))
    if base_metric is not None:  # also a line: the unpruned point may lie outside the focused x range
        fig.add_hline(y=base_metric, line=dict(color="black", dash="dot", width=1), name="unpruned",
                      annotation_text=f"unpruned {base_metric:.3f}" + (f" at {base_x:.3g}" if base_x else ""),
                      annotation_position="bottom right")
    bx = None
    if budget and budget.get("kind") == kind:
        bx = budget.get("fraction") if kind != "latency_ms" else budget.get("limit")
        if bx is not None:
            label = f"budget {bx:.0%} {'MACs' if x == 'macs' else x}" if kind != "latency_ms" else f"budget {bx:g} ms"
            fig.add_vline(x=bx, line=dict(color="#D62728", dash="dash", width=2), name="budget",
                          annotation_text=label, annotation_position="top left",
                          annotation_font=dict(color="#D62728"))
    # focus the x axis on the trials, baselines and budget (the unpruned model at 1.0 would squash them)
    xs = [v for tr in fig.data if (tr.meta or {}).get("role") != "unpruned" for v in tr.x if v is not None]
    xs += [bx] if bx is not None else []
    if xs and focus:
        lo, hi = min(xs), max(xs)
        pad = max((hi - lo) * 0.12, abs(hi) * 0.04, 1e-6)
        fig.update_xaxes(range=[lo - pad * 2.2, hi + pad * 2.2])
        if bx is not None:
            fig.add_vrect(x0=bx, x1=hi + pad * 2.2, fillcolor="#D62728", opacity=0.05, line_width=0,
                          name="over budget", layer="below")
    n_fail = int((res.trials.state == "FAIL").sum()) if not res.trials.empty else 0
    sub = f"{len(done)} completed trials" + (f", {n_fail} failed (not drawn)" if n_fail else "")
    name = (res.spec or {}).get("name") or res.run_dir.name
    fig.update_layout(
        title=dict(text=(title or f"{name}: {metric_name(res)} vs {x}") + f"<br><sup>{sub}</sup>"),
        xaxis_title=xtitle, yaxis_title=metric_name(res), template=TEMPLATE, hovermode="closest",
        legend=dict(orientation="v", yanchor="top", y=1, xanchor="left", x=1.02),
        margin=dict(r=160),
    )
    return fig


# ----------------------------------------------------------------------------------------------- ratio profile
def group_table(res: RunResults, *, use_session: bool = True) -> pd.DataFrame:
    """group (network order), channels, macs_share: from the run's groups.csv (written by the search) when
    `use_session`, else estimated from the sensitivity table."""
    if use_session and res.groups is not None and not res.groups.empty:
        return res.groups[["group", "channels", "macs_share", "prunable"]]
    sens = res.sensitivity
    if sens is None or sens.empty:
        return pd.DataFrame(columns=["group", "channels", "macs_share", "prunable"])
    base = _base_macs(res)
    rows = []
    for g, d in sens.groupby("group", sort=False):
        r = d.sort_values("ratio").iloc[-1]
        pruned = int(r.channels) - int(r.channels_kept)
        # MACs removed per removed channel, scaled to the whole group: linear in the channel count
        share = (float(r.macs_saved) / pruned * int(r.channels) / base) if base and pruned else None
        rows.append({"group": g, "channels": int(r.channels), "macs_share": share, "prunable": True})
    return pd.DataFrame(rows)


def _base_macs(res: RunResults) -> float | None:
    for r in res.results.values():
        m = (r.get("baseline") or {}).get("macs")
        if m:
            return float(m)
    return None


def plan_ratios(res: RunResults, strategy: str) -> dict[str, float] | None:
    r = res.results.get(strategy)
    if r and r.get("best"):
        return dict(r["best"]["plan"]["ratios"])
    return None


def ratio_profile(
    res: "RunResults | str | Path",
    strategy: str = "optuna",
    compare: Sequence[str] = ("uniform", "netadapt"),
    *,
    use_session: bool = True,
) -> go.Figure:
    """The chosen plan's pruning ratio per group, in network order, against other strategies' plans.

    Top: one bar trace per plan (``strategy`` first, then each of `compare` that has a result). Bottom: each
    group's share of the model's MACs, with its channel count (and channels kept by the chosen plan) as text.
    Group order is the chosen plan's key order (network order); channel counts and MACs shares come from the
    spec's model (`api.session(spec).pruner.table()`), or from the sensitivity table when that cannot load.
    """
    res = as_results(res)
    plan = plan_ratios(res, strategy)
    if plan is None:
        raise AutopruneError(f"strategy {strategy!r} has no chosen plan in {res.run_dir} (have {sorted(res.results)}); "
                             "run the search to the end, or pass strategy= one of those")
    groups = group_table(res, use_session=use_session)
    order = list(plan)
    order += [g for g in groups.group if g not in order and g in set(groups.group[groups.prunable.astype(bool)])]
    info = groups.set_index("group") if not groups.empty else pd.DataFrame()
    ch = [int(info.channels[g]) if g in info.index else None for g in order]
    share = [float(info.macs_share[g]) if g in info.index and pd.notna(info.macs_share[g]) else None for g in order]
    labels = [f"{g}<br>{c} ch" if c else g for g, c in zip(order, ch)]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.68, 0.32], vertical_spacing=0.06)
    for s in [strategy, *[c for c in compare if c != strategy]]:
        p = plan_ratios(res, s)
        if p is None:
            continue
        r = [p.get(g, 0.0) for g in order]
        kept = [None if c is None else c - math.floor(c * v + 1e-9) for c, v in zip(ch, r)]
        fig.add_trace(go.Bar(
            x=labels, y=r, name=f"{s} (chosen)" if s == strategy else s, marker_color=_color(s),
            text=[f"{v:.2f}" for v in r], textposition="outside", cliponaxis=False,
            hovertext=[f"<b>{s}</b> {g}<br>ratio {v:.3f}" + (f"<br>channels kept {k}/{c}" if c else "")
                       for g, v, k, c in zip(order, r, kept, ch)],
            hoverinfo="text", meta={"role": "plan", "strategy": s},
        ), row=1, col=1)
    chosen_kept = [None if c is None else c - math.floor(c * plan.get(g, 0.0) + 1e-9) for g, c in zip(order, ch)]
    fig.add_trace(go.Bar(
        x=labels, y=[None if v is None else 100 * v for v in share], name="MACs touched by the group",
        marker_color="#B0B0B0",
        text=[f"{100 * v:.0f}%" if v is not None else "" for v in share], textposition="outside", cliponaxis=False,
        hovertext=[f"{g}: {c} channels, {k} kept by {strategy}<br>{100 * v:.1f}% of the model's MACs" if v is not None
                   else g for g, c, k, v in zip(order, ch, chosen_kept, share)],
        hoverinfo="text", showlegend=True, meta={"role": "macs_share"},
    ), row=2, col=1)
    ymax = max([1e-9, *[v for t in fig.data[:-1] for v in t.y if v is not None]])
    fig.update_yaxes(title_text="pruning ratio", range=[0, min(1.0, ymax * 1.18 + 0.02)], row=1, col=1)
    smax = max([1e-9, *[100 * v for v in share if v is not None]])
    # a group's share counts every MAC that scales with its channels (its layers' outputs and the next layers'
    # inputs), so shares of neighbouring groups overlap and add up to more than 100 %
    fig.update_yaxes(title_text="% of MACs touched", range=[0, smax * 1.3], row=2, col=1)
    fig.update_xaxes(title_text="group (network order)", row=2, col=1)
    name = (res.spec or {}).get("name") or res.run_dir.name
    fig.update_layout(title=f"{name}: pruning ratio per group", barmode="group", template=TEMPLATE,
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1))
    return fig


# ----------------------------------------------------------------------------------------------- sensitivity
def _sensitivity(res) -> tuple[pd.DataFrame, RunResults | None]:
    if isinstance(res, pd.DataFrame) and "drop" in res.columns:
        return res, None
    r = as_results(res)
    if r.sensitivity is None or r.sensitivity.empty:
        raise AutopruneError(f"no sensitivity table in {r.run_dir}; run `autoprune sensitivity SPEC` first")
    return r.sensitivity, r


def sensitivity_curves(res, *, tolerance: float | None = None) -> go.Figure:
    """Metric drop against pruning ratio, one line per group (network order), with the tolerance that bounds the
    search as a horizontal line (``search.tolerance``, default 0.05)."""
    sens, r = _sensitivity(res)
    if tolerance is None:
        tolerance = (((r.spec if r else None) or {}).get("search") or {}).get("tolerance", 0.05)
    fig = go.Figure()
    for g, d in sens.groupby("group", sort=False):
        d = d.sort_values("ratio")
        fig.add_trace(go.Scatter(
            x=d.ratio, y=d["drop"], mode="lines+markers", name=f"{g} ({int(d.channels.iloc[0])} ch)",
            hovertext=[f"<b>{g}</b><br>ratio {a:.2f}: keep {k}/{c} channels<br>drop {b:+.4f} (metric {m:.4f})"
                       f"<br>MACs saved {ms:,.0f}" for a, k, c, b, m, ms in
                       zip(d.ratio, d.channels_kept, d.channels, d["drop"], d.metric, d.macs_saved)],
            hoverinfo="text",
        ))
    fig.add_hline(y=tolerance, line=dict(color="#D62728", dash="dash"), name="tolerance",
                  annotation_text=f"tolerance {tolerance:g}", annotation_position="top left",
                  annotation_font=dict(color="#D62728"))
    title = "Sensitivity: val metric drop when one group is pruned alone"
    fig.update_layout(title=title, xaxis_title="pruning ratio of the group", yaxis_title="val metric drop",
                      template=TEMPLATE, hovermode="closest")
    return fig


def sensitivity_heatmap(res) -> go.Figure:
    """Group × ratio heatmap of the metric drop (groups top to bottom in network order; blank where the sweep
    stopped early because the drop already exceeded ``sensitivity.stop_drop``, and at the smaller ratios of a group
    within the tolerance at its largest one, which ``sensitivity.skip_insensitive`` does not sweep)."""
    sens, _ = _sensitivity(res)
    order = list(dict.fromkeys(sens.group))
    z = sens.pivot_table(index="group", columns="ratio", values="drop", aggfunc="first").reindex(order)
    ratios = [float(c) for c in z.columns]
    channels = sens.groupby("group", sort=False).channels.first()
    fig = go.Figure(go.Heatmap(
        z=z.values, x=[f"{r:.2f}" for r in ratios], y=[f"{g} ({int(channels[g])} ch)" for g in order], colorscale="Reds", zmin=0,
        zmax=max(0.05, float(z.max().max())), colorbar=dict(title="drop"),
        text=[[("" if pd.isna(v) else f"{v + 0.0 if abs(v) >= 0.005 else 0.0:.2f}") for v in row] for row in z.values], texttemplate="%{text}",
        hovertemplate="%{y} at ratio %{x}: drop %{z:.4f}<extra></extra>",
    ))
    fig.update_layout(title="Sensitivity heatmap: val metric drop (blank: sweep stopped early)",
                      xaxis_title="pruning ratio", yaxis_title="group (network order)", template=TEMPLATE)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


# ----------------------------------------------------------------------------------------------- progress
def best_so_far(res, strategies: Sequence[str] | None = None) -> pd.DataFrame:
    """Per strategy, its completed trials in completion order with ``evaluation`` (1, 2, ...), ``elapsed_s``
    (since that strategy's first trial started), ``best`` (the metric of the best feasible trial so far, by the
    search's score; NaN before the first) and ``ranked_by`` ("metric"; "val loss" under search.score: loss or
    "metric + width balance" under search.score: balanced, where a better-ranked trial can have a lower metric and
    the line can step down)."""
    r = as_results(res)
    done = _completed(r, strategies)
    out = []
    for s, d in done.groupby("strategy", sort=False):
        d = d.sort_values(["datetime_complete", "number"]).copy()
        d["evaluation"] = range(1, len(d) + 1)
        t0 = pd.to_datetime(d.datetime_start).min()
        d["elapsed_s"] = (pd.to_datetime(d.datetime_complete) - t0).dt.total_seconds()
        # the metric of the best feasible trial so far by what the search ranked (its score: the metric, or minus
        # the loss under search.score: loss), so the line ends at the reported best
        feasible = d.feasible.astype(bool)
        has_score = "score" in d and d.score.notna().any()
        key = (d.score if has_score else d.metric).where(feasible)
        # the score is the metric itself unless the search ranked by minus the val loss
        d["ranked_by"] = ("metric" if not has_score or not (d.score.notna() & (d.score != d.metric)).any() else
                          "metric + width balance" if "width_balance" in d and d.width_balance.notna().any() else
                          "val loss")
        best, top, cur = [], None, float("nan")
        for k, m in zip(key, d.metric):
            if pd.notna(k) and (top is None or k > top):
                top, cur = k, m
            best.append(cur)
        d["best"] = best
        out.append(d)
    return pd.concat(out, ignore_index=True) if out else done.assign(evaluation=[], elapsed_s=[], best=[], ranked_by=[])


def search_progress(res, strategies: Sequence[str] | None = None) -> go.Figure:
    """Best feasible metric so far per strategy: against evaluations (left) and wall time (right), shared y."""
    r = as_results(res)
    d = best_so_far(r, strategies)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("against evaluations", "against wall time"))
    for s, g in d.groupby("strategy", sort=False):
        g = g[g.best.notna()]
        if g.empty:
            continue
        by = {"metric": "", "val loss": "<br>(the best by val loss: search.score: loss)"}.get(
            g.ranked_by.iloc[0], "<br>(the best by metric + width balance: search.score: balanced)")
        hover = [f"<b>{s}</b> trial {int(n)}<br>best so far {b:.4f}{by}" for n, b in zip(g.number, g.best)]
        for col, xcol in ((1, "evaluation"), (2, "elapsed_s")):
            fig.add_trace(go.Scatter(
                x=g[xcol], y=g.best, mode="lines+markers" if len(g) > 1 else "markers", line_shape="hv",
                name=s, legendgroup=s, showlegend=col == 1, marker=dict(color=_color(s), size=6 if len(g) > 1 else 12),
                line=dict(color=_color(s)), hovertext=hover, hoverinfo="text", meta={"strategy": s, "x": xcol},
            ), row=1, col=col)
    base = baseline_metric(r)
    if base is not None:
        fig.add_hline(y=base, line=dict(color="black", dash="dot"), annotation_text="unpruned",
                      annotation_position="bottom right", name="unpruned")
    fig.update_xaxes(title_text="evaluations (completed trials)", row=1, col=1)
    fig.update_xaxes(title_text="wall time since the strategy started (s)", row=1, col=2)
    ranked = set(d.ranked_by) if "ranked_by" in d else set()
    fig.update_yaxes(title_text=f"best feasible {metric_name(r)} so far"
                     + (" (the best by val loss where search.score: loss)" if "val loss" in ranked else "")
                     + (" (the best by metric + width balance where search.score: balanced)"
                        if "metric + width balance" in ranked else ""), row=1, col=1)
    name = (r.spec or {}).get("name") or r.run_dir.name
    fig.update_layout(title=f"{name}: search progress", template=TEMPLATE)
    return fig

__all__ = ["pareto_figure", "ratio_profile", "sensitivity_curves", "sensitivity_heatmap", "search_progress",
           "best_so_far", "group_table", "as_results"]
