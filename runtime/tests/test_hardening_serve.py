"""Hardening of `cla2 serve`, second round (issue 24), over real HTTP (uvicorn in a thread on 127.0.0.1):
cancelled queued requests leave the queue at once, a client that drops inside its body is no server error,
a lone surrogate is a 400, and no SSE event line holds a character that splits it for a line reader."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest
from test_engine import held
from test_serve import KEY, Server, raw_post, wait_for

from cla2.engine import Engine, Result, SamplingParams
from cla2.serve import create_app


@pytest.fixture(scope="module")
def engine(tiny_model):
    e = Engine.from_pretrained(tiny_model, max_batch_size=4, name="tiny")
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(engine):
    s = Server(create_app(engine, web=False))
    yield s
    s.stop()


def metric(url: str, series: str) -> float | None:
    """The value of one series of /metrics (``name`` or ``name{labels}``), None when it is not there."""
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def http_statuses(url: str, path: str) -> dict[str, float]:
    """cla2_http_requests_total by status, for one path label."""
    prefix = f'cla2_http_requests_total{{path="{path}",status="'
    out = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line.startswith(prefix):
            status, value = line[len(prefix):].split('"}')
            out[status] = float(value)
    return out


# ---- row 1: a cancelled waiting request leaves the queue at once --------------------------------------

def test_clients_that_leave_the_queue_free_their_places_at_once(engine):
    """Batch 1, --max-waiting 4, four queued clients go away: the queue-length gauge drops to 0, their
    requests count as cancelled, and a live client is queued (and answered), not refused with 429,
    while the batch slot is still taken."""
    small = Engine(engine.model, engine.tokenizer, engine.device, max_batch_size=1, max_waiting=4, name="tiny")
    stepping, release = held(small)
    s = Server(create_app(small, web=False))
    socks: list[socket.socket] = []
    try:
        small.submit("从前", SamplingParams(max_new_tokens=3, temperature=0))  # takes the only slot
        assert stepping.wait(60), "the first request did not reach the batch"
        socks = [raw_post(s.url, "/v1/completions", {"prompt": "你好", "max_tokens": 2}) for _ in range(4)]
        assert wait_for(lambda: small.num_waiting == 4, 60)
        assert metric(s.url, "cla2_queue_length") == 4
        full = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        for sock in socks:
            sock.close()
        assert wait_for(lambda: metric(s.url, "cla2_queue_length") == 0, 60), \
            "the requests of gone clients still hold their places in the queue"
        assert small.num_running == 1 and not release.is_set()  # the slot is still taken
        key = 'cla2_requests_total{endpoint="completions",outcome="cancelled"}'
        assert wait_for(lambda: metric(s.url, key) == 4, 60)
        answer: list[httpx.Response] = []
        live = threading.Thread(target=lambda: answer.append(httpx.post(
            s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)))
        live.start()
        assert wait_for(lambda: small.num_waiting == 1 or bool(answer), 60)
        assert not answer, f"the live client was answered while the slot was taken: {answer[0].text}"
        release.set()
        live.join(60)
        assert answer and answer[0].status_code == 200, answer and answer[0].text
        assert small.finished["cancelled"] == 4
    finally:
        release.set()
        for sock in socks:
            sock.close()
        s.stop()
        small.close()


# ---- row 12: a client that drops inside its body --------------------------------------------------------

class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_that_drops_inside_its_body_is_not_a_server_error(server):
    """Content-Length promises more than is sent, then the socket closes: no traceback (at most one
    short log line), and no 5xx in cla2_http_requests_total."""
    records = Records()
    logger, error_logger = logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")
    level = error_logger.level
    logger.addHandler(records)
    error_logger.setLevel(logging.DEBUG)
    state = server.server.server_state
    try:
        before_statuses = http_statuses(server.url, "/v1/completions")
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
                     + b'{"prompt": "hi", "max_')
        # the app runs, waiting for the rest of the body
        assert wait_for(lambda: bool(state.tasks), 60), "the server never started on the request"
        sock.close()
        assert wait_for(lambda: not state.tasks and http_statuses(server.url, "/v1/completions") != before_statuses,
                        60), "the request was never answered or counted"
    finally:
        logger.removeHandler(records)
        error_logger.setLevel(level)
    after = http_statuses(server.url, "/v1/completions")
    new = {k: v - before_statuses.get(k, 0) for k, v in after.items() if v != before_statuses.get(k, 0)}
    assert list(new.values()) == [1], new
    assert not [k for k in new if k.startswith("5")], f"a client that went away was counted as {new}"
    assert not [r for r in records.records if r.exc_info or r.levelno >= logging.ERROR], \
        [r.getMessage() for r in records.records]
    lines = [r.getMessage() for r in records.records]
    assert len(lines) <= 1 and all("\n" not in line and len(line) < 300 for line in lines), lines
    # and the server keeps serving
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


# ---- row 13: a lone surrogate is a 400; SSE lines hold no line separator ------------------------------

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("path,raw,param,where", [
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "a\ud800b"}]}', "messages",
     "messages.0.content"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}',
     "messages", "messages.0.content.0.text"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]}', "stop",
     "stop.0"),
    ("/v1/chat/completions", rb'{"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model",
     "model"),
    ("/v1/completions", rb'{"prompt": "\udc00x", "max_tokens": 2}', "prompt", "prompt"),
    ("/v1/completions", rb'{"prompt": ["\ud83d"], "max_tokens": 2}', "prompt", "prompt.0"),
])
def test_a_lone_surrogate_is_an_openai_shaped_400_naming_the_field(server, path, raw, param, where):
    r = httpx.post(server.url + path, content=raw, headers=JSON, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert where in err["message"] and "surrogate" in err["message"]


def test_a_surrogate_pair_is_one_character_and_fine(server):
    raw = rb'{"messages": [{"role": "user", "content": "\ud83d\ude00"}], "max_tokens": 2}'
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers=JSON, timeout=60)
    assert r.status_code == 200, r.text


# Every character str.splitlines() breaks a line at, in the text of one generated piece.
SEPARATORS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
TEXT = "一\u2028二\u2029三\x85四\x0b五\x0c六\x1c七\x1d八\x1e九\r\n十"


class _Req:
    def cancel(self) -> None:
        pass


@pytest.fixture()
def separator_text(engine, monkeypatch):
    """The engine's stream answers TEXT, in two pieces, whatever the prompt."""
    def open_async(prompt, params=None):
        async def pieces():
            yield TEXT[:5]
            yield TEXT[5:]
            yield Result(text=TEXT, finish_reason="stop", prompt_tokens=1, completion_tokens=2, token_ids=[1, 2],
                         time_to_first_token=0.0, elapsed=0.0)
        return _Req(), pieces()

    monkeypatch.setattr(engine, "open_async", open_async)
    return TEXT


def test_sse_event_lines_hold_no_line_separator(server, separator_text):
    import asyncio

    async def lines(path: str, body: dict) -> tuple[list[str], bytes]:
        got, raw = [], b""
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            async with c.stream("POST", path, json={**body, "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    got.append(line)
            # the raw bytes too, for the separators aiter_lines would have hidden
            async with c.stream("POST", path, json={**body, "stream": True}) as r:
                async for chunk in r.aiter_bytes():
                    raw += chunk
        return got, raw

    for path, body, text_of in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
             lambda e: e["choices"][0]["delta"].get("content", "")),
            ("/v1/completions", {"prompt": "hi"}, lambda e: e["choices"][0]["text"])):
        got, raw = asyncio.run(lines(path, body))
        assert all(line == "" or line.startswith("data: ") for line in got), got
        events = [line[6:] for line in got if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(text_of(c) for c in chunks) == separator_text
        decoded = raw.decode()
        for line in decoded.split("\n\n"):
            assert not set(line) & set(SEPARATORS), repr(line)
        assert "一" in decoded  # CJK stays readable: only the separators are escaped


def test_openai_client_streams_text_with_line_separators(server, separator_text):
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == separator_text
    stream = c.completions.create(model="tiny", prompt="hi", stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == separator_text


# ---- row 5: fields this server does not implement are refused, not ignored ------------------------------

UNSUPPORTED = [
    ("/v1/chat/completions", "tools", "x"),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]),
    ("/v1/chat/completions", "tool_choice", "auto"),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/chat/completions", "response_format", "x"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "response_format", {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}),
    ("/v1/chat/completions", "response_format", {"type": "text", "extra": 1}),
    ("/v1/chat/completions", "logit_bias", "x"),
    ("/v1/chat/completions", "logit_bias", {"50256": -100}),
    ("/v1/completions", "logit_bias", {"1": 5}),
    ("/v1/completions", "response_format", {"type": "json_object"}),
]
NO_OPS = [("response_format", {"type": "text"}), ("tools", []), ("tool_choice", "none"), ("logit_bias", {}),
          ("functions", []), ("function_call", "none"), ("tools", None), ("response_format", None)]


def _body(path: str, **extra) -> dict:
    base = ({"messages": [{"role": "user", "content": "hi"}]} if path == "/v1/chat/completions" else {"prompt": "hi"})
    return {**base, "max_tokens": 2, **extra}


@pytest.mark.parametrize("path,field,value", UNSUPPORTED)
def test_an_unsupported_field_is_an_openai_shaped_400_naming_it(server, engine, path, field, value):
    before = sum(engine.finished.values())
    r = httpx.post(server.url + path, json=_body(path, **{field: value}), timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == field, err
    assert "does not support" in err["message"] and field in err["message"], err
    assert sum(engine.finished.values()) == before, "a refused request ran a generation"


@pytest.mark.parametrize("field,value", NO_OPS)
def test_the_no_op_forms_of_unsupported_fields_are_accepted(server, field, value):
    r = httpx.post(server.url + "/v1/chat/completions", json=_body("/v1/chat/completions", **{field: value}),
                   timeout=60)
    assert r.status_code == 200, r.text


def test_openai_client_gets_bad_request_for_unsupported_fields(server):
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    hi = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for kwargs, param in (({"tools": tools}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"logit_bias": {"1": 5}}, "logit_bias")):
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="tiny", messages=hi, max_tokens=2, **kwargs)
        assert err.value.param == param and "does not support" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt="hi", max_tokens=2, logit_bias={"1": 5})
    assert err.value.param == "logit_bias"
    r = c.chat.completions.create(model="tiny", messages=hi, max_tokens=2, response_format={"type": "text"},
                                  tools=[], logit_bias={})
    assert r.choices[0].message.role == "assistant"


# ---- row 16: with --api-key, every route but /health (and the web chat, which asks itself) needs it ------

@pytest.fixture(scope="module")
def keyed(engine):
    s = Server(create_app(engine, api_key=KEY, web=False))
    yield s
    s.stop()


@pytest.mark.parametrize("path", ["/metrics", "/openapi.json", "/docs", "/redoc", "/v1/models", "/nowhere"])
def test_with_a_key_only_health_is_open(keyed, path):
    r = httpx.get(keyed.url + path, timeout=60)
    assert r.status_code == 401, (path, r.status_code, r.text[:200])
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(keyed.url + path, headers={"Authorization": "Bearer wrong"}, timeout=60)
    assert r.status_code == 401
    r = httpx.get(keyed.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == (404 if path in ("/docs", "/redoc", "/nowhere") else 200), (path, r.text[:200])
    assert httpx.get(keyed.url + "/health", timeout=60).status_code == 200  # load balancers, probes


def test_metrics_with_the_key_is_prometheus_text(keyed):
    r = httpx.get(keyed.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and "cla2_http_requests_total" in r.text
    assert 'path="/metrics",status="401"' in r.text  # the refused scrapes are counted


def test_without_a_key_metrics_and_the_schema_stay_open(server):
    assert httpx.get(server.url + "/metrics", timeout=60).status_code == 200
    assert httpx.get(server.url + "/openapi.json", timeout=60).status_code == 200


# ---- row 2: every connection is bounded: its request head, its body, its idle time, and their number ----

def _closed(sock: socket.socket, limit: float = 30) -> tuple[bytes, bool]:
    """Read until the server closes ``sock`` or ``limit`` seconds pass: what it sent, and whether it closed."""
    sock.settimeout(0.5)
    got, deadline = b"", time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return got, True
        if not data:
            return got, True
        got += data
    return got, False


def trickle(port: int, head: bytes, limit: float = 30) -> tuple[bytes, bool]:
    """Send ``head``, then one byte every 0.2 s (a slow client), until the server closes the connection or
    ``limit`` seconds pass: what the server sent, and whether it closed the connection."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(0.2)
    got, deadline = b"", time.monotonic() + limit
    try:
        sock.sendall(head)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
                if not data:
                    return got, True
                got += data
            except TimeoutError:
                pass
            sock.sendall(b"x")
        return got, False
    except OSError:  # reset, broken pipe: closed by the server
        return got, True
    finally:
        sock.close()


@pytest.fixture(scope="module")
def limited(engine):
    """A keyless server with short limits (1 s for a request head or body, 1 s of keep-alive, 4 KiB of
    headers, 20 connections); the tests wait up to 30 s for what must happen within them."""
    from cla2.serve import Limits

    limits = Limits(header_timeout=1, body_timeout=1, keep_alive_timeout=1, max_connections=20,
                    max_header_bytes=4096)
    s = Server(create_app(engine, web=False, body_timeout=limits.body_timeout), limits=limits)
    yield s
    s.stop()


def test_a_slow_body_is_answered_408_and_closed(limited):
    before = http_statuses(limited.url, "/v1/completions").get("408", 0)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n" + b'{"prompt": "')
    got, closed = trickle(limited.port, head)
    assert closed, f"a body sent at 5 bytes a second kept its connection for 30 s (got {got[:200]!r})"
    assert got.startswith(b"HTTP/1.1 408 "), got[:300]
    body = json.loads(got.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and "--body-timeout" in body["error"]["message"]
    assert wait_for(lambda: http_statuses(limited.url, "/v1/completions").get("408", 0) == before + 1, 30)


def test_a_slow_body_to_a_route_that_does_not_read_it_is_closed(limited):
    head = (b"POST /v1/models HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    got, closed = trickle(limited.port, head)
    assert got.startswith(b"HTTP/1.1 405 "), got[:300]  # answered at once, without reading the body
    assert closed, "the rest of the body, sent slowly, kept the connection for 30 s"


def test_a_slow_request_head_is_answered_408_and_closed(limited):
    got, closed = trickle(limited.port, b"GET /health HTTP/1.1\r\nHost: a\r\nX-Slow: ")
    assert closed, f"a request head sent at 5 bytes a second kept its connection for 30 s (got {got[:200]!r})"
    assert got.startswith(b"HTTP/1.1 408 "), got[:300]


def test_a_connection_that_sends_nothing_is_closed(limited):
    sock = socket.create_connection(("127.0.0.1", limited.port))
    try:
        got, closed = _closed(sock)
    finally:
        sock.close()
    assert closed and got == b"", got


def test_an_idle_keep_alive_connection_is_closed(limited):
    sock = socket.create_connection(("127.0.0.1", limited.port))
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        got, closed = _closed(sock)
    finally:
        sock.close()
    assert got.startswith(b"HTTP/1.1 200 ") and closed, got[:300]


def test_a_request_head_over_the_limit_is_refused(limited):
    """8 KiB of a head still incomplete, against --max-header-bytes 4096 (h11 buffers at most that much of
    an incomplete head): 400, closed, without waiting for the head timeout."""
    sock = socket.create_connection(("127.0.0.1", limited.port))
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 8192)
        got, closed = _closed(sock)
    finally:
        sock.close()
    assert got.startswith(b"HTTP/1.1 400 ") and closed, got[:300]


def test_half_open_connections_beyond_the_limit_do_not_starve_health(engine):
    """100 connections that each send half a request head, against --max-connections 20 and a head
    timeout of 60 s (so what frees the room is the limit, not the timeout): the oldest half-open ones are
    closed as new ones come, and a new client gets /health."""
    from cla2.serve import Limits

    s = Server(create_app(engine, web=False), limits=Limits(header_timeout=60, max_connections=20))
    socks = []
    try:
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n")
            socks.append(sock)
        r = httpx.get(s.url + "/health", timeout=30)
        assert r.status_code == 200, r.text
        assert len(s.server.server_state.connections) <= 20
        got, closed = _closed(socks[0])
        assert closed and got == b"", "the oldest half-open connection was kept"
        # a request in flight is not one the limit closes
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    finally:
        for sock in socks:
            sock.close()
        s.stop()


def test_cli_serve_keeps_health_under_a_flood_of_half_open_connections(tiny_model):
    """`cla2 serve` with 256 open files at most (as the issue measured), 400 half-open connections: /health
    still answers a new client (without the limit, accept() failed with 'Too many open files' for good)."""
    import resource
    import subprocess
    import sys

    from test_serve import free_port

    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cla2", "serve", "--model", str(tiny_model), "--port", str(port),
                             "--no-web", "--device", "cpu"], preexec_fn=low_nofile,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    socks = []
    try:
        def ready():
            try:
                return httpx.get(url + "/health", timeout=5).json()["status"] == "ok"
            except (httpx.TransportError, ValueError):
                return False

        assert wait_for(ready, 120), "cla2 serve did not come up"
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n")
            socks.append(sock)
        assert wait_for(ready, 60), "/health did not answer with 400 half-open connections open"
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    assert "Traceback" not in out, out[-3000:]
