"""`autoprune` command line (Typer). Bad input exits with code 2 and one message; `--debug` shows tracebacks."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import List, Optional

import typer

from autoprune.pruning.criteria import CRITERION_HELP
from autoprune import settings
from autoprune.errors import AutopruneError

_CRITERIA_TEXT = "\n".join(f"  {k:<9} {v}" for k, v in CRITERION_HELP.items())

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help=(
        "autoprune: find how much to prune each layer of a PyTorch model under a MACs, params or latency budget.\n\n"
        "Typical flow: `autoprune groups SPEC` (what can be pruned), `autoprune search SPEC` (sensitivity + "
        "search, resumable), `autoprune report RUN`, `autoprune export RUN`.\n\n"
        "Pruning criteria (pruning.criterion in the spec):\n\n" + _CRITERIA_TEXT.replace("\n", "\n\n")
    ),
)
_state = {"debug": False}

SpecArg = typer.Argument(..., help="Spec YAML (see search_spaces/), validated before any work starts.")
SetOpt = typer.Option(None, "--set", help="Override a spec key, e.g. --set search.n_trials=20 (repeatable).")


def _overrides(pairs: Optional[List[str]]) -> dict:
    import yaml

    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise AutopruneError(f"--set {p!r}: expected KEY=VALUE, e.g. search.n_trials=20")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _session(spec: str, sets=None, extra: Optional[dict] = None):
    from autoprune.app import api

    ov = _overrides(sets)
    ov.update({k: v for k, v in (extra or {}).items() if v is not None})
    return api.session(spec, ov)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress messages.")) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def groups(spec: str = SpecArg, as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
           sets: Optional[List[str]] = SetOpt) -> None:
    """List the prunable groups: name, channels, coupled layers, MACs share."""
    s = _session(spec, sets)
    df = s.pruner.table()
    df["macs_share"] = df.group.map(s.cost_model.macs_shares()).round(4)
    if as_json:
        typer.echo(df.to_json(orient="records", indent=2))
    else:
        typer.echo(df.drop(columns=["members"]).to_string(index=False))
        typer.echo(f"\nunpruned: {s.base_costs.macs:,} MACs, {s.base_costs.params:,} params; "
                   f"{len(s.pruner.prunable_names)} of {len(df)} groups prunable")


@app.command()
def train(spec: str = SpecArg, sets: Optional[List[str]] = SetOpt,
          sparsity_l1: Optional[float] = typer.Option(None, "--sparsity-l1", help="L1 penalty on BN scales (Network Slimming).")) -> None:
    """Train (or load from cache) the spec's model and print its val/test metric."""
    s = _session(spec, sets, {"train.sparsity_l1": sparsity_l1})
    t = s.target
    typer.echo(f"checkpoint: {t.checkpoint}")
    typer.echo(f"val {s.evaluator.metric_name}: {s.evaluator.score(t.model, 'val'):.4f}  "
               f"test: {s.evaluator.score(t.model, 'test'):.4f}")


@app.command()
def sensitivity(spec: str = SpecArg, sets: Optional[List[str]] = SetOpt) -> None:
    """Sweep each group's ratio alone and print the metric drop (cached; reused by the search)."""
    s = _session(spec, sets)
    res = s.sensitivity()
    df = res.table
    typer.echo(f"baseline (BN-recalibrated) val metric: {res.baseline_metric:.4f}; evaluations run: {res.evaluations}")
    if not df.empty:
        drops = df.pivot(index="group", columns="ratio", values="drop").round(3)
        typer.echo(drops.to_string(na_rep="-"))
        if drops.isna().any().any():
            typer.echo("-: not evaluated (the group's drop passed sensitivity.stop_drop at a smaller ratio, or "
                       "sensitivity.skip_insensitive skipped it: within search.tolerance at its largest ratio)")
    typer.echo(f"table: {s.run_dir / 'sensitivity.csv'}")


@app.command()
def search(
    spec: str = SpecArg,
    n_trials: Optional[int] = typer.Option(None, "--n-trials", help="Completed trials to reach (resumes an existing study)."),
    strategy: Optional[str] = typer.Option(None, help="optuna | uniform | global | lamp | netadapt | random"),
    sampler: Optional[str] = typer.Option(None, help="tpe | nsga2 | gp | random"),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL or journal path (default: RUN/study.journal)."),
    backend: Optional[str] = typer.Option(None, help="optuna (in process) | ray (Ray Tune)"),
    timeout_s: Optional[float] = typer.Option(None, "--timeout-s", help="Wall-time limit of the search, sensitivity "
                                              "sweep included (search.timeout_s): no trial starts after it; the "
                                              "default priors skip a sweep that would take over 2/3 of it."),
    baselines: bool = typer.Option(False, "--baselines", help="Also run uniform, global and lamp at the same budget."),
    recover_steps: int = typer.Option(0, "--recover-steps", help="With --baselines: fine-tune every strategy's best "
                                      "plan this many steps, the same for all, and compare them after it (the "
                                      "default search ranks plans by how they should recover); 0: compare before."),
    sets: Optional[List[str]] = SetOpt,
) -> None:
    """Run or resume a budget-constrained search; writes RUN/result.json and prints the best plan."""
    from autoprune.app import api

    s = _session(spec, sets, {"search.strategy": strategy, "search.sampler": sampler, "search.backend": backend,
                              "search.timeout_s": timeout_s})
    if recover_steps and not baselines:
        raise typer.BadParameter("--recover-steps compares strategies after recovery: add --baselines (or fine-tune "
                                 "the best plan alone with `autoprune finetune`)", param_hint="--recover-steps")
    t0 = time.perf_counter()
    result = api.search(s, n_trials=n_trials, storage=storage)
    _print_result(result)
    if baselines:
        for b in ("uniform", "global", "lamp"):
            _print_result(api.search(s, strategy=b, storage=storage), short=True)
        if recover_steps > 0:
            _print_recovered(api.recover(s, strategies=(s.spec.search.strategy, "uniform", "global", "lamp"),
                                         steps=recover_steps))
        elif s.spec.search.strategy == "optuna":
            typer.echo("(val/test before recovery; the search ranks plans by how they should recover: compare "
                       "after the same fine-tune with --recover-steps 300)")
    typer.echo(f"run directory: {s.run_dir}   ({time.perf_counter() - t0:.1f} s)")


def _print_recovered(df) -> None:
    steps = int(df.steps.iloc[0])
    cols = ["strategy", "val_before", "val", "test", "macs_ratio"]
    typer.echo(f"\nafter the same {steps}-step fine-tune of each strategy's best plan (lr search.recovery_lr, else "
               f"train.lr / 10; val_before: before it):\n" + df[cols].round(4).to_string(index=False))


def _metric(value: float, name: str | None) -> str:
    """A metric for the summary line: named when the result says which it is, and a next-token loss (neg_nll) also
    as the perplexity it means."""
    text = f"{name} {value:.4f}" if name else f"{value:.4f}"
    if name == "neg_nll" and value == value:
        text += f" (perplexity {math.exp(-value):.3g})"
    return text


def _print_result(r: dict, short: bool = False) -> None:
    b = r.get("best")
    head = f"[{r['strategy']}] "
    if not b:
        typer.echo(head + "no plan met the budget")
    else:
        name = r.get("metric_name")
        typer.echo(head + f"val {_metric(b['metric_val'], name)}  test {_metric(b.get('metric_test', float('nan')), name)}  "
                   f"MACs {b['macs_ratio']:.3f}  params {b['params_ratio']:.3f}  "
                   f"(budget {r['budget']['kind']} <= {r['budget']['limit']:,.4g}; baseline val "
                   f"{_metric(r['baseline']['metric_val'], name)}; {r['n_trials_complete']} trials, "
                   f"{r['n_trials_failed']} failed)")
        if short:
            return
        typer.echo(f"plan: {b['summary']}")
    for note in r.get("notes") or []:  # what the search decided or noticed, with what to change (result.json too)
        typer.echo(wrap_note(note))


def wrap_note(note: str, width: int | None = None) -> str:
    """`note: ...` folded to the terminal's width (at least 60 columns; 100 when there is no terminal), the
    continuation lines indented under the text, so that a note of several sentences reads as a paragraph."""
    width = width or max(shutil.get_terminal_size((100, 24)).columns, 60)
    return textwrap.fill(note, width=width, initial_indent="note: ", subsequent_indent="      ",
                         break_long_words=False, break_on_hyphens=False)


@app.command()
def report(
    run: str = typer.Argument(..., help="Run directory (runs/NAME) or its spec."),
    fmt: str = typer.Option("table", "--format", help="table | json | csv (csv: every trial)"),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report to this path."),
) -> None:
    """Summarise a run: best plan per strategy, failures, trial counts."""
    from autoprune.results.tables import load

    res = load(run)
    if html is not None:
        from autoprune.results.report import html_report

        html_report(res, html)
        typer.echo(f"wrote {html}")
        return
    if fmt == "json":
        typer.echo(json.dumps(res.results, indent=2, default=str))
    elif fmt == "csv":
        typer.echo(res.trials.to_csv(index=False))
    elif fmt == "table":
        if not res.results:
            typer.echo("no finished search yet; trials so far:")
        else:
            summary = res.summary()
            typer.echo(summary.to_string(index=False))
            if "optuna" in res.results and len(res.results) > 1 and "recovered_test" not in summary:
                typer.echo("(metrics before recovery; the search ranks plans by how they should recover: compare the "
                           "strategies after the same fine-tune with `autoprune search SPEC --baselines "
                           "--recover-steps 300`)")
        counts = res.trials.groupby(["strategy", "state"]).size().unstack(fill_value=0) if not res.trials.empty else None
        if counts is not None:
            typer.echo("\ntrials by state:\n" + counts.to_string())
        fails = res.trials[res.trials.state == "FAIL"] if not res.trials.empty else res.trials
        if not fails.empty:
            typer.echo("\nfailed trials:")
            for _, f in fails.iterrows():
                typer.echo(f"  {f.strategy} #{f.number}: {f.fail_reason}")
    else:
        raise AutopruneError(f"--format {fmt!r}: use table, json or csv")


@app.command()
def export(
    run: str = typer.Argument(..., help="The run: its run directory (runs/NAME), or the spec its search was given."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default RUN/export)."),
    strategy: str = typer.Option("optuna", help="Which strategy's best plan to export."),
    trial: Optional[int] = typer.Option(None, help="Export this trial's plan instead of the best."),
    plan: Optional[Path] = typer.Option(None, help="Export a plan JSON file instead."),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Also write model.onnx."),
) -> None:
    """Write the physically smaller model: state dict, manifest, costs and ONNX."""
    from autoprune.app import api
    from autoprune.pruning.plan import PruningPlan

    p = PruningPlan.load(plan) if plan else None
    path = api.export(run, out=out, plan=p, strategy=strategy, trial=trial, onnx=onnx)
    typer.echo(f"exported to {path}")
    typer.echo((path / "costs.json").read_text())


@app.command()
def demo(
    n_trials: int = typer.Option(60, "--n-trials", help="Search trials."),
    spec: str = typer.Option("", help="Spec to run (default: the bundled MNIST-1D CNN at 50% MACs)."),
    recover_steps: int = typer.Option(300, "--recover-steps", help="Fine-tune every strategy's best plan this many "
                                      "steps, the same for all, and compare them after it (0: skip)."),
) -> None:
    """The main job on the built-in default: train the MNIST-1D CNN, sensitivity, search, baselines, the same
    short recovery for each strategy's best plan, export."""
    from autoprune.app import api
    from autoprune.results.tables import load

    s = _session(spec or _default_spec(), None, {"search.n_trials": n_trials})
    typer.echo(f"spec {s.spec.name}: {s.spec.model.factory} on {s.spec.data.factory}, budget {s.spec.budget.kind} "
               f"<= {s.spec.budget.value}")
    typer.echo(f"baseline val {s.evaluator.metric_name}: {s.baseline_metric:.4f}; "
               f"{len(s.pruner.prunable_names)} prunable groups; {s.base_costs.macs:,} MACs")
    groups_df = s.pruner.table()
    groups_df["macs_share"] = groups_df.group.map(s.cost_model.macs_shares()).round(3)
    typer.echo("\nprunable groups:\n" + groups_df[["group", "channels", "prunable", "macs_share"]].to_string(index=False))
    sens = s.sensitivity().table
    if not sens.empty:
        typer.echo("\nsensitivity (val drop when one group is pruned alone):\n"
                   + sens.pivot(index="group", columns="ratio", values="drop").round(3).to_string() + "\n")
    _print_result(api.search(s))
    for b in ("uniform", "global", "lamp", "netadapt"):
        _print_result(api.search(s, strategy=b), short=True)
    out = api.export(s, strategy="optuna", onnx=True)
    summary = load(s.run_dir).summary()
    if recover_steps > 0:  # a recovery of an earlier run on record would show here, then be redone below
        summary = summary.drop(columns=[c for c in summary.columns if c.startswith("recovered_")])
    typer.echo("\n" + summary.to_string(index=False))
    if recover_steps > 0:
        _print_recovered(api.recover(s, strategies=("optuna", "uniform", "global", "lamp", "netadapt"),
                                     steps=recover_steps))
    typer.echo(f"\nexported the best model to {out}; report: autoprune report {s.run_dir}")


@app.command()
def finetune(
    run: str = typer.Argument(..., help="The run whose best plan to fine-tune: its run directory, or its spec."),
    schedule: str = typer.Option("oneshot", help="oneshot | polynomial (TF-MOT PolynomialDecay) | agp (Zhu & Gupta)"),
    steps: Optional[int] = typer.Option(None, help="Fine-tune steps (default 300)."),
    frequency: int = typer.Option(25, help="Prune every N steps (gradual schedules)."),
    initial: float = typer.Option(0.0, help="polynomial: fraction of the final ratios pruned at --begin-step."),
    power: float = typer.Option(3.0, help="polynomial: decay power (3 with --initial 0 is AGP; 1 is a linear ramp)."),
    begin_step: int = typer.Option(0, help="Gradual schedules: first pruning step."),
    end_step: Optional[int] = typer.Option(None, help="Gradual schedules: step that reaches the plan (default 2/3 of --steps)."),
    reconstruct: bool = typer.Option(False, help="Least-squares reconstruction of consuming layers before fine-tuning (one-shot)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the spec's search.recovery_lr, else train.lr / 10)."),
    strategy: str = typer.Option("optuna", help="Which strategy's best plan."),
    out: Optional[Path] = typer.Option(None, help="Export directory (default RUN/finetuned)."),
) -> None:
    """Prune to the chosen plan (one-shot or gradually) while fine-tuning, then export."""
    from autoprune.app.api import finetune as finetune_run

    typer.echo(json.dumps(finetune_run(run, schedule=schedule, steps=steps, lr=lr, strategy=strategy, out=out,
                                       frequency=frequency, reconstruct=reconstruct, initial=initial, power=power,
                                       begin_step=begin_step, end_step=end_step),
                          indent=2, default=str))


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Bind address (default loopback only)."),
    port: int = typer.Option(8765, help="Port."),
    runs: Path = typer.Option(Path("runs"), help="Directory that holds every search's run directory."),
    token_file: Optional[Path] = typer.Option(None, help="Bearer token file (created 0600 if missing)."),
    allow: Optional[List[str]] = typer.Option(
        None, "--allow", metavar="PKG",
        help="Also accept factories from this package and its submodules (repeatable; merged with "
             "$AUTOPRUNE_ALLOWED_FACTORIES). autoprune's factory modules are always accepted; standard-library "
             "modules never are."),
) -> None:
    """HTTP service to launch and watch searches (bearer token required)."""
    from autoprune.app.service import serve as _serve

    _serve(host=host, port=port, runs_dir=runs, token_file=token_file, allowed_factories=tuple(allow or ()))


@app.command()
def agent(
    host: str = typer.Option("127.0.0.1", help="Bind address (default loopback only)."),
    port: int = typer.Option(8766, help="Port."),
    token_file: Optional[Path] = typer.Option(None, help="Bearer token file (created 0600 if missing)."),
) -> None:
    """Latency agent for the target device: times models it rebuilds from JSON, or ONNX files."""
    from autoprune.costs.agent import serve_agent

    serve_agent(host=host, port=port, token_file=token_file)


def _default_spec() -> str:
    here = Path("search_spaces/mnist1d-cnn-macs50.yaml")
    if here.exists():
        return str(here)
    import yaml

    return yaml.safe_dump({
        "name": "mnist1d-cnn-macs50",
        "model": {"factory": "autoprune.model.zoo:cnn1d", "input_shape": [1, 40]},
        "data": {"factory": "autoprune.model.data:mnist1d"},
        "train": {"epochs": 15, "lr": 0.01},
        "budget": {"macs": 0.5},
    }) + "\n"


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's usage-error and abort classes: Typer >= 0.17 vendors its own copy (typer._click) besides click."""
    import click

    usage, abort = [click.exceptions.ClickException], [click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored  # type: ignore[import-not-found]

        usage.append(vendored.ClickException)
        abort += [getattr(vendored, "Abort", click.exceptions.Abort)]
    except ImportError:
        pass
    return tuple(usage), tuple(abort)


def main(argv: Optional[List[str]] = None) -> None:
    settings.configure()  # AUTOPRUNE_* read once, here
    """Entry point: AutopruneError -> one line on stderr and exit code 2 (traceback only with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="autoprune", standalone_mode=False)
    except AutopruneError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and unexpected failures
        click_exc, abort_exc = _click_exceptions()
        if isinstance(e, click_exc):
            if "NoArgsIsHelp" in type(e).__name__:  # bare `autoprune`: the help text, as usage
                typer.echo(str(e.format_message() if hasattr(e, "format_message") else e), err=True)
            else:
                e.show()
            raise SystemExit(2) from None
        if isinstance(e, abort_exc):
            raise SystemExit(1) from None
        if debug:
            raise
        typer.echo(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
