"""The OpenAI-compatible server over real HTTP (uvicorn in a thread on 127.0.0.1), tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cla2.engine import Engine
from cla2.serve import create_app

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``app`` served by uvicorn in a thread, with the connection limits ``cla2 serve`` sets (its defaults,
    or ``limits``)."""

    def __init__(self, app, limits=None):
        import uvicorn

        from cla2.serve import Limits, uvicorn_config

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, limits or Limits(), "warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def engine(tiny_model):
    e = Engine.from_pretrained(tiny_model, max_batch_size=4, name="tiny")
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(engine):
    s = Server(create_app(engine, api_key=KEY, web=False))
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_health_and_models(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": "tiny"}
    r = client.get("/v1/models")
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]


def test_chat_stream_equals_non_stream_and_shape(client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "你好，龘是什么字？"}],
            "max_tokens": 40, "temperature": 0.9, "seed": 7}
    full = client.post("/v1/chat/completions", json=body).json()
    assert full["object"] == "chat.completion"
    text = full["choices"][0]["message"]["content"]
    assert full["usage"]["completion_tokens"] > 0
    assert full["usage"]["total_tokens"] == full["usage"]["prompt_tokens"] + full["usage"]["completion_tokens"]
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert streamed == text
    assert all("\ufffd" not in c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])


def test_completions_stream_and_greedy(client):
    body = {"prompt": "从前有座山", "max_tokens": 20, "temperature": 0}
    a = client.post("/v1/completions", json=body).json()
    b = client.post("/v1/completions", json={**body, "seed": 123}).json()
    assert a["object"] == "text_completion"
    assert a["choices"][0]["text"] == b["choices"][0]["text"]  # temperature 0 is greedy: seed irrelevant
    assert a["choices"][0]["finish_reason"] == "length" and a["usage"]["completion_tokens"] == 20
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == a["choices"][0]["text"]
    assert "usage" not in events[-2]


JSON = {"Content-Type": "application/json"}
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("kwargs,status,param", [
    ({"content": b"{not json", "headers": JSON}, 400, None),
    ({"content": b"[" * 200_000 + b"]" * 200_000, "headers": JSON}, 400, None),  # nesting bomb
    ({"content": b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}", "headers": JSON}, 400, None),
    ({"content": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "headers": JSON},
     400, None),
    ({"content": b"[1, 2]", "headers": JSON}, 400, None),
    ({"json": {"messages": HI, "seed": 2**70}}, 400, "seed"),
    ({"json": {"messages": HI, "seed": -(2**64)}}, 400, "seed"),
    ({"json": {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}}, 400, "messages"),
    ({"json": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}},
     400, "messages"),
    ({"json": {"messages": [{"role": "user", "content": [5]}]}}, 400, "messages"),
    ({"json": {"messages": [{"role": "user", "content": 5}]}}, 400, "messages"),
    ({"json": {"messages": "hi"}}, 400, "messages"),
    ({"json": {"messages": HI, "temperature": "0.5"}}, 400, "temperature"),
    ({"json": {"messages": HI, "temperature": True}}, 400, "temperature"),
    ({"json": {"messages": HI, "max_tokens": 1.5}}, 400, "max_tokens"),
    ({"json": {"messages": HI, "max_tokens": 2**70}}, 400, "max_new_tokens"),
    ({"json": {"messages": HI, "top_k": 2**70}}, 400, "top_k"),
    ({"json": {"messages": HI, "stop": [1]}}, 400, "stop"),
    ({"json": {"messages": HI, "stop": ["x"] * 17}}, 400, "stop"),
    ({"json": {"messages": HI, "stream": "yes"}}, 400, "stream"),
    ({"json": {"messages": HI, "stream_options": "x"}}, 400, "stream_options"),
    ({"json": {"messages": HI, "n": 2}}, 400, "n"),
    ({"json": {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}}, 404, "model"),
    ({"json": {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}}, 400, "temperature"),
    ({"json": {"messages": [{"role": "user", "content": "hi"}], "top_p": 7}}, 400, "top_p"),
    ({"json": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}}, 400, "max_new_tokens"),
    ({"json": {"messages": [{"role": "user", "content": "hi"}], "top_k": -5}}, 400, "top_k"),
    ({"json": {"messages": []}}, 400, "messages"),
    ({"json": {"messages": [{"role": "robot", "content": "hi"}]}}, 400, None),
    ({"json": {"messages": [{"role": "user", "content": "字" * 3000}]}}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(client, kwargs, status, param):
    r = client.post("/v1/chat/completions", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"] == ("invalid_request_error")
    if param:
        assert err["param"] == param or (err["param"] or "").startswith(param)
    if "字" in json.dumps(kwargs.get("json", {}), ensure_ascii=False) and status == 400 and param == "messages":
        assert err["code"] == "context_length_exceeded" and "window" in err["message"]
    # and the server keeps serving
    ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_api_key_required(server):
    body = {"prompt": "hi", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # the monitor needs no key


def test_metrics(client):
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": False})
    text = client.get("/metrics").text
    for name in ("cla2_requests_total", "cla2_generation_tokens_total", "cla2_queue_length",
                 "cla2_time_to_first_token_seconds_count", "cla2_prompt_tokens_total"):
        assert name in text
    gen = [line for line in text.splitlines() if line.startswith("cla2_generation_tokens_total ")]
    assert float(gen[0].split()[1]) >= 3


def test_disconnect_frees_the_slot(server, engine):
    body = {"prompt": "很久很久以前", "max_tokens": 900, "temperature": 0.8, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(g.startswith("data: ") for g in got)
            deadline = time.time() + 60
            while engine.num_running == 0 and time.time() < deadline:
                time.sleep(0.01)
            assert engine.num_running == 1
    deadline = time.time() + 60
    while engine.num_running and time.time() < deadline:
        time.sleep(0.05)
    assert engine.num_running == 0, "the request of a disconnected client is still decoding"


def test_concurrent_requests_share_batches(server, engine):
    import concurrent.futures as cf

    def one(i):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            return c.post("/v1/completions", json={"prompt": f"第{i}个", "max_tokens": 60,
                                                   "temperature": 0}).json()

    engine.max_running = 0
    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(one, range(4)))
    assert all(o["usage"]["completion_tokens"] == 60 for o in outs)
    assert engine.max_running >= 3


def test_openai_client_round_trip(server):
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert [m.id for m in c.models.list()] == ["tiny"]
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}], max_tokens=16,
                                  temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens > 0
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                       max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    parts, usage = [], None
    for ch in stream:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
        if ch.usage:
            usage = ch.usage
    assert "".join(parts) == r.choices[0].message.content
    assert usage.completion_tokens == r.usage.completion_tokens
    comp = c.completions.create(model="tiny", prompt="一二三", max_tokens=5, temperature=0)
    assert comp.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad").models.list()


def test_health_reports_loading_then_error(tmp_path):
    import threading as th

    gate = th.Event()

    def loader():
        gate.wait(10)
        raise FileNotFoundError("model folder /nowhere holds no weights")

    s = Server(create_app(model_name="x", web=False, loader=loader))
    try:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "x"}).status_code == 503
        gate.set()
        deadline = time.time() + 60
        while httpx.get(s.url + "/health").json()["status"] == "loading" and time.time() < deadline:
            time.sleep(0.05)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "error" and "no weights" in r.json()["error"]
    finally:
        s.stop()


def test_cli_refuses_public_bind_without_key(tiny_model):
    env = {k: v for k, v in os.environ.items() if k != "CLA2_API_KEY"}
    p = subprocess.run([sys.executable, "-m", "cla2", "serve", "--model", str(tiny_model), "--host", "0.0.0.0"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0 and "API key" in p.stderr


def health_after_loading(url: str, timeout: float = 120) -> dict:
    """/health of a `cla2 serve` process once it is listening and no longer loading (or the last answer)."""
    deadline = time.time() + timeout
    body: dict = {}
    while time.time() < deadline:
        try:
            body = httpx.get(url + "/health").json()
            if body["status"] != "loading":
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return body


def test_cli_serve_process(tiny_model):
    """`cla2 serve` as operators run it: listens, loads, answers, with the key from the environment."""
    port = free_port()
    env = {**os.environ, "CLA2_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "cla2", "serve", "--model", str(tiny_model), "--port", str(port),
                             "--no-web", "--model-name", "alpaca"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert health_after_loading(url)["status"] == "ok"
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "alpaca", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == "alpaca"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_reports_a_placement_that_cannot_work_through_health(tiny_model):
    """`cla2 serve --devices 0,1` on a host with one device: the server listens and /health gives the plan's
    refusal (as the service role reads any failure to load), instead of a process gone before anyone asks."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cla2", "serve", "--model", str(tiny_model), "--port", str(port),
                             "--no-web", "--device", "cpu", "--devices", "0,1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = health_after_loading(f"http://127.0.0.1:{port}")
        assert body["status"] == "error"
        assert "device 1 does not exist; this process sees 1 device(s)" in body["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- hardening (issue 14): limits, refusals, cancellation, idle cost -----------------------------------------


def test_body_over_the_limit_is_413(engine):
    s = Server(create_app(engine, web=False, max_body_bytes=10_000))
    try:
        big = {"prompt": "a" * 20_000, "max_tokens": 1}
        r = httpx.post(s.url + "/v1/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert "--max-body-bytes" in r.json()["error"]["message"]

        def chunked():  # no Content-Length: the limit is enforced while reading
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i:i + 1000]

        r = httpx.post(s.url + "/v1/completions", content=chunked(), headers=JSON)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        ok = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert ok.status_code == 200
    finally:
        s.stop()


def test_health_answers_while_a_prompt_is_tokenised(client, engine, monkeypatch):
    """Tokenising a 2 MB prompt takes seconds (3.2 MB: 4.7 s here); it runs in a worker thread, so the
    event loop, and /health, answer meanwhile. The slow tokeniser is simulated: it ends when the test has its
    answer from /health (or after 30 s, when /health waited for it), however fast the machine is."""
    started, ended, release = threading.Event(), threading.Event(), threading.Event()
    real = engine.encode

    def slow_encode(prompt):
        started.set()
        release.wait(30)
        ended.set()
        return real(prompt)

    monkeypatch.setattr(engine, "encode", slow_encode)
    worker = threading.Thread(target=lambda: client.post("/v1/completions",
                                                          json={"prompt": "hi", "max_tokens": 1}))
    worker.start()
    assert started.wait(10)
    t0 = time.perf_counter()
    r = httpx.get(client.base_url.join("/health"), timeout=60)
    waited = time.perf_counter() - t0
    release.set()
    assert r.status_code == 200
    assert not ended.is_set(), f"/health waited for the tokeniser ({waited:.1f} s)"
    worker.join(60)


def test_post_without_json_content_type_is_415_and_generates_nothing(engine):
    """A cross-site page can POST text/plain or a form to a keyless loopback server without a CORS
    preflight; such a POST must not run a generation."""
    s = Server(create_app(engine, web=False))  # keyless, on loopback
    before = sum(engine.finished.values())
    try:
        body = json.dumps({"prompt": "hi", "max_tokens": 2})
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = httpx.post(s.url + "/v1/completions", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 415, (ctype, r.text)
            assert r.json()["error"]["code"] == "unsupported_media_type"
        assert httpx.post(s.url + "/v1/completions", content=body).status_code == 415  # no type at all
        assert sum(engine.finished.values()) == before, "a refused POST ran a generation"
        r = httpx.post(s.url + "/v1/completions", content=body,
                       headers={"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200
    finally:
        s.stop()


def http_series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("cla2_http_requests_total{")]


def test_metric_labels_come_from_the_route_list(server, client):
    """Refused requests to random paths (keyless scans) must not add a series each."""
    for i in range(20):
        httpx.post(server.url + f"/v1/scan-{i}", json={})  # no key: 401
        client.get(f"/v1/probe-{i}")  # with the key: 404
        httpx.get(server.url + f"/random-{i}")
    client.get("/metrics")  # the scrape itself is counted after it answers: its series exists from now on
    first = client.get("/metrics").text
    assert "scan-" not in first and "probe-" not in first and "random-" not in first
    for i in range(20, 40):
        httpx.post(server.url + f"/v1/scan-{i}", json={})
        client.get(f"/v1/probe-{i}")
    series = http_series(client.get("/metrics").text)
    assert len(series) == len(http_series(first))
    assert 'cla2_http_requests_total{path="other",status="401"}' in "\n".join(series)


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """A POST on a plain socket, so the test decides when the client goes away."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data)
    return sock


def wait_for(cond, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.01)
    return cond()


def cancelled_count(server) -> float:
    """cla2_requests_total{endpoint="completions",outcome="cancelled"} (0 before the first)."""
    key = 'cla2_requests_total{endpoint="completions",outcome="cancelled"} '
    for line in httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text.splitlines():
        if line.startswith(key):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_goes_away_cancels_its_request(server, engine, stream):
    """The OpenAI client retries a request that timed out: without this, each retry of a long
    non-streaming answer adds one more generation that nobody reads."""
    assert wait_for(lambda: engine.num_running == 0)
    cancelled, counted = engine.finished["cancelled"], cancelled_count(server)
    sock = raw_post(server.url, "/v1/completions",
                    {"prompt": "很久很久以前", "max_tokens": 1000, "temperature": 0.8, "stream": stream})
    assert wait_for(lambda: engine.num_running == 1, 10)
    sock.close()
    assert wait_for(lambda: engine.num_running == 0, 10), "the request of a gone client is still decoding"
    assert engine.finished["cancelled"] == cancelled + 1
    assert wait_for(lambda: cancelled_count(server) == counted + 1, 5)


def test_full_queue_is_429_with_retry_after(engine):
    import openai

    from cla2.engine import SamplingParams

    small = Engine(engine.model, engine.tokenizer, engine.device, max_batch_size=1, max_waiting=1, name="tiny")
    s = Server(create_app(small, web=False))
    running = small.stream("从前", SamplingParams(max_new_tokens=1000, temperature=0))
    try:
        next(running)
        assert wait_for(lambda: small.num_running == 1)
        small.submit("你好", SamplingParams(max_new_tokens=2))  # waits: the queue is full now
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).completions.create(
                model="tiny", prompt="hi", max_tokens=2)
        assert "cla2_http_requests_total{path=\"/v1/completions\",status=\"429\"}" in httpx.get(s.url + "/metrics").text
        running.close()
        assert wait_for(lambda: small.num_running == 0 and small.num_waiting == 0)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        running.close()
        s.stop()
        small.close()


def test_unexpected_error_is_an_openai_shaped_500(engine, monkeypatch):
    s = Server(create_app(engine, web=False))
    monkeypatch.setattr(engine, "encode", lambda prompt: 1 / 0)
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    finally:
        s.stop()
