"""The search service end to end: a real uvicorn on 127.0.0.1 in a subprocess, real worker processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

SMALL = {  # a fast search: cnn1d on 3000 MNIST-1D samples, 4 trials, no sensitivity
    "model": {"factory": "autoprune.model.zoo:cnn1d", "input_shape": [1, 40]},
    "data": {"factory": "autoprune.model.data:mnist1d", "kwargs": {"num_samples": 3000}, "batch_size": 128},
    "train": {"epochs": 3, "lr": 0.01},
    "budget": {"macs": 0.5},
    "search": {"n_trials": 4, "priors": "none"},
    "evaluation": {"calibration_batches": 4},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, runs: Path, port: int, env: dict | None = None, args: tuple[str, ...] = ()) -> None:
        self.runs, self.port = runs, port
        e = {k: v for k, v in os.environ.items() if k not in ("AUTOPRUNE_TOKEN", "AUTOPRUNE_ALLOWED_FACTORIES")}
        e.update(env or {})
        self.log = open(runs.parent / f"service-{port}-{time.time_ns()}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "autoprune.app.cli", "serve", "--port", str(port),
                                      "--runs", str(runs), *args], stdout=self.log, stderr=subprocess.STDOUT, env=e)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, Path(self.log.name).read_text()
            try:
                httpx.get(self.url + "/searches", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the service did not start"
                time.sleep(0.3)
        self.token = (runs / ".service" / "token").read_text().strip()
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return Path(self.log.name).read_text()


def _wait(client: httpx.Client, sid: str, until, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = client.get(f"/searches/{sid}").json()
        if until(st):
            return st
        assert time.monotonic() < deadline, f"timed out waiting on {sid}: {st}"
        time.sleep(0.5)


@pytest.fixture
def runs(tmp_path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


@pytest.mark.slow
def test_service_end_to_end(runs):
    svc = Service(runs, _free_port())
    try:
        token_file = runs / ".service" / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        c = svc.client
        # a search that finishes, and a long one to cancel (JSON and YAML bodies)
        r = c.post("/searches", content=json.dumps({**SMALL, "name": "quick"}),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "quick"
        long_spec = {**SMALL, "name": "long", "search": {"n_trials": 500, "priors": "none"}}
        r = c.post("/searches", content=yaml.safe_dump(long_spec), headers={"Content-Type": "application/yaml"})
        assert r.status_code == 201, r.text
        assert c.post("/searches", content=yaml.safe_dump(long_spec)).status_code == 409  # already running

        listed = {s["id"]: s for s in c.get("/searches").json()}
        assert set(listed) == {"quick", "long"}
        assert listed["long"]["status"] == "running" and listed["long"]["progress"]["total"] == 500

        # poll until done: progress n/total, best so far, then result.json
        seen_progress = set()

        def done(st):
            seen_progress.add(st["progress"]["complete"])
            assert st["status"] in ("running", "done"), st
            return st["status"] == "done"

        st = _wait(c, "quick", done)
        assert st["progress"] == {"complete": 4, "failed": 0, "total": 4}
        assert st["result"]["best"]["macs_ratio"] <= 0.5
        assert st["result"]["n_trials_complete"] == 4
        assert st["best_so_far"]["metric_val"] == pytest.approx(st["result"]["best"]["metric_val"])
        assert (runs / "quick" / "result.json").exists()  # the run landed inside the service's runs dir

        p = c.get("/searches/quick/pareto")
        assert p.status_code == 200
        front = p.json()["front"]
        assert front and all(f["feasible"] and f["macs_ratio"] <= 0.5 + 1e-9 for f in front)
        assert len(p.json()["trials"]) == 4
        h = c.get("/searches/quick/pareto.html")
        assert h.status_code == 200 and "text/html" in h.headers["content-type"]
        assert "plotly" in h.text.lower() and "<html" in h.text.lower()

        # cancel the long one: its worker process group is gone and it stays cancelled
        pid = json.loads((runs / ".service" / "long" / "state.json").read_text())["pid"]
        r = c.delete("/searches/long")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert json.loads((runs / ".service" / "long" / "exit.json").read_text())["error"] == "cancelled"
        assert c.delete("/searches/long").status_code == 409
        assert c.get("/searches/nope").status_code == 404
    finally:
        log = svc.stop()
    assert svc.token not in log  # never logged

    # restart: both searches are listed again, from disk and storage alone
    svc = Service(runs, _free_port(), env={"AUTOPRUNE_ALLOWED_FACTORIES": "autoprune"})
    try:
        listed = {s["id"]: s for s in svc.client.get("/searches").json()}
        assert listed["quick"]["status"] == "done" and listed["quick"]["progress"]["complete"] == 4
        assert listed["long"]["status"] == "cancelled"
        assert svc.client.get("/searches/quick").json()["result"]["best"]["macs_ratio"] <= 0.5
        # the allow-list, active for this instance: a factory outside it is refused before any work
        bad = {**SMALL, "name": "evil", "model": {"factory": "os:system", "input_shape": [1, 40]}}
        r = svc.client.post("/searches", content=json.dumps(bad), headers={"Content-Type": "application/json"})
        assert r.status_code == 403 and "not allowed" in r.json()["detail"]
        assert not (runs / ".service" / "evil").exists()
    finally:
        svc.stop()


def test_service_security(runs):
    svc = Service(runs, _free_port())
    try:
        c, url = svc.client, svc.url
        # 401 without a token, with a wrong one, on every endpoint including the OpenAPI schema
        for method, path in [("GET", "/searches"), ("POST", "/searches"), ("GET", "/searches/x"),
                             ("DELETE", "/searches/x"), ("GET", "/openapi.json"), ("GET", "/docs")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": svc.token}):
                r = httpx.request(method, url + path, headers=headers, timeout=10)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
        schema = c.get("/openapi.json").json()
        assert {"/searches", "/searches/{sid}", "/searches/{sid}/pareto", "/searches/{sid}/pareto.html"} <= set(schema["paths"])
        assert "HTTPBearer" in schema["components"]["securitySchemes"]

        def post(spec: dict) -> httpx.Response:
            return c.post("/searches", content=json.dumps(spec), headers={"Content-Type": "application/json"})

        # a bad spec: 422 with the validation message, nothing launched
        r = post({**SMALL, "name": "bad", "budget": {"macs": 1.5}})
        assert r.status_code == 422 and "budget.macs" in r.json()["detail"] and "between 0 and 1" in r.json()["detail"]
        r = c.post("/searches", content="name: [unclosed", headers={"Content-Type": "application/yaml"})
        assert r.status_code == 422 and "YAML" in r.json()["detail"]
        # paths cannot escape the runs directory
        for spec in ({**SMALL, "name": "esc1", "output": "../outside"},
                     {**SMALL, "name": "esc2", "output": "/tmp"},
                     {**SMALL, "name": "esc3", "model": {**SMALL["model"], "checkpoint": "/etc/passwd"}},
                     {**SMALL, "name": "esc4", "search": {"storage": "../../x.journal"}},
                     {**SMALL, "name": "esc5", "search": {"storage": "sqlite:////tmp/x.db"}}):
            r = post(spec)
            assert r.status_code == 422, (spec, r.text)
        r = post({**SMALL, "name": "../escape"})
        assert r.status_code == 422 and "name" in r.json()["detail"]
        assert not (runs.parent / "outside").exists()
        assert sorted(p.name for p in (runs / ".service").iterdir()) == ["service.lock", "token"]  # nothing launched
        # oversized bodies are refused, with and without Content-Length
        big = json.dumps({**SMALL, "name": "big", "data": {**SMALL["data"], "kwargs": {"pad": "x" * (2 << 20)}}})
        assert post(json.loads(big)).status_code == 413

        def chunks():
            for _ in range(40):
                yield b"#" * 65536

        r = c.post("/searches", content=chunks(), headers={"Content-Type": "application/yaml"})
        assert r.status_code == 413
    finally:
        log = svc.stop()
    assert svc.token not in log


# ------------------------------------------------------------------ factories: an allow-list, checked before any import
def _post(c: httpx.Client, spec: dict) -> httpx.Response:
    return c.post("/searches", content=json.dumps(spec), headers={"Content-Type": "application/json"})


def _evil(target: Path, name: str = "evil") -> dict:
    """The issue's spec: a valid token and `subprocess:run` as the model factory."""
    return {**SMALL, "name": name, "model": {"factory": "subprocess:run", "kwargs": {"args": ["touch", str(target)]}}}


def _refused_everywhere(c: httpx.Client, runs: Path, target: Path) -> None:
    r = _post(c, _evil(target))
    assert r.status_code == 403, r.text
    assert "subprocess:run" in r.json()["detail"] and "not allowed" in r.json()["detail"]
    # every place a spec names code, and the ways around a module prefix
    for i, patch in enumerate((
        {"data": {"factory": "os:system", "kwargs": {"command": f"touch {target}"}}},
        {"task": {"factory": "builtins:exec", "kwargs": {"source": "open('x', 'w')"}}},
        {"evaluation": {"metric": "pickle:loads"}},
        {"evaluation": {"metric": "shutil:rmtree"}},
        {"model": {"factory": "importlib:import_module", "kwargs": {"name": "antigravity"}}},
        {"model": {"factory": "autoprune.app.cli:main", "kwargs": {"argv": ["--help"]}}},  # autoprune, but no factory
        {"model": {"factory": "autoprune.model.zoo:torch.load", "kwargs": {"f": str(target)}}},  # through an import
        {"model": {"factory": "autoprune.model.zoo:_Classifier"}},
        {"model": {"factory": "os.path:exists"}},
        {"search": {"n_trials": 4, "backend": "ray", "ray_address": "ray://203.0.113.1:10001"}},
        {"search": {"n_trials": 4, "backend": "ray", "ray_runtime_env": {"pip": ["evil-package"]}}},
    )):
        r = _post(c, {**SMALL, "name": f"evil{i}", **patch})
        assert r.status_code == 403, (patch, r.text)
    assert not target.exists()
    assert not [p for p in (runs / ".service").iterdir() if p.is_dir()]  # nothing was launched
    assert not list(runs.glob("evil*"))


def test_factories_refused_by_default(runs, tmp_path):
    target = tmp_path / "x"
    svc = Service(runs, _free_port())
    try:
        c = svc.client
        _refused_everywhere(c, runs, target)
        # kwargs must be plain JSON: a YAML date, set or binary value is refused (422), nothing launched
        for value in ("2024-01-01", "!!set {a, b}", "!!binary aGVsbG8=", "!!python/object/apply:os.system [id]"):
            body = yaml.safe_dump({**SMALL, "name": "kw", "data": {**SMALL["data"], "kwargs": {"num_samples": 3000}}})
            body = body.replace("num_samples: 3000", f"num_samples: {value}")
            r = c.post("/searches", content=body, headers={"Content-Type": "application/yaml"})
            assert r.status_code == 422, (value, r.text)
        r = _post(c, {**SMALL, "name": "kw", "model": {**SMALL["model"], "kwargs": [1, 2]}})
        assert r.status_code == 422, r.text
        assert not (runs / ".service" / "kw").exists()
        # autoprune's zoo is accepted, with JSON kwargs (cancelled at once: only admission is tested here)
        r = _post(c, {**SMALL, "name": "zoo", "model": {**SMALL["model"], "kwargs": {"width": 16, "num_classes": 10}}})
        assert r.status_code == 201, r.text
        assert c.delete("/searches/zoo").json()["status"] == "cancelled"
    finally:
        svc.stop()
    assert not target.exists()


def test_factories_refused_with_allow(runs, tmp_path):
    target = tmp_path / "x"
    svc = Service(runs, _free_port(), args=("--allow", "mypkg", "--allow", "other.pkg"),
                  env={"AUTOPRUNE_ALLOWED_FACTORIES": "third"})
    try:
        _refused_everywhere(svc.client, runs, target)
        r = _post(svc.client, {**SMALL, "name": "mine", "model": {"factory": "mypkg.models:build"}})
        assert r.status_code == 201, r.text  # admitted (the worker then fails: no such package here)
        r = _post(svc.client, {**SMALL, "name": "third", "model": {"factory": "third:build"}})
        assert r.status_code == 201, r.text  # the environment's packages are merged with --allow
        r = _post(svc.client, {**SMALL, "name": "near", "model": {"factory": "mypkgx:build"}})
        assert r.status_code == 403, r.text  # a prefix of a name is not the package
        for sid in ("mine", "third"):  # the worker got that far: its import fails, nothing else ran
            st = _wait(svc.client, sid, lambda s: s["status"] != "running", timeout=120)
            assert st["status"] == "failed" and "cannot import" in str(st["error"]), st
    finally:
        svc.stop()
    assert not target.exists()


@pytest.mark.parametrize("how", [("--allow", "subprocess"), ("--allow", "os"), ("--allow", "mypkg", "--allow", "os.path"),
                                 ("--allow", "builtins"), ("--allow", "autoprune.app.cli"), "env"])
def test_serve_refuses_stdlib_allow(runs, how):
    env = {k: v for k, v in os.environ.items() if k not in ("AUTOPRUNE_TOKEN", "AUTOPRUNE_ALLOWED_FACTORIES")}
    args = list(how) if how != "env" else []
    if how == "env":
        env["AUTOPRUNE_ALLOWED_FACTORIES"] = "mypkg,subprocess"
    r = subprocess.run([sys.executable, "-m", "autoprune.app.cli", "serve", "--port", str(_free_port()), "--runs", str(runs),
                        *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "error: --allow" in r.stderr and ("standard-library" in r.stderr or "factory modules" in r.stderr), r.stderr
    assert not (runs / ".service" / "token").exists()  # refused before anything was set up


def test_worker_import_is_checked_too():
    """Where the worker imports a factory it is checked again, and must be defined in an allowed package."""
    from autoprune.errors import AutopruneError
    from autoprune.model.factories import FactoryRefused, checked_import_object

    imp = checked_import_object(("mypkg",))
    assert imp("autoprune.model.zoo:cnn1d").__name__ == "cnn1d"
    for path in ("subprocess:run", "os:system", "autoprune.model.hfzoo:lru_cache", "autoprune.model.zoo:nn", "autoprune.model.loading:import_object"):
        with pytest.raises(FactoryRefused):
            imp(path)
    with pytest.raises(AutopruneError, match="cannot import"):
        imp("mypkg.models:build")
