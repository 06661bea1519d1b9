"""Searches on disk and their worker processes: launch, watch, cancel, resume after a restart."""


from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from autoprune import settings
from autoprune.errors import AutopruneError
from autoprune.model.factories import (ALLOW_ENV, FactoryRefused, allowed_from_env, allowed_modules,
                                 check_spec_factories, normalize_allowed)
from autoprune.searching.objective import trial_attrs
from autoprune.searching.studies import best_trial, pid_alive

log = logging.getLogger("autoprune.app.service")

from autoprune.app.service.admission import MAX_RESTARTS, Refused, STATE_DIR, ServiceConfig, TOKEN_ENV

# ------------------------------------------------------------------ searches on disk
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int | None, marker: str) -> bool:
    """True if `pid` runs and (where /proc exists) its command line names this search (no pid reuse)."""
    if not pid or not pid_alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
            if marker not in args:
                return False
            st = Path(f"/proc/{pid}/stat").read_text()
            if st.rsplit(")", 1)[1].split()[0] == "Z":  # a zombie (our own exited child) is not running
                return False
        except OSError:
            return False
    return True


class Searches:
    """The service's searches, all state on disk: RUNS/.service/<id>/{spec.yaml,state.json,exit.json,worker.log}."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.root = cfg.runs_dir / STATE_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}
        self._storages: dict[str, Any] = {}

    def dir(self, sid: str) -> Path:
        from autoprune.spec import _NAME

        if not _NAME.match(sid):
            raise Refused(404, f"no search {sid!r}")
        d = self.root / sid
        if not (d / "state.json").exists():
            raise Refused(404, f"no search {sid!r}")
        return d

    def ids(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/state.json"))

    # ---------------------------------------------------------------- launching and cancelling
    def submit(self, spec) -> dict:
        sid = spec.name
        d = self.root / sid
        if (d / "state.json").exists() and self.status(sid)["status"] in ("running", "queued"):
            raise Refused(409, f"search {sid!r} is already running; cancel it first or use another name")
        d.mkdir(parents=True, exist_ok=True)
        (d / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        (d / "exit.json").unlink(missing_ok=True)
        state = {  # written before the worker starts: a service killed in between restarts it (pid None: queued)
            "id": sid, "name": spec.name, "pid": None, "submitted_at": _now(), "run_dir": str(spec.run_dir),
            "strategy": spec.search.strategy, "n_trials": spec.search.n_trials, "backend": spec.search.backend,
            "storage": spec.search.storage, "budget": {spec.budget.kind: spec.budget.value}, "cancelled_at": None,
            "restarts": 0,
        }
        _write_json(d / "state.json", state)
        self._launch(sid, state)
        return self.status(sid)

    def _launch(self, sid: str, state: dict) -> None:
        """Start (or restart) the worker of a search and record its pid."""
        d = self.root / sid
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}  # the token never reaches user code
        env.update({"AUTOPRUNE_PROGRESS": "0", "PYTHONUNBUFFERED": "1",
                    ALLOW_ENV: ",".join(self.cfg.allowed_factories),  # the worker enforces the same allow-list
                    # the working directory (the runs directory, whose names specs choose) is not an import path
                    "PYTHONSAFEPATH": "1"})
        env.setdefault("RAY_AUTH_MODE", "disabled")
        with open(d / "worker.log", "ab") as logf:
            proc = subprocess.Popen(
                [self.cfg.python, "-m", "autoprune.app.service", "run_worker", str(d)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, cwd=str(self.cfg.runs_dir),
            )
        self._children[sid] = proc
        state["pid"] = proc.pid
        _write_json(d / "state.json", state)

    def resume_interrupted(self) -> list[str]:
        """Restart every search that was queued or running when the service (and its workers) went away:
        not cancelled, its worker gone, and no exit status (or one that says a SIGTERM the service did not
        send interrupted it). The worker resumes from the study storage: finished trials are kept, trials
        left RUNNING are marked failed, and it runs until `n_trials` have completed."""
        resumed = []
        for sid in self.ids():
            d = self.root / sid
            state = _read_json(d / "state.json")
            if not state or state.get("cancelled_at") or self._alive(sid, state):
                continue
            exit_ = _read_json(d / "exit.json")
            if exit_ is not None and not exit_.get("interrupted"):
                continue
            if not (d / "spec.yaml").exists():
                continue
            if state.get("restarts", 0) >= MAX_RESTARTS:
                log.warning("search %s was restarted %d times already; not again", sid, state["restarts"])
                continue
            (d / "exit.json").unlink(missing_ok=True)
            state["restarts"] = state.get("restarts", 0) + 1
            state["resumed_at"] = _now()
            with open(d / "worker.log", "ab") as logf:
                logf.write(f"--- {_now()}: the service restarted; resuming this search\n".encode())
            self._launch(sid, state)
            resumed.append(sid)
            log.info("search %s resumed (restart %d)", sid, state["restarts"])
        return resumed

    def cancel(self, sid: str) -> dict:
        d = self.dir(sid)
        state = _read_json(d / "state.json") or {}
        if self.status(sid)["status"] != "running":
            raise Refused(409, f"search {sid!r} is not running")
        state["cancelled_at"] = _now()
        _write_json(d / "state.json", state)
        pid = state["pid"]
        try:
            os.killpg(pid, signal.SIGTERM)  # the worker's whole process group (Ray workers included)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._alive(sid, state):
            time.sleep(0.1)
        if self._alive(sid, state):  # it did not unwind in time (busy in native code): kill it, and wait for that
            log.warning("search %s did not stop within 10 s of SIGTERM; killing its process group", sid)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._alive(sid, state):
                time.sleep(0.05)
        if not (d / "exit.json").exists() and not self._alive(sid, state):  # killed before it could write its own
            _write_json(d / "exit.json", {"rc": -signal.SIGKILL, "finished_at": _now(), "error": "cancelled",
                                          "interrupted": False})
        return self.status(sid)

    def _alive(self, sid: str, state: dict) -> bool:
        child = self._children.get(sid)
        if child is not None and child.pid == state.get("pid"):
            return child.poll() is None
        return _pid_alive(state.get("pid"), str(self.root / sid))

    # ---------------------------------------------------------------- reading state back
    def status(self, sid: str, *, with_result: bool = False) -> dict:
        d = self.dir(sid)
        state = _read_json(d / "state.json") or {}
        exit_ = _read_json(d / "exit.json")
        alive = self._alive(sid, state)
        if alive:
            status = "running"
        elif not state.get("pid") and exit_ is None and not state.get("cancelled_at"):
            status = "queued"
        elif state.get("cancelled_at"):
            status = "cancelled"
        elif exit_ is not None:
            status = "done" if exit_.get("rc") == 0 else "failed"
        else:
            status = "failed"  # the worker died without writing its exit status
        out = {k: state.get(k) for k in ("id", "name", "submitted_at", "strategy", "backend", "budget", "cancelled_at",
                                         "restarts")}
        out["status"] = status
        out.update(self._progress(state))
        if exit_:
            out["finished_at"] = exit_.get("finished_at")
        if status == "failed":
            out["error"] = (exit_ or {}).get("error") or _tail(d / "worker.log")
        if with_result:
            res = self._result(state)
            out["result"] = res if status == "done" else None
            out["log_tail"] = _tail(d / "worker.log", 20)
        return out

    def _storage_url(self, state: dict) -> str:
        return state.get("storage") or str(Path(state["run_dir"]) / "study.journal")

    def _study(self, state: dict):
        import optuna

        from autoprune.searching.studies import open_storage

        url = self._storage_url(state)
        if "://" not in url and not Path(url.removeprefix("journal:")).exists():
            return None
        try:
            if url not in self._storages:  # one engine / journal reader per storage, not one per request
                self._storages[url] = open_storage(url)
            return optuna.load_study(study_name=f"{state['name']}:{state['strategy']}", storage=self._storages[url])
        except Exception:  # not created yet (the worker is still training / running sensitivity)
            return None

    def _progress(self, state: dict) -> dict:
        from optuna.trial import TrialState

        study = self._study(state)
        total = state.get("n_trials")
        if study is None:
            return {"progress": {"complete": 0, "failed": 0, "total": total}, "best_so_far": None}
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        best = best_trial(study)
        return {
            "progress": {"complete": len(done), "failed": sum(t.state == TrialState.FAIL for t in trials),
                         "total": total},
            "best_so_far": None if best is None else {
                # the value is what the search ranks by (minus the loss under search.score: loss); the metric is recorded
                "trial": best.number, "metric_val": trial_attrs(best).get("metric", best.values[0]), "score": best.values[0],
                "macs_ratio": trial_attrs(best).get("macs_ratio"), "params_ratio": trial_attrs(best).get("params_ratio"),
            },
        }

    def _result(self, state: dict) -> dict | None:
        from autoprune.results.tables import result_path

        return _read_json(result_path(state["run_dir"], state["strategy"]))

    def trials(self, sid: str):
        """The search's trials (pandas) with Pareto flags, read from its storage."""
        from autoprune.results.tables import pareto_flags, trials_frame

        state = _read_json(self.dir(sid) / "state.json") or {}
        study = self._study(state)
        if study is None:
            raise Refused(404, f"search {sid!r} has no trials yet")
        df = trials_frame(study, state["strategy"])
        df["pareto"] = pareto_flags(df)
        return df, state

    def pareto(self, sid: str) -> dict:
        df, state = self.trials(sid)
        ok = df[df.state == "COMPLETE"]
        cols = ["number", "metric", "macs_ratio", "params_ratio", "cost", "feasible", "pareto"]

        def rec(r) -> dict:
            d = {c: (None if _isnan(r[c]) else (r[c].item() if hasattr(r[c], "item") else r[c])) for c in cols}
            d["plan"] = json.loads(r.plan) if isinstance(r.plan, str) else None
            return d

        front = sorted((rec(r) for _, r in ok[ok.pareto].iterrows()), key=lambda p: p["macs_ratio"] or 0)
        return {"id": sid, "objective": "metric (val, higher is better) vs macs_ratio (lower is better)",
                "budget": state.get("budget"), "front": front, "trials": [rec(r) for _, r in ok.iterrows()]}

    def pareto_html(self, sid: str) -> str:
        df, state = self.trials(sid)
        fig = None
        try:  # the project's figure when the plots module provides it
            from autoprune.results.plots import pareto_figure  # type: ignore[attr-defined]

            fig = pareto_figure(df)
        except Exception as e:  # noqa: BLE001 - fall back to a plain scatter
            log.debug("plots.pareto_figure unavailable (%s); using a plain scatter", e)
        if fig is None:
            fig = _pareto_scatter(df, sid, state)
        return fig.to_html(full_html=True, include_plotlyjs=True)


def _isnan(v: Any) -> bool:
    try:
        return v is None or v != v
    except Exception:  # noqa: BLE001
        return False


def _pareto_scatter(df, sid: str, state: dict):
    import plotly.graph_objects as go

    ok = df[df.state == "COMPLETE"].sort_values("macs_ratio")
    fig = go.Figure()
    for label, part, color in (("infeasible", ok[~ok.feasible], "lightgrey"), ("feasible", ok[ok.feasible], "#1f77b4")):
        fig.add_trace(go.Scatter(x=part.macs_ratio, y=part.metric, mode="markers", name=label,
                                 marker={"color": color}, text=[f"trial {n}" for n in part.number]))
    front = ok[ok.pareto]
    fig.add_trace(go.Scatter(x=front.macs_ratio, y=front.metric, mode="lines+markers", name="Pareto front",
                             line={"color": "#d62728"}))
    budget = (state.get("budget") or {}).get("macs")
    if budget:
        fig.add_vline(x=budget, line_dash="dash", annotation_text=f"budget {budget:g}")
    fig.update_layout(title=f"{sid}: val metric vs MACs", xaxis_title="MACs (fraction of unpruned)",
                      yaxis_title="val metric", template="plotly_white")
    return fig


def _tail(path: Path, n: int = 5) -> str | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return "\n".join(lines[-n:]) or None


# ------------------------------------------------------------------ the worker process
def run_worker(state_dir: str) -> int:
    """Run one submitted search (`autoprune search`), then record its exit status for the service.

    Every factory the search imports goes through the service's allow-list (AUTOPRUNE_ALLOWED_FACTORIES, as
    the service resolved it) once more, here where the import happens."""
    from autoprune.app import api
    from autoprune.model import factories

    factories.restrict(allowed_from_env())
    d = Path(state_dir)
    rc, error = 0, None
    cancelled = []

    def on_term(signum, frame):  # cancellation: unwind so the exit status is written
        cancelled.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = api.search(str(d / "spec.yaml"), show_progress=False)
        best = result.get("best") or {}
        print(f"done: {result.get('n_trials_complete')} trials; best {best.get('summary', 'none met the budget')}",
              flush=True)
    except AutopruneError as e:  # bad input: one clear message, exit 2 (as the CLI does)
        rc, error = 2, str(e)
        print(f"error: {e}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        rc, error = 130, "cancelled"
    except BaseException as e:  # noqa: BLE001 - recorded for GET /searches/{id}
        rc, error = 1, f"{type(e).__name__}: {e}"
    interrupted = False
    if cancelled:  # however the layers above handled the interrupt
        rc, error = 130, "cancelled"
        if not (_read_json(d / "state.json") or {}).get("cancelled_at"):
            # not the service's DELETE (it records cancelled_at first): a shutdown; resumed at the next start
            interrupted, error = True, "interrupted by SIGTERM (not cancelled); the service resumes it when it starts"
    if rc and error is None:
        error = _tail(d / "worker.log", 3)
    _write_json(d / "exit.json", {"rc": rc, "finished_at": _now(), "error": error, "interrupted": interrupted})
    return rc


