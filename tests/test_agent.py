"""Device agent: auth (401), body limit (413), no unpickling, JSON measurement, dead agent -> TrialFailed."""

from __future__ import annotations

import json
import pickle
import threading
import urllib.error
import urllib.request

import pytest

from autoprune.agent import AgentClient, make_server
from autoprune.latency import _guard
from autoprune.search.objective import TrialFailed

TOKEN = "t" * 32


@pytest.fixture
def agent_url():
    server = make_server("127.0.0.1", 0, token=TOKEN, device="cpu", max_body=4096)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _post(url, body: bytes, token: str | None = TOKEN, ctype="application/json"):
    req = urllib.request.Request(url, data=body, method="POST")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


MEASURE = {"model": {"factory": "autoprune.zoo:cnn1d", "kwargs": {}, "input_shape": [1, 40]},
           "pruning": {"ignore": [], "round_to": 8, "max_ratio": 0.9}, "plan": {"ratios": {}}, "batch_size": 1, "threads": 1}


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/autoprune-agent-unpickled", "w"))


def test_agent_auth_limits_and_no_pickle(agent_url, tmp_path):
    body = json.dumps(MEASURE).encode()
    assert _post(agent_url + "/measure", body, token=None)[0] == 401
    assert _post(agent_url + "/measure", body, token="wrong" * 8)[0] == 401
    assert _post(agent_url + "/measure", b"{" + b" " * 10000 + b"}")[0] == 413
    evil = pickle.dumps(Evil())
    assert _post(agent_url + "/measure", evil, ctype="application/octet-stream")[0] == 415
    assert _post(agent_url + "/measure", evil)[0] == 400
    import os
    assert not os.path.exists("/tmp/autoprune-agent-unpickled")
    bad = dict(MEASURE, model={"factory": "subprocess:run", "kwargs": {}, "input_shape": [1]})
    assert _post(agent_url + "/measure", json.dumps(bad).encode())[0] == 403
    code, ans = _post(agent_url + "/measure", body)
    assert code == 200 and 0 < ans["median_ms"] < 100 and ans["runs"] >= 50
    assert ans["fingerprint"]["batch_size"] == 1 and "torch" in ans["fingerprint"]


def test_dead_agent_fails_the_trial_not_the_study():
    client = AgentClient("agent://127.0.0.1:9", model=MEASURE["model"], pruning=MEASURE["pruning"], token=TOKEN,
                         timeout_s=2, retries=1, backoff_s=0.01)
    with pytest.raises(TrialFailed, match="unreachable"):
        _guard(lambda: client.fingerprint(), client, trial=True)
