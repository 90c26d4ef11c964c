"""Hardening of `cla2 serve`, second round (issue 24), over real HTTP (uvicorn in a thread on 127.0.0.1):
cancelled queued requests leave the queue at once, a client that drops inside its body is no server error,
a lone surrogate is a 400, and no SSE event line holds a character that splits it for a line reader."""

from __future__ import annotations

import json
import logging
import socket
import threading

import httpx
import pytest
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


def held(e: Engine) -> tuple[threading.Event, threading.Event]:
    """Hold the engine's decode steps until ``release`` is set: a running request keeps its batch slot
    however fast the machine is. ``stepping`` is set once a step waits."""
    stepping, release = threading.Event(), threading.Event()
    real_step = e._step

    def held_step():
        stepping.set()
        release.wait(60)
        real_step()

    e._step = held_step
    return stepping, release


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
