"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`), with the user's model
module on the driver's sys.path only: the module is shipped to the nodes (runtime_env py_modules), trials run on
both nodes and say where; without shipping, the search stops at once naming the missing module.

The cluster is started with its own --temp-dir and torn down by killing exactly the processes whose command line
names that directory or the cluster's GCS port: `ray stop` would stop every Ray runtime on the machine, including
other processes' local ones.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from autoprune.app import api
from autoprune.errors import AutopruneError
from autoprune.searching.objective import trial_attrs
from conftest import stored_study

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

# Tune reuses a finished trial's actor for the next pending trial: with ~0.1 s trials the first actor runs them all
# before the second node's actor is up (~7 s to start a worker and import torch on 2 cores). The barrier holds each
# trial actor's first forward until two actors have reached it, so that both nodes run trials, by construction.
USER_MODULE = """
import os
import time

import torch.nn as nn

BARRIER = {barrier!r}
_passed = False


def _two_actors_up():
    global _passed
    if _passed:
        return
    import ray
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return  # the driver, or a sensitivity task: only the trial actors wait
    _passed = True
    open(os.path.join(BARRIER, str(os.getpid())), "w").close()
    deadline = time.time() + 90
    while len(os.listdir(BARRIER)) < 2 and time.time() < deadline:
        time.sleep(0.05)


HOLD = {hold!r}
_held = False


def _hold_first_trial():
    # node-loss test: each trial actor's first forward waits for release-<pid> (the test kills the worker node
    # while its actor waits here, and releases the head node's actor after that)
    global _held
    if _held or not HOLD:
        return
    import ray
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    _held = True
    pid = os.getpid()
    open(os.path.join(HOLD, "blocked-%d" % pid), "w").close()
    deadline = time.time() + 90
    while not os.path.exists(os.path.join(HOLD, "release-%d" % pid)) and time.time() < deadline:
        time.sleep(0.05)


class TinyNet(nn.Module):
    \"\"\"A user's model class: pickled by reference, so a worker must be able to import this module.\"\"\"

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        if HOLD:
            _hold_first_trial()
        else:
            _two_actors_up()
        return self.head(self.features(x))


def make():
    return TinyNet()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> list[str]:
    exe = Path(sys.executable).with_name("ray")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


def _cluster_pids(temp_dir: str, port: int) -> list[int]:
    """Processes of this cluster only: their command line names its temp dir or its GCS port."""
    marks = (temp_dir, f"gcs_server_port={port}", f":{port} ", f":{port}\0")
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace") + "\0"
        except OSError:
            continue
        if any(m in cmd for m in marks):
            pids.append(int(p.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            parent = _ppid(int(p.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(p.name))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _ancestors(pid: int) -> set[int]:
    out = set()
    while (pid := _ppid(pid)) not in (None, 0, 1) and pid not in out:
        out.add(pid)
    return out


def _kill(pids: list[int], grace: float = 3.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Cluster:
    def __init__(self) -> None:
        self.port = _free_port()
        # short: Ray's Unix socket paths live under it (108-byte limit)
        self.temp_dir = tempfile.mkdtemp(prefix="aprc", dir="/tmp")
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        self.env.pop("PYTHONPATH", None)  # the nodes must not see the driver's extra paths
        self.address = f"127.0.0.1:{self.port}"
        self.node_pids: dict[str, list[int]] = {}

    def _start(self, args: list[str]) -> None:
        out = subprocess.run(_ray_cli() + ["start", *args], env=self.env, cwd=self.temp_dir, capture_output=True,
                             text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")

    def start(self) -> None:
        self._start(["--head", f"--port={self.port}", "--num-cpus=1", "--include-dashboard=false",
                     f"--temp-dir={self.temp_dir}", "--disable-usage-stats"])
        before = set(_cluster_pids(self.temp_dir, self.port))
        self._start([f"--address={self.address}", "--num-cpus=1", "--disable-usage-stats"])
        self.worker_node_pids = sorted(set(_cluster_pids(self.temp_dir, self.port)) - before)
        self.worker_raylet = next(p for p in self.worker_node_pids if _cmdline(p).split("\0")[0].endswith("/raylet"))

    def kill_worker_node(self) -> None:
        """Lose the worker node: SIGKILL its raylet, its other daemons and every process the raylet started."""
        _kill(sorted(set(self.worker_node_pids) | _descendants(self.worker_raylet)), grace=0)

    def stop(self) -> None:
        _kill(_cluster_pids(self.temp_dir, self.port))
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # the session's logs and sockets


@pytest.fixture
def cluster():
    if ray.is_initialized():  # another test module's local runtime: this driver must join the cluster instead
        ray.shutdown()
    c = Cluster()
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    ray.shutdown()
    c.stop()


@pytest.fixture
def user_module(request, tmp_path, monkeypatch):
    """A model module on the driver's sys.path only (unique name: no other process can import it)."""
    name = f"apr_user_model_{os.getpid()}_{time.time_ns() % 10**9}"
    d = tmp_path / "usercode"
    d.mkdir()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    hold = tmp_path / "hold"
    hold.mkdir()
    held = getattr(request, "param", False)
    (d / f"{name}.py").write_text(USER_MODULE.format(barrier=str(barrier), hold=str(hold) if held else ""))
    monkeypatch.syspath_prepend(str(d))
    yield (name, hold) if held else name
    sys.modules.pop(name, None)


def _spec(make_spec, cluster, module: str, **search) -> dict:
    spec = make_spec("digits_cnn", budget={"macs": 0.5}, train={"epochs": 2}, sensitivity={"ratios": [0.3, 0.6]},
                     search={"backend": "ray", "ray_address": cluster.address, "n_trials": 6,
                             "max_concurrent_trials": 2, "cpus_per_trial": 1, **search})
    spec["model"] = {"factory": f"{module}:make", "input_shape": [1, 8, 8]}
    return spec


def test_trials_run_on_both_nodes_with_the_user_module_shipped(make_spec, cluster, user_module):
    from autoprune.searching.ray_backend import WHERE_ATTR

    spec = _spec(make_spec, cluster, user_module)
    t0 = time.perf_counter()
    result = api.search(spec, show_progress=False)
    elapsed = time.perf_counter() - t0
    assert result["n_trials_complete"] == 6, result
    assert result["best"]["macs_ratio"] <= 0.5 + 1e-9
    study = stored_study(spec)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 6
    where = [trial_attrs(t)[WHERE_ATTR] for t in done]
    nodes = {w["node_id"] for w in where}
    assert len(nodes) == 2, f"trials ran on {nodes}"  # one CPU per node, one CPU per trial, two at a time
    assert all(w["pid"] != os.getpid() for w in where)
    assert all(trial_attrs(t)["worker"].endswith(f":{os.getpid()}") for t in done)  # the driver owns the trial
    print(f"two-node search: 6 trials in {elapsed:.1f} s on nodes {sorted(n[:8] for n in nodes)}")


def test_an_unshipped_module_fails_fast_naming_it(make_spec, cluster, user_module):
    # py_modules: [] turns shipping off: the nodes cannot import the user's module
    spec = _spec(make_spec, cluster, user_module, priors="none", ray_runtime_env={"py_modules": []})
    t0 = time.perf_counter()
    with pytest.raises(AutopruneError) as info:
        api.search(spec, show_progress=False)
    elapsed = time.perf_counter() - t0
    msg = str(info.value)
    assert f"ModuleNotFoundError: No module named '{user_module}'" in msg
    assert "first 3 trials all failed" in msg and "on node" in msg and "ray_runtime_env" in msg
    assert elapsed < 60, elapsed
    study = stored_study(spec)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) >= 3 and not study.get_trials(states=(TrialState.COMPLETE,))
    assert all(f"No module named '{user_module}'" in t.user_attrs["fail_reason"] for t in failed)
    print(f"fast fail after {elapsed:.1f} s: {msg[:200]}")


@pytest.mark.parametrize("user_module", [True], indirect=True)
def test_losing_a_node_mid_search_fails_its_trial_and_reruns_it(make_spec, cluster, user_module):
    """The worker node dies while its actor runs a trial: that trial is recorded FAIL with Ray's reason, the search
    goes on on the head node, and exactly n_trials complete (none lost, none counted twice)."""
    from autoprune.searching.ray_backend import WHERE_ATTR

    name, hold = user_module
    spec = _spec(make_spec, cluster, name, priors="none")
    events: list[str] = []
    stop = threading.Event()

    def referee() -> None:  # kill the worker node under its first trial; then let the head node's trial go on
        handled: set[int] = set()
        head_waiting: list[int] = []
        killed = False
        while not stop.is_set():
            for f in hold.glob("blocked-*"):
                pid = int(f.name.split("-")[1])
                if pid in handled:
                    continue
                handled.add(pid)
                if not killed and cluster.worker_raylet in {_ppid(pid), pid} | _ancestors(pid):
                    cluster.kill_worker_node()
                    killed = True
                    events.append(f"killed the worker node under pid {pid}")
                else:
                    head_waiting.append(pid)
            if killed:
                for pid in head_waiting:
                    (hold / f"release-{pid}").touch()
                head_waiting.clear()
            time.sleep(0.05)

    t = threading.Thread(target=referee, daemon=True)
    t.start()
    try:
        t0 = time.perf_counter()
        result = api.search(spec, show_progress=False)
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        t.join(5)
    assert events, "no trial ran on the worker node"
    study = stored_study(spec)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert result["n_trials_complete"] == 6 == len(done)  # the lost trial was replaced, nothing counted twice
    assert len({t.number for t in done}) == 6 and not study.get_trials(states=(TrialState.RUNNING,))
    assert len(study.trials) == len(done) + len(failed) and 1 <= len(failed) <= 2
    for t in failed:
        assert t.user_attrs.get("fail_reason"), t.user_attrs
    heads = {trial_attrs(t)[WHERE_ATTR]["node_id"] for t in done[1:]}
    print(f"node loss: {events[0]}; {len(failed)} failed ({failed[0].user_attrs['fail_reason'][:160]}), "
          f"6 completed in {elapsed:.1f} s on {sorted(n[:8] for n in heads)}")
