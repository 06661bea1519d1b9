"""The search service: launch and watch searches over HTTP (FastAPI + uvicorn).

    autoprune serve [--host 127.0.0.1] [--port 8765] [--runs runs] [--token-file FILE]

Endpoints (every one, the OpenAPI schema included, needs ``Authorization: Bearer <token>``):

- ``POST /searches``: a spec as YAML or JSON -> ``{"id": ...}``; validated before any work starts (422 with the
  spec's validation message otherwise), then run by a worker process (``python -m autoprune.service _worker``,
  i.e. the ``autoprune search`` path; the ray backend runs there too).
- ``GET /searches``: every search with status, progress (completed/total trials) and best value so far.
- ``GET /searches/{id}``: the same plus ``result`` (the run's result.json) when done.
- ``GET /searches/{id}/pareto`` (JSON) and ``/searches/{id}/pareto.html`` (plotly figure).
- ``DELETE /searches/{id}``: cancels a running search (its process group gets SIGTERM, then SIGKILL).

State lives only in the run directories and the study storage: ``RUNS/.service/<id>/`` holds the submitted
spec, the worker's pid, its log and exit status, and progress is read from the Optuna storage. A restarted
service therefore lists running and finished searches again, and workers outlive it; a search whose worker
died with the service (a crash, a reboot: no exit status, or interrupted by a SIGTERM the service did not
send) is restarted when the service starts again, and resumes from its storage (finished trials are kept).

Security: loopback by default; a bearer token from ``AUTOPRUNE_TOKEN`` or a token file (created 0600, refused
when others can read it), compared in constant time and never logged or passed to workers; a spec's
``output``, checkpoint and journal storage must stay inside the runs directory and SQL storage must be the
service's own and a Ray cluster only the local one; every factory a spec names (model, data, task,
evaluation.metric) must come from autoprune's factory modules or a package the operator allows at start
(``--allow mypkg`` / ``AUTOPRUNE_ALLOWED_FACTORIES=mypkg``), never the standard library, with plain JSON
kwargs, checked on the text before anything is imported and again where the worker imports it (see
`autoprune.factories`); request bodies are limited (``AUTOPRUNE_MAX_BODY``, default 1 MiB); specs are parsed with
``yaml.safe_load``/JSON and nothing is ever unpickled.
"""

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

from autoprune.errors import AutopruneError
from autoprune.factories import (ALLOW_ENV, FactoryRefused, allowed_from_env, allowed_modules,
                                 check_spec_factories, normalize_allowed)
from autoprune.search.objective import trial_attrs
from autoprune.search.study import pid_alive

log = logging.getLogger("autoprune.service")

TOKEN_ENV = "AUTOPRUNE_TOKEN"
MAX_BODY_ENV = "AUTOPRUNE_MAX_BODY"
STORAGE_ENV = "AUTOPRUNE_SERVICE_STORAGE"
DEFAULT_MAX_BODY = 1 << 20
MAX_RESTARTS = 5  # a search whose worker keeps dying is not restarted at every start for ever
STATE_DIR = ".service"


# ------------------------------------------------------------------ configuration
@dataclass
class ServiceConfig:
    runs_dir: Path
    token: str
    storage: str | None = None  # SQL URL every search writes to; None: each run's own journal file
    allowed_factories: tuple[str, ...] = ()  # the operator's packages, besides autoprune's factory modules
    max_body_bytes: int = DEFAULT_MAX_BODY
    python: str = field(default_factory=lambda: sys.executable)

    def __post_init__(self) -> None:
        self.runs_dir = Path(self.runs_dir).resolve()
        if not self.token:
            raise AutopruneError("the service needs a non-empty bearer token")
        self.allowed_factories = normalize_allowed(self.allowed_factories or ())


def load_token(token_file: Path | None, runs_dir: Path) -> tuple[str, str]:
    """The bearer token and where it came from: AUTOPRUNE_TOKEN, else a token file (created 0600 if missing)."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env, f"${TOKEN_ENV}"
    path = Path(token_file) if token_file else Path(runs_dir) / STATE_DIR / "token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile: read that one
            return load_token(path, runs_dir)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token, str(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AutopruneError(f"token file {str(path)!r} is readable by others (mode {oct(mode & 0o777)}); "
                             f"run `chmod 600 {path}`")
    token = path.read_text().strip()
    if not token:
        raise AutopruneError(f"token file {str(path)!r} is empty; delete it to get a new token")
    return token, str(path)


# ------------------------------------------------------------------ spec admission
class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _check_factories(data: dict, cfg: ServiceConfig) -> None:
    try:
        check_spec_factories(data, cfg.allowed_factories)
    except FactoryRefused as e:
        raise Refused(e.status, str(e)) from None


def admit_spec(body: bytes, content_type: str, cfg: ServiceConfig):
    """Parse and validate a submitted spec and pin it inside the service's runs directory.

    Returns the validated `Spec`; raises `Refused` (422 invalid, 403 not allowed)."""
    from autoprune.spec import load_spec

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(422, "the spec must be UTF-8 text (YAML or JSON)") from None
    try:
        data = json.loads(text) if "json" in content_type else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise Refused(422, f"the spec is not valid {'JSON' if 'json' in content_type else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise Refused(422, f"the spec must be a mapping of keys (name, model, budget, ...), got {type(data).__name__}")
    # the factories first, on the raw text's values: nothing is imported or validated before this
    _check_factories(data, cfg)

    root = cfg.runs_dir
    out = data.get("output")
    if out in (None, "", "runs"):
        data["output"] = str(root)
    else:
        p = Path(str(out))
        p = p if p.is_absolute() else root / p
        if not _inside(p, root):
            raise Refused(422, f"output {out!r} is outside the service's runs directory; leave output unset "
                               "or give a path inside it")
        data["output"] = str(p.resolve())
    model = data.get("model")
    if isinstance(model, dict) and model.get("checkpoint"):
        ck = Path(str(model["checkpoint"]))
        ck = ck if ck.is_absolute() else root / ck
        if not _inside(ck, root):
            raise Refused(422, f"model.checkpoint {model['checkpoint']!r} is outside the service's runs directory; "
                               "copy the checkpoint into it")
        model["checkpoint"] = str(ck.resolve())
    search = data.get("search")
    if isinstance(search, dict) and search.get("storage"):
        st = str(search["storage"])
        if "://" in st:
            if st != cfg.storage:
                raise Refused(422, "search.storage: the service writes to its own storage; leave storage unset")
        else:
            jp = Path(st.removeprefix("journal:"))
            jp = jp if jp.is_absolute() else root / jp
            if not _inside(jp, root):
                raise Refused(422, f"search.storage {st!r} is outside the service's runs directory")
            search["storage"] = str(jp.resolve())
    elif cfg.storage:
        data.setdefault("search", {})
        if isinstance(data["search"], dict):
            data["search"]["storage"] = cfg.storage
    if isinstance(search, dict) and search.get("ray_address") not in (None, "", "auto", "local"):
        # a remote cluster would send results back to be unpickled here: only the operator's own
        raise Refused(403, "search.ray_address: this service runs Ray on this host only; leave it unset or 'auto'")
    if isinstance(search, dict) and search.get("ray_runtime_env"):
        # pip installs, py_modules, env_vars, working_dir: code and settings of the submitter's choosing
        raise Refused(403, "search.ray_runtime_env is not accepted by the service (it could install and run any "
                           "code); leave it unset")
    try:
        spec = load_spec(data)
    except AutopruneError as e:
        raise Refused(422, str(e)) from None
    if not _inside(spec.run_dir, root):  # belt and braces: the name pattern already forbids '/' and '..'
        raise Refused(422, f"name {spec.name!r} escapes the runs directory")
    _check_factories(spec.model_dump(mode="json"), cfg)  # again on what the worker will run (defaults included)
    return spec


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
                [self.cfg.python, "-m", "autoprune.service", "_worker", str(d)],
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
        if self._alive(sid, state):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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

        from autoprune.search.study import open_storage

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
        feasible = [t for t in done if trial_attrs(t).get("feasible", True)]
        best = max(feasible, key=lambda t: t.values[0], default=None)
        return {
            "progress": {"complete": len(done), "failed": sum(t.state == TrialState.FAIL for t in trials),
                         "total": total},
            "best_so_far": None if best is None else {
                "trial": best.number, "metric_val": best.values[0],
                "macs_ratio": trial_attrs(best).get("macs_ratio"), "params_ratio": trial_attrs(best).get("params_ratio"),
            },
        }

    def _result(self, state: dict) -> dict | None:
        from autoprune.results import result_path

        return _read_json(result_path(state["run_dir"], state["strategy"]))

    def trials(self, sid: str):
        """The search's trials (pandas) with Pareto flags, read from its storage."""
        from autoprune.results import pareto_flags, trials_frame

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
            from autoprune.plots import pareto_figure  # type: ignore[attr-defined]

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


# ------------------------------------------------------------------ the app
def create_app(cfg: ServiceConfig):
    """The FastAPI app over `cfg.runs_dir` (used by `serve`; handy in-process with a test client)."""
    searches = Searches(cfg)
    bearer = HTTPBearer(auto_error=False, description="the service's token (AUTOPRUNE_TOKEN or the token file)")
    expected = cfg.token.encode()

    def authorized(header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), expected)

    async def check_token(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not authorized(request.headers.get("authorization")):  # documents the scheme in the OpenAPI schema
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="autoprune service", version="1", dependencies=[Depends(check_token)],
                  description="Launch and watch autoprune searches. Every endpoint needs `Authorization: Bearer <token>`.")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # every path, the OpenAPI schema and docs included: no token, no answer
        if not authorized(request.headers.get("authorization")):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            return JSONResponse({"detail": f"request body over {cfg.max_body_bytes} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(Refused)
    async def refused(_request: Request, e: Refused) -> JSONResponse:
        return JSONResponse({"detail": e.message}, status_code=e.status)

    @app.post("/searches", status_code=201, summary="Submit a spec (YAML or JSON body); returns its id")
    async def submit(request: Request):
        body = bytearray()
        async for chunk in request.stream():  # also bounds chunked bodies without a Content-Length
            body += chunk
            if len(body) > cfg.max_body_bytes:
                return JSONResponse({"detail": f"request body over {cfg.max_body_bytes} bytes"}, status_code=413)
        spec = admit_spec(bytes(body), request.headers.get("content-type", ""), cfg)
        st = searches.submit(spec)
        log.info("search %s submitted", st["id"])
        return JSONResponse({"id": st["id"], "status": st["status"], "url": f"/searches/{st['id']}"}, status_code=201)

    @app.get("/searches", summary="Every search: status, progress, best so far")
    def list_searches():
        out = []
        for sid in searches.ids():
            try:
                out.append(searches.status(sid))
            except Refused:
                continue
        return out

    @app.get("/searches/{sid}", summary="One search; `result` holds result.json when done")
    def get_search(sid: str):
        return searches.status(sid, with_result=True)

    @app.get("/searches/{sid}/pareto", summary="The Pareto front (val metric vs MACs) and every completed trial")
    def pareto(sid: str):
        return searches.pareto(sid)

    @app.get("/searches/{sid}/pareto.html", response_class=HTMLResponse, summary="The Pareto front as a plotly page")
    def pareto_html(sid: str):
        return HTMLResponse(searches.pareto_html(sid))

    @app.delete("/searches/{sid}", summary="Cancel a running search")
    def cancel(sid: str):
        return searches.cancel(sid)

    app.state.searches = searches
    return app


def serve(*, host: str = "127.0.0.1", port: int = 8765, runs_dir: Path | str = "runs",
          token_file: Path | str | None = None, storage: str | None = None,
          allowed_factories: tuple[str, ...] | None = None, max_body_bytes: int | None = None) -> None:
    """Run the service with uvicorn until interrupted (`autoprune serve`)."""
    import uvicorn

    # the operator's packages: --allow plus AUTOPRUNE_ALLOWED_FACTORIES (read once, here); a standard-library
    # module or a non-factory part of autoprune among them stops the start (AutopruneError: exit 2)
    allowed = normalize_allowed(tuple(allowed_factories or ()) + allowed_from_env())
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    token, source = load_token(Path(token_file) if token_file else None, runs_dir)
    try:
        max_body = max_body_bytes or int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY))
    except ValueError:
        raise AutopruneError(f"{MAX_BODY_ENV} must be a number of bytes") from None
    storage = storage or os.environ.get(STORAGE_ENV) or None
    if storage:
        from autoprune.search.study import open_storage

        open_storage(storage)  # fail now, with a clear message, not in every worker
    cfg = ServiceConfig(runs_dir, token, storage=storage, allowed_factories=allowed, max_body_bytes=max_body)
    lock = _lock_runs_dir(cfg.runs_dir)  # held until this process ends (a killed one releases it too)
    app = create_app(cfg)
    resumed = app.state.searches.resume_interrupted()
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach it and holds the token can run searches "
              "(with the allowed factories)", file=sys.stderr)
    print(f"autoprune service on http://{host}:{port} (runs: {cfg.runs_dir}; bearer token from {source}; "
          f"OpenAPI: /docs; factories from {', '.join(allowed_modules(cfg.allowed_factories))}"
          + (f"; resumed {', '.join(resumed)}" if resumed else "") + ")", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
    finally:
        lock.close()


def _lock_runs_dir(runs_dir: Path):
    """One service per runs directory: two would both restart the same interrupted searches."""
    import fcntl

    path = runs_dir / STATE_DIR / "service.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise AutopruneError(f"another autoprune service already serves {str(runs_dir)!r}; stop it first "
                             "or give another --runs") from None
    return f


# ------------------------------------------------------------------ the worker process
def _worker(state_dir: str) -> int:
    """Run one submitted search (`autoprune search`), then record its exit status for the service.

    Every factory the search imports goes through the service's allow-list (AUTOPRUNE_ALLOWED_FACTORIES, as
    the service resolved it) once more, here where the import happens."""
    import autoprune.target
    from autoprune.cli import main as cli_main
    from autoprune.factories import checked_import_object

    autoprune.target.import_object = checked_import_object(allowed_from_env())
    d = Path(state_dir)
    rc, error = 0, None
    cancelled = []

    def on_term(signum, frame):  # cancellation: unwind so the exit status is written
        cancelled.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        cli_main(["search", str(d / "spec.yaml")])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_worker":
        raise SystemExit(_worker(sys.argv[2]))
    print("usage: autoprune serve --help (this module's entry point is for the service's workers)", file=sys.stderr)
    raise SystemExit(2)
