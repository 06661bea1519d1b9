"""The FastAPI app over a runs directory, and `serve` (uvicorn)."""


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
from autoprune.searching.studies import pid_alive

log = logging.getLogger("autoprune.app.service")

from autoprune.app.service.admission import DEFAULT_MAX_BODY, Refused, STATE_DIR, ServiceConfig, admit_spec, load_token
from autoprune.app.service.searches import Searches

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
    max_body = max_body_bytes or settings.get().max_body or DEFAULT_MAX_BODY
    storage = storage or settings.get().service_storage or None
    if storage:
        from autoprune.searching.studies import open_storage

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


