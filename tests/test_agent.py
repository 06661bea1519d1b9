"""Device agent: auth (401), body limit (413), no unpickling, JSON measurement, dead agent -> TrialFailed."""

from __future__ import annotations

import json
import pickle
import threading
import urllib.error
import urllib.request

import pytest

from autoprune.costs.agent import AgentClient, make_server
from autoprune.costs.budgets import _guard
from autoprune.searching.objective import TrialFailed

TOKEN = "t" * 32


def _serve(**kw):
    server = make_server("127.0.0.1", 0, token=TOKEN, device="cpu", **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def agent_url():
    yield from _serve(max_body=4096)


@pytest.fixture
def big_agent_url():  # the default body limit: room for an ONNX file
    yield from _serve()


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


MEASURE = {"model": {"factory": "autoprune.model.zoo:cnn1d", "kwargs": {}, "input_shape": [1, 40]},
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


def test_onnx_endpoint_times_an_exported_model(big_agent_url):
    """(b) an ONNX file, timed with onnxruntime on the agent; anything that is not ONNX is a 400."""
    import torch

    from autoprune.model import zoo
    from autoprune.pruning.groups import PrunableModel

    agent_url = big_agent_url
    client = AgentClient("agent://" + agent_url.removeprefix("http://"), model=MEASURE["model"],
                         pruning=MEASURE["pruning"], token=TOKEN)
    pm = PrunableModel(zoo.cnn1d(), torch.zeros(1, 1, 40))
    pruned = pm.apply(pm.uniform_plan(0.5))
    pruned._autoprune_plan = None  # an arbitrary module: goes as ONNX
    st = client.measure_model(pruned, pm.example)
    assert 0 < st.p10_ms <= st.median_ms <= st.p90_ms < 100 and st.runs >= 50
    code, ans = _post(agent_url + "/onnx?input_shape=1,40&batch_size=1&threads=1", b"not an onnx model" * 10,
                      ctype="application/octet-stream")
    assert code == 400 and "not a loadable ONNX model" in ans["error"]
    code, _ = _post(agent_url + "/onnx?input_shape=1,40", b"\x08\x07", token=None, ctype="application/octet-stream")
    assert code == 401


@pytest.mark.slow
def test_search_through_an_agent_meets_the_remeasured_budget(make_spec, monkeypatch):
    """The whole latency path through an agent on 127.0.0.1: fingerprint, lookup table built on the agent,
    a search, and the best re-measured on the agent."""
    server = make_server("127.0.0.1", 0, token=TOKEN, device="cpu")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    calls = []
    handle = server.RequestHandlerClass.do_POST

    def counting(self):
        calls.append(self.path.split("?")[0])
        return handle(self)

    monkeypatch.setattr(server.RequestHandlerClass, "do_POST", counting)
    monkeypatch.setenv("AUTOPRUNE_AGENT_TOKEN", TOKEN)
    url = f"agent://127.0.0.1:{server.server_address[1]}"
    try:
        from autoprune.app import api

        spec = make_spec("cnn1d", budget={"latency": 0.8, "device": url, "batch_size": 64, "threads": 1},
                         pruning={"round_to": 8}, search={"n_trials": 4, "priors": "none"})
        session = api.session(spec, show_progress=False)
        result = api.search(session, show_progress=False, test=False)
    finally:
        server.shutdown()
        server.server_close()
    assert result["n_trials_complete"] == 4 and result["n_trials_failed"] == 0
    limit = result["budget"]["limit"]
    assert limit == pytest.approx(0.8 * result["budget"]["base"])
    # the search lands on the budget's edge: whether the re-measure (on the agent) confirms a plan is timing
    # noise (CI once re-measured all 4 plans 3-15 % over); what must hold is that nothing unconfirmed is reported
    best = result["best"]
    checked = [r["measured"] for r in result["rejected_by_remeasure"]] + ([best["latency_ms"]] if best else [])
    assert checked and all(m > 0 for m in checked)
    assert best is None or best["latency_ms"] <= limit
    assert all(r["measured"] > limit for r in result["rejected_by_remeasure"])
    assert calls.count("/table") == 1  # the lookup table was built on the agent
    assert calls.count("/measure") >= 1 + len(checked)  # the base, then every re-measured plan
    cached = list((session.cache_dir / "latency").glob("cnn1d-*.json"))
    assert any(json.loads(c.read_text())["fingerprint"]["batch_size"] == 64 for c in cached)
