"""cla2.api on its own: the routes take the server's state as a dependency, the shapes write OpenAI's JSON."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from cla2 import api


def test_the_routes_serve_any_app_that_holds_a_state():
    app = FastAPI()
    app.state.cla2 = api.ServerState(model_name="m")
    app.include_router(api.router)
    with TestClient(app) as c:
        assert c.get("/v1/models").json() == {"object": "list", "data": [
            {"id": "m", "object": "model", "created": 0, "owned_by": "cla2"}]}


def test_a_dependency_override_swaps_the_state():
    app = FastAPI()
    app.state.cla2 = api.ServerState(model_name="m")
    app.include_router(api.router)
    app.dependency_overrides[api.server_state] = lambda: api.ServerState(model_name="other")
    with TestClient(app) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "other"


def test_shapes_write_only_the_fields_given_in_openais_order():
    usage = api.Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)
    chunk = api.CompletionChunk(id="c", object="chat.completion.chunk", created=1, model="m",
                                choices=[api.ChatChunkChoice(index=0, delta=api.Delta(), finish_reason="stop")])
    assert chunk.dump() == {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    with_usage = api.CompletionChunk(id="c", object="text_completion", created=1, model="m", choices=[], usage=usage)
    assert list(with_usage.dump()) == ["id", "object", "created", "model", "choices", "usage"]
    text = api.CompletionChoice(index=0, text="x", finish_reason=None, logprobs=None)
    assert text.dump() == {"index": 0, "text": "x", "finish_reason": None, "logprobs": None}
    err = api.APIError(429, "busy", type="server_error", code="queue_full")
    assert err.body == {"error": {"message": "busy", "type": "server_error", "param": None, "code": "queue_full"}}


def test_parse_json_refuses_what_openai_would():
    import pytest

    for raw, why in ((b"{", "not valid JSON"), (b'{"a": NaN}', "not valid JSON"),
                     (b"[" * 40 + b"]" * 40, "nests JSON more than")):
        with pytest.raises(api.APIError, match=why) as err:
            api.parse_json(raw)
        assert err.value.status == 400
    assert api.parse_json(b'{"a": [1]}') == {"a": [1]}


def test_an_sse_event_is_one_line_whatever_its_text_holds():
    import json

    text = "一\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029二"
    for ensure_ascii in (False, True):
        event = api._sse({"text": text}, ensure_ascii=ensure_ascii)
        assert event.endswith("\n\n")
        line = event[:-2]
        assert line.splitlines() == [line] and line.startswith("data: ")
        assert json.loads(line[6:]) == {"text": text}
    assert "一" in api._sse({"text": text}, ensure_ascii=False)  # CJK stays as it is


def test_lone_surrogates_are_found_with_their_path():
    assert api.lone_surrogate({"messages": [{"role": "user", "content": "fine 😀"}]}) is None
    assert api.lone_surrogate({"messages": [{"content": "ok"}, {"content": [{"text": "a\udbffb"}]}]}) == [
        "messages", "1", "content", "0", "text"]
    assert api.lone_surrogate({"stop": ["x", "\ud800"]}) == ["stop", "1"]
    assert api.lone_surrogate({"extra": {"\udc00": 1}}) == ["extra", "'\\udc00'"]
