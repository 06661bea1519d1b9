"""The HTML report: one self-contained page (plotly.js inlined) with every figure of `autoprune.results.plots`
and the run's tables."""

from __future__ import annotations

import html as _html
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from autoprune.results.plots import (baseline_metric, budget_info, main_strategy, metric_name, plan_ratios, as_results,
                                     pareto_figure, ratio_profile, search_progress, sensitivity_curves,
                                     sensitivity_heatmap)
from autoprune.errors import AutopruneError
from autoprune.results.tables import RunResults

def _table(df: pd.DataFrame | None, floatfmt: str = "{:.4g}") -> str:
    if df is None or df.empty:
        return "<p><i>none</i></p>"
    return df.to_html(index=False, border=0, classes="tbl", na_rep="", float_format=floatfmt.format, escape=True)


def report_figures(res: "RunResults | str | Path") -> dict[str, go.Figure]:
    """The report's figures by id; a figure whose data is missing (no sensitivity, no result yet) is left out."""
    res = as_results(res)
    figs: dict[str, go.Figure] = {"pareto": pareto_figure(res, "macs")}
    budget = budget_info(res) or {}
    if budget.get("kind") == "params":
        figs["pareto_params"] = pareto_figure(res, "params")
    if budget.get("kind") == "latency_ms" or (not res.trials.empty and res.trials.latency_ms.notna().any()):
        figs["pareto_latency"] = pareto_figure(res, "latency")
    main = main_strategy(res)
    if main and plan_ratios(res, main) is not None:
        others = [s for s in ("netadapt", "lamp", "global", "random") if s != main and plan_ratios(res, s) is not None]
        figs["ratio_profile"] = ratio_profile(res, main, [s for s in ["uniform", *others[:1]] if s != main])
    if not res.trials.empty:
        figs["progress"] = search_progress(res)
    if res.sensitivity is not None and not res.sensitivity.empty:
        figs["sensitivity_curves"] = sensitivity_curves(res)
        figs["sensitivity_heatmap"] = sensitivity_heatmap(res)
    return figs


def html_report(res: "RunResults | str | Path", path: str | Path) -> Path:
    """Write one self-contained HTML page (plotly.js inlined once, no network needed) with every figure and
    the summary, best-plan, trial-count and failure tables. Returns the path written."""
    res = as_results(res)
    path = Path(path)
    if path.exists() and path.is_dir():
        raise AutopruneError(f"--html {str(path)!r} is a directory; give a file path such as report.html")
    figs = report_figures(res)
    name = (res.spec or {}).get("name") or res.run_dir.name
    parts: list[str] = []
    first = True
    captions = {
        "pareto": "Every completed trial of the search. Filled: Pareto front; open: dominated; red x: over the "
                  "budget. Baselines' chosen plans are labelled; the star is the search's chosen plan.",
        "ratio_profile": "How much each group is cut by the chosen plan, against uniform and another baseline. "
                         "A group's MACs share counts every MAC that scales with its channels (its own outputs and "
                         "the next layers' inputs), so neighbouring groups overlap.",
        "progress": "Best feasible val metric so far, per strategy.",
        "sensitivity_curves": "Each group pruned alone; the dashed line is the tolerance that bounds the search.",
        "sensitivity_heatmap": "The same drops as a group × ratio grid.",
    }
    for fid, fig in figs.items():
        fig_html = fig.to_html(full_html=False, include_plotlyjs=True if first else False, div_id=fid,
                               config={"displaylogo": False, "responsive": True})
        first = False
        cap = captions.get(fid.split("_")[0] if fid.startswith("pareto") else fid, "")
        parts.append(f'<section id="sec-{fid}"><div class="fig">{fig_html}</div><p class="cap">{_html.escape(cap)}</p></section>')
    summary = res.summary()
    best_rows = []
    for s, r in res.results.items():
        b = r.get("best") or {}
        best_rows.append({"strategy": s, "trial": b.get("trial"), "plan": b.get("summary", "(no plan met the budget)")})
    counts = (res.trials.groupby(["strategy", "state"]).size().unstack(fill_value=0).reset_index()
              if not res.trials.empty else None)
    fails = (res.trials[res.trials.state == "FAIL"][["strategy", "number", "fail_reason"]]
             if not res.trials.empty else None)
    budget = budget_info(res) or {}
    bdesc = (f"{budget.get('kind')} ≤ {budget['fraction']:.0%} of the unpruned model" if budget.get("fraction") is not None
             else f"{budget.get('kind')} ≤ {budget.get('limit')}") if budget else "unknown"
    base = baseline_metric(res)
    head = (f"<p>Run directory <code>{_html.escape(str(res.run_dir))}</code> · budget {_html.escape(bdesc)}"
            + (f" · unpruned {_html.escape(metric_name(res))} {base:.4f}" if base is not None else "") + "</p>")
    tables = (
        "<h2>Best plan per strategy</h2>" + _table(summary)
        + "<h2>Chosen plans</h2>" + _table(pd.DataFrame(best_rows))
        + "<h2>Trials by state</h2>" + _table(counts)
        + "<h2>Failed trials</h2>" + _table(fails)
        + "<h2>Spec</h2><pre>" + _html.escape(json.dumps(res.spec, indent=2, default=str) if res.spec else "(not recorded)") + "</pre>"
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>autoprune report: {_html.escape(name)}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
.fig {{ height: 520px; }} .cap {{ color: #555; font-size: 0.9em; margin-top: 2px; }}
table.tbl {{ border-collapse: collapse; font-size: 0.9em; }}
table.tbl th, table.tbl td {{ padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }}
table.tbl th {{ background: #f5f5f5; }} pre {{ background: #f8f8f8; padding: 8px; font-size: 0.8em; overflow-x: auto; }}
</style></head>
<body>
<h1>autoprune report: {_html.escape(name)}</h1>
{head}
{''.join(parts)}
{tables}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


__all__ = ["report_figures", "html_report"]
