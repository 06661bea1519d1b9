"""Device agent: times models on the target device for a search running elsewhere.

``autoprune agent --port P`` runs on the device. The search host (``budget.device: agent://HOST:PORT``) sends
JSON only: the model factory, kwargs and input shape, the pruning settings and a plan; the agent rebuilds
the pruned model itself with the same installed factory (as `autoprune.exporting.files.load_pruned` does: factory +
`PrunableModel(..., check_groups=False).apply`) and times it. An ONNX file can be sent instead and is timed
with onnxruntime (optional dependency). Nothing received is ever unpickled: JSON bodies are parsed with
`json`, ONNX bytes go to onnxruntime's parser, anything else is refused.

Security: binds 127.0.0.1 unless told otherwise; every request needs ``Authorization: Bearer TOKEN``
(token from ``AUTOPRUNE_AGENT_TOKEN`` or a token file created with mode 0600); bodies are limited in size
(413 before anything is read); factories must live in an allowed module (``autoprune.model.zoo`` and the module
prefixes in ``AUTOPRUNE_AGENT_ALLOW``), since calling a factory runs its code.

Endpoints: ``GET /fingerprint``, ``POST /measure`` (JSON), ``POST /table`` (JSON: build a latency lookup
table), ``POST /onnx?input_shape=1,40&batch_size=1&threads=1`` (ONNX bytes). Every answer carries the
device fingerprint.

The server is the standard library's `http.server` so that the device needs nothing but torch (and this
package); the client is `urllib` with timeouts and retries for the same reason.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autoprune.costs.counting import LatencyStats, count_params, measure_latency
from autoprune import settings
from autoprune.errors import AutopruneError
from autoprune.pruning.plan import PruningPlan

log = logging.getLogger(__name__)

TOKEN_ENV = "AUTOPRUNE_AGENT_TOKEN"
TOKEN_FILE_ENV = "AUTOPRUNE_AGENT_TOKEN_FILE"
ALLOW_ENV = "AUTOPRUNE_AGENT_ALLOW"
DEFAULT_TOKEN_FILE = Path.home() / ".config" / "autoprune" / "agent-token"
DEFAULT_MAX_BODY = 64 * 1024 * 1024  # ONNX files of small/medium models
JSON_MAX_BODY = 1024 * 1024


class AgentUnavailable(RuntimeError):
    """The agent could not be reached (after retries) or failed on its side (5xx)."""


# ------------------------------------------------------------------ token
def _token_file_path(token_file: str | Path | None) -> Path:
    return Path(token_file or settings.get().agent_token_file or DEFAULT_TOKEN_FILE).expanduser()


def server_token(token_file: str | Path | None = None) -> tuple[str, str]:
    """(token, where it came from): the environment variable, else the token file (created 0600 if missing)."""
    if settings.get().agent_token:
        return settings.get().agent_token, f"${TOKEN_ENV}"
    path = _token_file_path(token_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return _read_token(path), str(path)


def _read_token(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise AutopruneError(f"agent token file {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")
    token = path.read_text().strip()
    if len(token) < 16:
        raise AutopruneError(f"agent token in {path} is shorter than 16 characters; delete the file to get a new one")
    return token


def client_token() -> str:
    if settings.get().agent_token:
        return settings.get().agent_token
    path = _token_file_path(None)
    if path.exists():
        return _read_token(path)
    raise AutopruneError(f"no agent token: set {TOKEN_ENV} (or {TOKEN_FILE_ENV}) to the token the agent printed "
                         f"the path of (default {DEFAULT_TOKEN_FILE} on the device)")


# ------------------------------------------------------------------ rebuilding and timing on the device
def allowed_modules() -> list[str]:
    extra = [m.strip() for m in settings.get().agent_allow.split(",") if m.strip()]
    return ["autoprune.model.zoo", *extra]


def _check_factory(factory: str) -> None:
    from autoprune.model.factories import moved

    mod = str(moved(factory)).split(":", 1)[0]
    if not any(mod == a or mod.startswith(a + ".") for a in allowed_modules()):
        raise PermissionError(f"factory {factory!r} is not in an allowed module {allowed_modules()}; "
                              f"start the agent with {ALLOW_ENV}={mod} to allow it")


class Agent:
    """The device side: rebuilds models from JSON (cached per model), times them, builds tables."""

    def __init__(self, device: str | None = None) -> None:
        self.device = device or settings.get().agent_device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._pms: dict[str, Any] = {}
        self.lock = threading.Lock()  # one timing at a time: concurrent runs would disturb each other

    def fingerprint(self, threads: int | None = 1, batch_size: int = 1) -> dict[str, Any]:
        from autoprune.costs.latency import device_fingerprint

        return device_fingerprint(self.device, threads, batch_size)

    def _pm(self, model: dict, pruning: dict):
        from autoprune.pruning.groups import PrunableModel
        from autoprune.model.loading import build_model

        _check_factory(model["factory"])
        key = json.dumps([model, pruning], sort_keys=True)
        if key not in self._pms:
            shape = [int(d) for d in model["input_shape"]]
            base = build_model(str(model["factory"]), dict(model.get("kwargs") or {}))
            # weights do not matter for timing, only widths: random init, l1 order, no group check
            self._pms[key] = PrunableModel(base, torch.zeros(1, *shape), ignore=list(pruning.get("ignore", [])),
                                           criterion="l1", round_to=int(pruning.get("round_to", 1)),
                                           max_ratio=float(pruning.get("max_ratio", 0.9)), mode="structured",
                                           check_groups=False,
                                           attention_heads=str(pruning.get("attention_heads", "auto")))
            if len(self._pms) > 8:
                self._pms.pop(next(iter(self._pms)))
        return self._pms[key]

    def measure(self, req: dict) -> dict:
        from autoprune.costs.latency import measure_model

        pm = self._pm(req["model"], req.get("pruning", {}))
        plan = PruningPlan.from_dict(req.get("plan") or {"ratios": {}})
        plan = PruningPlan(plan.ratios, "structured", "l1", int(req.get("pruning", {}).get("round_to", plan.round_to)))
        threads, bs = _threads(req), int(req.get("batch_size", 1))
        with self.lock:
            model = pm.apply(plan, check=False)
            st = measure_model(model, pm.example, self.device, threads, bs)
        return {**_stats(st), "fingerprint": self.fingerprint(threads, bs)}

    def table(self, req: dict) -> dict:
        from autoprune.costs.latency import build_table

        pm = self._pm(req["model"], req.get("pruning", {}))
        threads, bs = _threads(req), int(req.get("batch_size", 1))
        groups = [str(g) for g in req.get("groups") or pm.names]
        with self.lock:
            table = build_table(pm, groups, device=self.device, threads=threads, batch_size=bs,
                                model_key=req.get("model_key") or {})
        return {"table": table.to_dict(), "fingerprint": table.fingerprint}

    def onnx(self, data: bytes, query: dict) -> dict:
        try:
            import numpy as np
            import onnxruntime as ort
        except ImportError:
            raise LookupError("this agent has no onnxruntime: `pip install onnxruntime` on the device, or send a plan") from None
        threads = int(query.get("threads", ["1"])[0])
        bs = int(query.get("batch_size", ["1"])[0])
        shape = [int(d) for d in query.get("input_shape", [""])[0].split(",") if d]
        if not shape:
            raise ValueError("query parameter input_shape (e.g. 1,40) is required")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider"] if self.device.startswith("cuda") else []
        providers = [p for p in providers if p in ort.get_available_providers()] + ["CPUExecutionProvider"]
        try:
            sess = ort.InferenceSession(data, opts, providers=providers)
        except Exception as e:  # onnxruntime's parser refuses anything that is not an ONNX model
            raise ValueError(f"body is not a loadable ONNX model: {str(e).splitlines()[0][:200]}") from None
        name = sess.get_inputs()[0].name

        class _Ort(nn.Module):  # lets costs.measure_latency drive the session (same stopping rule)
            def forward(self, x):
                return torch.from_numpy(sess.run(None, {name: x.numpy()})[0])

        x = torch.from_numpy(np.random.randn(bs, *shape).astype("float32"))
        with self.lock:
            st = measure_latency(_Ort(), x, device="cpu", threads=threads, warmup=10, runs=50, max_runs=1000,
                                 rel_ci=0.015, time_budget_s=1.5)
        return {**_stats(st), "runtime": "onnxruntime", "providers": sess.get_providers(),
                "fingerprint": {**self.fingerprint(threads, bs), "onnxruntime": ort.__version__}}


def _threads(req: dict) -> int | None:
    t = req.get("threads", 1)
    return None if t is None else int(t)


def _stats(st: LatencyStats) -> dict:
    return {"median_ms": st.median_ms, "p10_ms": st.p10_ms, "p90_ms": st.p90_ms, "runs": st.runs,
            "device": st.device, "threads": st.threads, "batch_size": st.batch_size}


# ------------------------------------------------------------------ HTTP server
def _handler(agent: Agent, token: str, max_body: int):
    class Handler(BaseHTTPRequestHandler):
        server_version = "autoprune-agent/1"

        def log_message(self, fmt, *args):  # through logging, not stderr
            log.info("%s %s", self.address_string(), fmt % args)

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="autoprune-agent"')
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            got = self.headers.get("Authorization", "")
            ok = got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), token.encode())
            if not ok:
                self._send(401, {"error": "missing or wrong bearer token"})
                self.close_connection = True
            return ok

        def do_GET(self) -> None:
            if not self._authorised():
                return
            url = urllib.parse.urlparse(self.path)
            q = urllib.parse.parse_qs(url.query)
            if url.path == "/fingerprint":
                t = q.get("threads", ["1"])[0]
                self._send(200, agent.fingerprint(None if t == "none" else int(t), int(q.get("batch_size", ["1"])[0])))
            else:
                self._send(404, {"error": f"no endpoint GET {url.path}"})

        def do_POST(self) -> None:
            if not self._authorised():
                return
            url = urllib.parse.urlparse(self.path)
            if url.path not in ("/measure", "/table", "/onnx"):
                self.close_connection = True
                return self._send(404, {"error": f"no endpoint POST {url.path}"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                return self._send(411, {"error": "Content-Length required"})
            limit = max_body if url.path == "/onnx" else min(max_body, JSON_MAX_BODY)
            if length < 0 or length > limit:
                self.close_connection = True  # the body is never read
                return self._send(413, {"error": f"body of {length} bytes exceeds the limit of {limit}"})
            ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            want = "application/octet-stream" if url.path == "/onnx" else "application/json"
            body = self.rfile.read(length)
            if ctype != want:
                return self._send(415, {"error": f"{url.path} takes {want}, got {ctype or 'no content type'}"})
            try:
                if url.path == "/onnx":
                    out = agent.onnx(body, urllib.parse.parse_qs(url.query))
                else:
                    try:
                        req = json.loads(body.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        return self._send(400, {"error": "body is not JSON (nothing else is accepted)"})
                    if not isinstance(req, dict) or not isinstance(req.get("model"), dict):
                        return self._send(400, {"error": "body must be a JSON object with a 'model' object"})
                    out = agent.measure(req) if url.path == "/measure" else agent.table(req)
            except PermissionError as e:
                return self._send(403, {"error": str(e)})
            except LookupError as e:
                return self._send(501, {"error": str(e)})
            except (AutopruneError, ValueError, KeyError, TypeError) as e:
                return self._send(400, {"error": f"{type(e).__name__}: {e}"})
            except Exception as e:  # the device failed: the host may retry
                log.exception("agent request failed")
                return self._send(500, {"error": f"{type(e).__name__}: {e}"})
            self._send(200, out)

    return Handler


def make_server(host: str = "127.0.0.1", port: int = 8766, *, token: str, device: str | None = None,
                max_body: int = DEFAULT_MAX_BODY) -> HTTPServer:
    """The agent's HTTP server (not started); port 0 picks a free port (``server.server_address``)."""
    return HTTPServer((host, port), _handler(Agent(device), token, max_body))


def serve_agent(host: str = "127.0.0.1", port: int = 8766, token_file: str | Path | None = None, *,
                device: str | None = None, max_body: int | None = None) -> None:
    """Run the agent until interrupted (``autoprune agent``)."""
    token, where = server_token(token_file)
    max_body = max_body or settings.get().agent_max_bytes or DEFAULT_MAX_BODY
    try:
        server = make_server(host, port, token=token, device=device, max_body=max_body)
    except OSError as e:
        raise AutopruneError(f"agent cannot listen on {host}:{port}: {e}; pick another --port") from None
    print(f"autoprune agent on http://{host}:{server.server_address[1]} (device: "
          f"{Agent(device).device}); token from {where}; factories allowed from {allowed_modules()}", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: listening beyond loopback; the bearer token is sent in clear over HTTP - use a trusted "
              "network or an SSH tunnel", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ------------------------------------------------------------------ client
class AgentClient:
    """The host side: what `latency_budget` uses for ``budget.device: agent://HOST:PORT``."""

    def __init__(self, url: str, *, model: dict, pruning: dict, threads: int | None = 1, batch_size: int = 1,
                 token: str | None = None, timeout_s: float = 60.0, table_timeout_s: float = 1800.0,
                 retries: int = 3, backoff_s: float = 0.5) -> None:
        if not url.startswith("agent://"):
            raise AutopruneError(f"agent address {url!r} must look like agent://HOST:PORT")
        hostport = url[len("agent://"):].rstrip("/")
        if ":" not in hostport or not hostport.rsplit(":", 1)[1].isdigit():
            raise AutopruneError(f"agent address {url!r} needs a port: agent://HOST:PORT")
        self.url, self.base = url, f"http://{hostport}"
        self.model = {k: model[k] for k in ("factory", "kwargs", "input_shape")}
        self.pruning = {k: pruning[k] for k in ("ignore", "round_to", "max_ratio") if k in pruning}
        self.threads, self.batch_size = threads, batch_size
        self.token = token or client_token()
        self.timeout_s, self.table_timeout_s = timeout_s, table_timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.base_params: int | None = None  # set by the budget: a model without a plan of this size is unpruned

    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json",
                 timeout: float | None = None) -> dict:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.base + path, data=body, method=method)
            req.add_header("Authorization", f"Bearer {self.token}")
            if body is not None:
                req.add_header("Content-Type", ctype)
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.timeout_s) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                try:
                    msg = json.loads(e.read().decode()).get("error", "")
                except Exception:
                    msg = e.reason
                if e.code < 500:
                    hint = {401: f"; set {TOKEN_ENV} to the agent's token"}.get(e.code, "")
                    raise AutopruneError(f"agent {self.url} refused {path} ({e.code}): {msg}{hint}") from None
                last = AgentUnavailable(f"agent {self.url} failed on {path} ({e.code}): {msg}")
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                last = e
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        if isinstance(last, AgentUnavailable):
            raise last
        raise AgentUnavailable(f"agent {self.url} unreachable after {self.retries + 1} attempts: {last}; "
                               "is `autoprune agent` running there?")

    def _json(self, path: str, payload: dict, timeout: float | None = None) -> dict:
        return self._request("POST", path, json.dumps(payload).encode(), timeout=timeout)

    def fingerprint(self) -> dict[str, Any]:
        t = "none" if self.threads is None else self.threads
        fp = self._request("GET", f"/fingerprint?threads={t}&batch_size={self.batch_size}")
        return {**fp, "agent": self.url}

    def _payload(self, **extra) -> dict:
        return {"model": self.model, "pruning": self.pruning, "threads": self.threads,
                "batch_size": self.batch_size, **extra}

    def measure_plan(self, pm, plan: PruningPlan) -> LatencyStats:
        return _from_answer(self._json("/measure", self._payload(plan=plan.to_dict())))

    def measure_model(self, model: nn.Module, example: torch.Tensor) -> LatencyStats:
        """A pruned model by its plan (set by `PrunableModel.apply`); the unpruned one by an empty plan;
        anything else as ONNX."""
        plan = getattr(model, "_autoprune_plan", None)
        if plan is None and self.base_params is not None and count_params(model) == self.base_params:
            plan = {"ratios": {}}
        if plan is not None:
            return _from_answer(self._json("/measure", self._payload(plan=plan)))
        return self.measure_onnx(model, example)

    def measure_onnx(self, model: nn.Module, example: torch.Tensor) -> LatencyStats:
        import tempfile

        from autoprune.model.onnx import export_onnx

        with tempfile.TemporaryDirectory() as d:
            data = export_onnx(model.eval().cpu(), example[:1], Path(d) / "m.onnx").read_bytes()
        shape = ",".join(str(s) for s in example.shape[1:])
        t = 1 if self.threads is None else self.threads
        return _from_answer(self._request("POST", f"/onnx?input_shape={shape}&batch_size={self.batch_size}&threads={t}",
                                          data, "application/octet-stream"))

    def build_table(self, pm, groups: list[str], model_key: dict, **_):
        from autoprune.costs.latency import LatencyTable

        ans = self._json("/table", self._payload(groups=groups, model_key=model_key), timeout=self.table_timeout_s)
        return LatencyTable.from_dict(ans["table"])


def _from_answer(a: dict) -> LatencyStats:
    return LatencyStats(float(a["median_ms"]), float(a["p10_ms"]), float(a["p90_ms"]), int(a["runs"]),
                        str(a.get("device", "agent")), a.get("threads"), int(a.get("batch_size", 1)))
