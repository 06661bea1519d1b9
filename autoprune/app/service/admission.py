"""The service's configuration and spec admission: the token, the factory allow-list, what a submitted spec may do."""


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
    env = (settings.get().token or "").strip()
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


