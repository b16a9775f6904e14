"""The gateway on loopback, in front of a real `transformers serve` backend (in-process, tiny random models):
serving, streaming, sticky arms, the request log, shadow calls, hot swap under load, and clear 4xx errors."""

import json
import threading
import time

import httpx
import pytest

from distillgate.errors import ConfigError
from distillgate.serve.assign import Assigner
from distillgate.serve.backends import Backend, free_port
from distillgate.serve.client import GatewayClient
from distillgate.serve.gateway import GatewayState, build_app
from distillgate.serve.log import COLUMNS, RequestLog, log_path, read_requests
from distillgate.serve.server import ThreadedServer, check_host
from distillgate.testing import save_tiny_model
from distillgate.testing.serve import transformers_serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_tokenizer):
    """One real `transformers serve` app (unpinned: the body's `model` picks the folder) with three tiny models."""
    d = tmp_path_factory.mktemp("serve-models")
    dirs = {n: str(save_tiny_model(d / n, num_layers=2, hidden=32, intermediate=64, seed=i, tokenizer=tiny_tokenizer))
            for i, n in enumerate(("a", "b", "c"))}
    with transformers_serve(d) as url:
        for m in dirs.values():  # load each model once, so tests time the serving and not the loading
            httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        yield url, dirs


@pytest.fixture
def gateway(backend, tmp_path):
    url, dirs = backend
    made = []

    def make(shadow=False, token=None, max_body=1 << 16, weights=None):
        log = RequestLog(log_path(tmp_path / "run"))
        state = GatewayState(arms={"control": Backend(url, dirs["a"], "v1"), "candidate": Backend(url, dirs["b"], "v2")},
                             assigner=Assigner("exp", weights or {"control": 0.5, "candidate": 0.5}),
                             request_log=log, shadow=Backend(url, dirs["a"], "v1") if shadow else None,
                             token=token, max_body_bytes=max_body, stop_replaced=False)
        server = ThreadedServer(build_app(state)).start()
        made.append((server, log))
        return server, state, log

    yield make
    for server, log in made:
        server.stop()
        log.close()


def _rows(log, state, n, timeout=10.0):
    """The log's rows once ``n`` are there (the log is written after the response, in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        log.flush()
        rows = read_requests(log.path)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_serves_streams_and_logs_whole_rows(gateway):
    server, state, log = gateway()
    with GatewayClient(server.url) as c:
        plain = c.chat("hello", user_id="alice", session_id="s1", max_tokens=5)
        streamed = c.chat("hello", user_id="alice", session_id="s1", max_tokens=5, stream=True)
        assert c.health()["arms"]["control"]["version"] == "v1"
    for r in (plain, streamed):
        assert r.ok and r.arm in ("control", "candidate") and r.request_id.startswith("chatcmpl-")
        assert r.usage["completion_tokens"] == 5 and r.text is not None
    assert plain.arm == streamed.arm  # sticky
    rows = {r["request_id"]: r for r in _rows(log, state, 2)}
    assert set(rows) == {plain.request_id, streamed.request_id}
    for res in (plain, streamed):
        row = rows[res.request_id]
        assert set(row) == set(COLUMNS)
        assert row["status"] == 200 and row["error"] is None and row["arm"] == res.arm
        assert row["model_version"] == res.version and row["user_id"] == "alice" and row["session_id"] == "s1"
        assert row["response"] == res.text and row["completion_tokens"] == 5 and row["prompt_tokens"] > 0
        assert 0 < row["ttft_ms"] <= row["latency_ms"] and row["request"]["messages"][0]["content"] == "hello"
        assert row["finish_reason"] == "length" and abs(row["ts"] - time.time()) < 60
    assert rows[streamed.request_id]["stream"] and not rows[plain.request_id]["stream"]


def test_sticky_assignment_is_deterministic_weighted_and_stable():
    a = Assigner("exp", {"control": 0.5, "candidate": 0.5})
    users = [f"user-{i}" for i in range(4000)]
    arms = [a.assign(u) for u in users]
    assert arms == [Assigner("exp", {"control": 1, "candidate": 1}).assign(u) for u in users]  # no state
    assert abs(arms.count("candidate") / len(users) - 0.5) < 0.03
    b = Assigner("exp", {"control": 0.6, "candidate": 0.4})  # moving 10% of the weight moves ~10% of users
    moved = sum(x != b.assign(u) for x, u in zip(arms, users))
    assert 0.07 < moved / len(users) < 0.13 and all(b.assign(u) == "control" for u, x in zip(users, arms)
                                                    if x == "control")
    other = Assigner("exp2", {"control": 0.5, "candidate": 0.5})  # experiments hash independently
    assert 0.4 < sum(x != other.assign(u) for x, u in zip(arms, users)) / len(users) < 0.6
    assert Assigner("exp", {"control": 0, "candidate": 1}).assign("anyone") == "candidate"
    with pytest.raises(ConfigError, match="serving.weights"):
        Assigner("exp", {"control": -1, "candidate": 1})


def test_sticky_arms_through_the_gateway(gateway):
    server, state, log = gateway()
    with GatewayClient(server.url) as c:
        seen = {u: {c.chat("hi", user_id=u, max_tokens=1).arm for _ in range(3)} for u in ("u1", "u2", "u3", "u4")}
        forced = c.chat("hi", user_id="u1", model="candidate", max_tokens=1)
    assert all(len(s) == 1 for s in seen.values())
    assert {u: s.pop() for u, s in seen.items()} == {u: state.assigner.assign(u) for u in seen}
    assert forced.arm == "candidate" and forced.version == "v2"


def test_bad_requests_get_clear_4xx_and_nothing_is_logged(gateway):
    server, state, log = gateway(max_body=4096)
    h = {"Content-Type": "application/json"}
    ok_msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"messages": ok_msgs, "pad": "x" * 5000}).encode(), 413, "body_too_large"),
        (json.dumps({"model": "gpt-9", "messages": ok_msgs}).encode(), 404, "model_not_found"),
        (json.dumps({"messages": []}).encode(), 400, "invalid_messages"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "invalid_messages"),
        (json.dumps({"messages": ok_msgs, "max_tokens": 0}).encode(), 400, "invalid_max_tokens"),
        (json.dumps([1, 2]).encode(), 400, "invalid_request"),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for body, status, code in cases:
            r = c.post("/v1/chat/completions", content=body, headers=h)
            assert r.status_code == status, (body[:40], r.text)
            err = r.json()["error"]
            assert err["code"] == code and err["message"]
        # an oversized body sent without Content-Length (chunked) is cut off as well
        r = c.post("/v1/chat/completions", content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]), headers=h)
        assert r.status_code == 413
        assert "gpt-9" in c.post("/v1/chat/completions", content=cases[2][0], headers=h).json()["error"]["message"]
        metrics = c.get("/metrics").text
        assert c.get("/v1/chat/completions").status_code == 405  # the hot path takes POSTs only
        # a bug inside the handler (here: the assigner raising) is a clean JSON 500, not a dropped connection
        real = state.assigner.assign
        state.assigner.assign = lambda key: (_ for _ in ()).throw(RuntimeError("boom"))
        try:
            r = c.post("/v1/chat/completions", content=json.dumps({"messages": ok_msgs}).encode(), headers=h)
        finally:
            state.assigner.assign = real
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "RuntimeError" in r.json()["error"]["message"] and "boom" not in r.text
    log.flush()
    assert read_requests(log.path) == []
    assert 'distillgate_refused_total{reason="invalid_json"} 1.0' in metrics


def test_token_and_loopback(gateway):
    server, state, log = gateway(token="s3cret")
    with GatewayClient(server.url) as anon, GatewayClient(server.url, token="s3cret") as ok:
        assert anon.chat("hi", max_tokens=1).status == 401
        assert ok.chat("hi", max_tokens=1).ok
    with pytest.raises(ConfigError, match="--allow-remote"):
        check_host("0.0.0.0", allow_remote=False, token=None)
    with pytest.raises(ConfigError):
        check_host("0.0.0.0", allow_remote=True, token=None)
    check_host("0.0.0.0", allow_remote=True, token="t")
    check_host("::1", allow_remote=False, token=None)


def test_shadow_call_and_backend_failure_are_logged(gateway):
    server, state, log = gateway(shadow=True, weights={"control": 0, "candidate": 1})
    with GatewayClient(server.url) as c:
        r = c.chat("hi", user_id="u", max_tokens=3)
        state.arms["control"] = Backend(f"http://127.0.0.1:{free_port()}", "gone", "v9")  # nobody listens
        down = c.chat("hi", user_id="u", model="control", max_tokens=3)
    assert r.ok and r.version == "v2" and down.status == 502 and "unreachable" in down.error
    rows = {x["request_id"]: x for x in _rows(log, state, 2)}
    row = rows[r.request_id]
    assert row["shadow_model_version"] == "v1" and row["shadow_response"] is not None
    assert row["shadow_latency_ms"] > 0 and row["shadow_error"] is None
    bad = rows[down.request_id]
    assert bad["status"] == 502 and "unreachable" in bad["error"] and bad["response"] is None


def test_hot_swap_under_load_drops_no_request(gateway, backend):
    url, dirs = backend
    server, state, log = gateway(weights={"control": 0, "candidate": 1})
    results, stop = [], threading.Event()

    def hammer(i):
        with GatewayClient(server.url) as c:
            while not stop.is_set():
                results.append(c.chat("hi", user_id=f"u{i}", max_tokens=2, stream=i % 2 == 0))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    with GatewayClient(server.url) as c:
        swapped = c.swap("candidate", url=url, model=dirs["c"], version="v3")
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert swapped == {"arm": "candidate", "version": "v3", "replaced": "v2"}
    assert len(results) > 8 and all(r.ok for r in results), [r.error for r in results if not r.ok]
    versions = [r.version for r in results]
    assert "v2" in versions and "v3" in versions and versions[-1] == "v3"
    rows = _rows(log, state, len(results))
    assert len(rows) == len(results) and all(r["status"] == 200 for r in rows)
    assert state.arms["candidate"].version == "v3" and state.arms["candidate"].inflight == 0


def test_gp2_through_the_gateway_under_a_locust_load(backend, tmp_path):
    """G-P2 plumbing: a bounded locust load (sessions with growing contexts + bursts) through the gateway, both
    arms the same requests; volatility per arm from the request log, a bootstrap CI around the ratio."""
    from distillgate.serve.load import measure_through_gateway
    from distillgate.serve.spec import ServingSpec

    url, dirs = backend
    # sized to give >= 20 answers per arm even on a loaded 2-core machine (the measurement's minimum)
    spec = ServingSpec(enabled=True, load_users=6, load_seconds=5, load_max_tokens=1, long_context_words=48,
                       burst_size=4, burst_every_s=0.5, think_time_s=0.02)
    arms = {"teacher": Backend(url, dirs["a"], "teacher"), "student": Backend(url, dirs["b"], "student")}
    r = measure_through_gateway(arms, spec, tmp_path / "load")
    d = r["details"]
    assert d["locust"]["exit_code"] == 0 and d["failed"] == {"teacher": 0, "student": 0}
    n = {a: d["locust"]["stats"][a]["num_requests"] for a in ("teacher", "student")}
    # each turn goes to both arms; only the turn or burst cut by the end of the run may be on one arm alone
    assert min(n.values()) >= 20 and abs(n["teacher"] - n["student"]) <= spec.burst_size
    assert all(abs(d[a]["n"] - n[a]) <= spec.burst_size for a in n)  # the log saw what locust sent
    assert r["latency_volatility_ratio"] == pytest.approx(d["student"]["volatility"] / d["teacher"]["volatility"])
    lo, hi = d["ci95"]
    assert lo <= r["latency_volatility_ratio"] <= hi
    rows = read_requests(tmp_path / "load" / "requests.sqlite")
    assert max(len(x["request"]["messages"][0]["content"].split()) for x in rows) > 24  # long contexts were sent
    assert len({x["session_id"] for x in rows}) >= 4  # many sessions


@pytest.mark.slow
def test_gp2_provider_uses_the_gateway_when_serving_is_enabled(tiny_teacher_dir, tiny_student_dir, tmp_path):
    """The loop's validate path: latency_volatility_ratio through real `transformers serve` child processes."""
    from distillgate.evaluate.providers import GateContext, load_providers, measure
    from distillgate.models import load_model
    from distillgate.serve.spec import ServingSpec

    load_providers()
    spec = ServingSpec(enabled=True, load_users=4, load_seconds=5, load_max_tokens=2, long_context_words=60)
    ctx = GateContext.with_models(load_model(str(tiny_teacher_dir)), load_model(str(tiny_student_dir)),
                                  {"serving": spec})
    values, notes = measure(ctx, ["latency_volatility_ratio"])
    d = ctx.details["latency_volatility_ratio"]
    assert values["latency_volatility_ratio"] > 0 and "through the gateway" in d["method"]
    assert values["latency_volatility_ratio/ci_low"] <= values["latency_volatility_ratio"]
    assert d["teacher"]["n"] >= 20 and d["failed"] == {"teacher": 0, "student": 0}


def test_serve_command_on_loopback(backend, tmp_path, tiny_student_dir, capsys, monkeypatch):
    """`distillgate serve RUN` through cli.main (URL backends): refuses a public bind, serves, logs, stops. The
    foreground uvicorn runner is swapped for the threaded one so the test can stop it (a subprocess would pay
    ~10 s of imports here)."""
    import distillgate.serve.server as server_mod
    from distillgate.cli import main
    from distillgate.store import RunStore

    url, dirs = backend
    with RunStore.create(tmp_path / "runs", {"teacher": {"path": dirs["a"]}}, run_id="r1") as st:
        vw = st.begin_version(1)
        vw.add_dir("student", tiny_student_dir)
        vw.commit()
    assert main(["serve", "r1", "--root", str(tmp_path / "runs"), "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    up, stop, port = threading.Event(), threading.Event(), free_port()

    def serve_until_stopped(app, host, port):
        with ThreadedServer(app, host, port):
            up.set()
            stop.wait(60)

    monkeypatch.setattr(server_mod, "serve_forever", serve_until_stopped)
    rc = []
    t = threading.Thread(target=lambda: rc.append(main(
        ["serve", "r1", "--root", str(tmp_path / "runs"), "--port", str(port), "--backend", url, "--control-url", url,
         "--candidate-weight", "1"])))
    t.start()
    try:
        assert up.wait(60)
        with GatewayClient(f"http://127.0.0.1:{port}") as c:
            r = c.chat("hi", user_id="u", max_tokens=2)
            assert c.health()["arms"]["control"]["version"] == "teacher"
        assert r.ok and r.arm == "candidate" and r.version == "v1"
    finally:
        stop.set()
        t.join(30)
    assert rc == [0]
    assert "gateway on http://127.0.0.1" in capsys.readouterr().out
    rows = read_requests(log_path(tmp_path / "runs" / "r1"))
    assert [(x["request_id"], x["model_version"], x["status"]) for x in rows] == [(r.request_id, "v1", 200)]
