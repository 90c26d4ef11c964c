"""The OpenAI-compatible API of `cla2 serve`: its request and response shapes and its route handlers.

The handlers get the server's state (:class:`ServerState`: the engine, the model name, the metrics, the
worker pool, the body limit) as a FastAPI dependency, ``Depends(server_state)``, which reads it from
``app.state.cla2``; :func:`cla2.serve.create_app` builds the state, includes :data:`router`, and keeps the
middleware (the guard that refuses before any handler runs, the HTTP counter), /health, /metrics and the
web chat. A test (or another app) can serve the same routes over a state of its own.

Request bodies are parsed and validated in worker threads (the state's ``pool``), never on the event
loop; a full waiting queue answers 429 with Retry-After; a client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cla2.engine import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    Engine,
    InvalidRequest,
    QueueFull,
    Result,
    SamplingParams,
)

if TYPE_CHECKING:
    from cla2.serve import Metrics

RETRY_AFTER_S = 1
# JSON nesting deeper than this is refused (an OpenAI request nests about 5 levels); json.loads itself
# raises RecursionError near 1000 levels, caught too.
MAX_JSON_DEPTH = 32
# A lone UTF-16 surrogate: JSON's "\ud800" escape without its pair decodes to one, which is no Unicode
# character; the tokenizer (and the UTF-8 encoder of any answer that repeats it) fails on it.
_SURROGATE = re.compile("[\ud800-\udfff]")
# What str.splitlines() ends a line at. json.dumps escapes the ones below U+0020 itself; with
# ensure_ascii=False U+0085, U+2028 and U+2029 would go out raw, and a client that reads SSE by lines as
# splitlines does (httpx's aiter_lines) would cut an event's line there. Each is escaped as \uXXXX (it can
# only stand inside a JSON string, where the escape means the same character).
_LINE_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


# ---- the server's state ------------------------------------------------------------------------------

class ServerState:
    """What the handlers share: the engine (None while it loads), the served model's name, the load status
    (/health's), the metrics, the pool that parses and tokenises, and the largest body accepted."""

    def __init__(self, engine: Engine | None = None, model_name: str | None = None,
                 max_body_bytes: int | None = None, pool: ThreadPoolExecutor | None = None):
        self.engine = engine
        self.model_name = model_name or (engine.name if engine else "model")
        self.status = "ok" if engine else "loading"
        self.error: str | None = None
        self.max_body_bytes = max_body_bytes
        self.pool = pool
        self.metrics: Metrics | None = None


def server_state(request: Request) -> ServerState:
    """The FastAPI dependency that hands a handler the app's :class:`ServerState`."""
    return request.app.state.cla2


State = Annotated[ServerState, Depends(server_state)]


# ---- request bodies (OpenAI's fields; top_k and repetition_penalty are extensions, as in vLLM) ---------

class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # OpenAI fields this server does not implement: declared (as anything) so that they are refused by
    # ``unsupported`` rather than dropped with the other unknown fields, as extra="ignore" would.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logit_bias: Any = None

    def unsupported(self) -> APIError | None:
        """The 400 for the first field that asks for what this server does not do, or None. The shapes
        follow vLLM's protocol (vllm-project/vllm vllm/entrypoints/openai/protocol.py at 0052bed36509):
        `tools` a list of {"type": "function", "function": {...}} and `tool_choice` "none", "auto",
        "required" or a named function; `response_format` {"type": "text" | "json_object" | "json_schema",
        ...}; `logit_bias` {token id: bias}. Whatever the value, only OpenAI's no-op forms are accepted:
        no tools (`[]`, `tool_choice: "none"`), `response_format: {"type": "text"}` (the default), and
        `logit_bias: {}`; anything else would be silently ignored, so it is refused."""
        no_op = {"tools": [], "functions": [], "tool_choice": "none", "function_call": "none",
                 "response_format": {"type": "text"}, "logit_bias": {}}
        what = {"tools": "tool calls", "functions": "function calls (the legacy form of tools)",
                "tool_choice": "tool calls", "function_call": "function calls (the legacy form of tools)",
                "response_format": "structured output (JSON mode, JSON schemas)",
                "logit_bias": "logit bias"}
        for field, accepted in no_op.items():
            value = getattr(self, field)
            if value is not None and value != accepted:
                return APIError(400, f"{field}: cla2 does not support {what[field]} yet: leave {field} out "
                                     f"(only {json.dumps(accepted)}, which changes nothing, is accepted)",
                                param=field, code="unsupported_parameter")
        return None

    def params(self) -> SamplingParams:
        if self.n != 1:
            raise InvalidRequest(f"n={self.n} is not supported: this server returns one choice (n=1)", "n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return SamplingParams(
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_k=DEFAULT_TOP_K if self.top_k is None else self.top_k,
            top_p=DEFAULT_TOP_P if self.top_p is None else self.top_p,
            repetition_penalty=(DEFAULT_REPETITION_PENALTY if self.repetition_penalty is None
                                else self.repetition_penalty),
            max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_tokens is None else max_tokens,
            stop=stop, seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content):
        # OpenAI's content parts; this model reads text only, so any other part is refused, not dropped.
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError('each content part must be {"type": "text", "text": <string>} '
                                     "(this model reads text only)")
        return content

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p["text"] for p in self.content)


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


# ---- response bodies (OpenAI's, field for field and in its order) -------------------------------------
#
# Built with every field that is to appear given explicitly, and written with ``exclude_unset``: a field
# left out (a stream chunk's ``usage`` without stream_options.include_usage, an empty ``delta``) is not
# in the JSON at all, as in OpenAI's.

class _Shape(BaseModel):
    def dump(self) -> dict:
        return self.model_dump(exclude_unset=True)


class Usage(_Shape):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, r: Result) -> Usage:
        return cls(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                   total_tokens=r.prompt_tokens + r.completion_tokens)


class ChatMessage(_Shape):
    role: str
    content: str


class ChatChoice(_Shape):
    index: int
    message: ChatMessage
    finish_reason: str | None


class CompletionChoice(_Shape):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None


class Completion(_Shape):
    """A ``chat.completion`` or a ``text_completion``."""
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice | CompletionChoice]
    usage: Usage


class Delta(_Shape):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Shape):
    index: int
    delta: Delta
    finish_reason: str | None


class CompletionChunk(_Shape):
    """A ``chat.completion.chunk`` or a streamed ``text_completion``; the last one, with
    stream_options.include_usage, has no choices and the usage."""
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChunkChoice | CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Shape):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(_Shape):
    object: str
    data: list[ModelCard]


class ErrorDetail(_Shape):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(_Shape):
    error: ErrorDetail


# ---- errors ------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code)).dump()
        self.headers = headers


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body, status_code=err.status, headers=err.headers)


def overloaded(why: str) -> APIError:
    return APIError(429, f"the server is busy ({why}): retry after {RETRY_AFTER_S} s", type="server_error",
                    code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})


# ---- reading a request -------------------------------------------------------------------------------

def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_deep(data: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``data`` nests lists/objects deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack = [(data, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > limit:
            return True
        children = obj.values() if isinstance(obj, dict) else obj
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 400 APIError: malformed, NaN/Infinity, or nested too deeply."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        data = None
        deep = True
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    else:
        deep = isinstance(data, (dict, list)) and _too_deep(data)
    if deep:
        raise APIError(400, f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep",
                       code="invalid_json")
    return data


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The body, read up to the limit (a chunked body has no Content-Length for the guard to check)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise APIError(413, f"the request body is over {max_body_bytes} bytes "
                                "(cla2 serve --max-body-bytes)", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def lone_surrogate(data: Any) -> list[str] | None:
    """The path (``["messages", "0", "content"]``) of the first string, or object key, in ``data`` that holds
    a lone UTF-16 surrogate, or None (iterative; an object's keys are looked at before its values)."""
    stack: list[tuple[Any, list[str]]] = [(data, [])]
    while stack:
        obj, path = stack.pop()
        if isinstance(obj, str):
            if _SURROGATE.search(obj):
                return path
        elif isinstance(obj, dict):
            for key in obj:
                if _SURROGATE.search(key):
                    return [*path, ascii(key)]
            stack.extend((v, [*path, k]) for k, v in reversed(obj.items()))
        elif isinstance(obj, list):
            stack.extend((v, [*path, str(i)]) for i, v in reversed(list(enumerate(obj))))
    return None


def validated(state: ServerState, raw: bytes, cls: type[_Sampling]) -> _Sampling:
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    bad = lone_surrogate(data)
    if bad is not None:
        raise APIError(400, f"invalid request: {'.'.join(bad)}: the string holds a lone UTF-16 surrogate (an "
                            "unpaired \\ud800-\\udfff escape), which is not a character: send the text as "
                            "UTF-8, or a character beyond U+FFFF as an escaped surrogate pair", param=bad[0])
    try:
        # strict: a string, a boolean or a float where a number, an integer or a string belongs is an
        # error, as in OpenAI's API, not something coerced
        body = cls.model_validate(data, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", ())]
        raise APIError(400, f"invalid request: {'.'.join(loc)}: {first.get('msg')}",
                       param=loc[0] if loc else None) from None
    refused = body.unsupported()
    if refused is not None:
        raise refused
    if body.model is not None and body.model != state.model_name:
        raise APIError(404, f"the model '{body.model}' does not exist: this server serves "
                            f"'{state.model_name}' (see GET /v1/models)", param="model",
                       code="model_not_found")
    return body


async def prepare(state: ServerState, request: Request, make_prompt: Callable[[bytes], tuple[_Sampling, str]]
                  ) -> tuple[_Sampling, list[int], SamplingParams]:
    """Read, parse, validate and tokenise (in the state's pool); a full queue is refused before any of it."""
    engine = state.engine
    if engine.queue_full:
        raise overloaded(f"{engine.num_waiting} requests wait for a batch slot")
    raw = await read_body(request, state.max_body_bytes)

    def work():
        body, prompt = make_prompt(raw)
        try:
            params = body.params().validate(engine.window)
            # the window check (and --truncate's cut) here too, not on the loop for a 2 MB prompt's ids
            ids, _ = engine.check_prompt(engine.encode(prompt), params)
            return body, ids, params
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None

    return await asyncio.get_running_loop().run_in_executor(state.pool, work)


# ---- answering ---------------------------------------------------------------------------------------

def open_stream(engine: Engine, ids: list[int], params: SamplingParams):
    try:
        return engine.open_async(ids, params)
    except InvalidRequest as exc:
        raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
    except QueueFull as exc:
        raise overloaded(str(exc)) from None


async def cancel_on_disconnect(request: Request, req, gone: Callable[[], None]) -> None:
    """Cancel ``req`` when the client goes away (the body is read by now, so the next ASGI message is
    http.disconnect). vLLM does the same for every request (its `with_cancellation` handler wrapper
    races the handler with `listen_for_disconnect`), streaming or not: the OpenAI client retries a
    request that timed out, and without this each retry would add a generation nobody reads."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            req.cancel()
            gone()
            return


def _sse(data: dict, ensure_ascii: bool = True) -> str:
    """One SSE event; its data line holds no character that a line reader ends a line at."""
    return "data: " + json.dumps(data, ensure_ascii=ensure_ascii).translate(_LINE_BREAKS) + "\n\n"


class _Answer:
    """One generation: its id and stamps, its metrics (counted once, whether it finishes or its client
    goes away), and its response, whole or streamed."""

    def __init__(self, state: ServerState, request: Request, endpoint: str, body: _Sampling, chat: bool):
        self.request, self.endpoint, self.body, self.chat = request, endpoint, body, chat
        self.metrics = state.metrics
        self.started = time.perf_counter()
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.model = state.model_name
        self.counted = False

    def finished(self, result: Result) -> None:
        if not self.counted:
            self.counted = True
            self.metrics.done(self.endpoint, result)

    def gone(self) -> None:
        # Counted here, once: a stream whose send failed is closed only when it is collected.
        if not self.counted:
            self.counted = True
            self.metrics.requests.labels(self.endpoint, "cancelled").inc()

    def first_token(self) -> None:
        self.metrics.ttft.observe(time.perf_counter() - self.started)

    async def whole(self, req, stream):
        watcher = asyncio.ensure_future(cancel_on_disconnect(self.request, req, self.gone))
        result: Result | None = None
        first = True
        try:
            async for piece in stream:
                if isinstance(piece, Result):
                    result = piece
                elif first and piece:
                    self.first_token()
                    first = False
        finally:
            watcher.cancel()
        self.finished(result)
        if result.finish_reason == "cancelled":
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        if result.error:
            raise APIError(500, f"generation failed: {result.error}", type="server_error")
        choice = (ChatChoice(index=0, message=ChatMessage(role="assistant", content=result.text),
                             finish_reason=result.finish_reason) if self.chat else
                  CompletionChoice(index=0, text=result.text, finish_reason=result.finish_reason, logprobs=None))
        return Completion(id=self.id, object=self.object, created=self.created, model=self.model,
                          choices=[choice], usage=Usage.of(result)).dump()

    def _chunk(self, choices: list, **usage) -> dict:
        return CompletionChunk(id=self.id, object=self.object + ".chunk" if self.chat else self.object,
                               created=self.created, model=self.model, choices=choices, **usage).dump()

    def chunk(self, delta_or_text, finish_reason: str | None = None) -> str:
        if self.chat:
            choice = ChatChunkChoice(index=0, delta=delta_or_text, finish_reason=finish_reason)
        else:
            choice = CompletionChoice(index=0, text=delta_or_text, finish_reason=finish_reason, logprobs=None)
        usage = {"usage": None} if self.body.include_usage else {}
        return _sse(self._chunk([choice], **usage), ensure_ascii=False)

    async def events(self, req, stream):
        first = True
        watcher = asyncio.ensure_future(cancel_on_disconnect(self.request, req, self.gone))
        try:
            if self.chat:
                yield self.chunk(Delta(role="assistant", content=""))
            async for piece in stream:
                if isinstance(piece, Result):
                    self.finished(piece)
                    if piece.error:
                        yield _sse(APIError(500, f"generation failed: {piece.error}", type="server_error").body)
                    else:
                        yield self.chunk(Delta() if self.chat else "", piece.finish_reason)
                        if self.body.include_usage:
                            yield _sse(self._chunk([], usage=Usage.of(piece)))
                    yield "data: [DONE]\n\n"
                    return
                if piece:
                    if first:
                        self.first_token()
                        first = False
                    yield self.chunk(Delta(content=piece) if self.chat else piece)
        finally:
            watcher.cancel()
            req.cancel()  # a no-op when it finished
            self.gone()  # a no-op when it finished


async def respond(state: ServerState, request: Request, endpoint: str, ids: list[int], params: SamplingParams,
                  body: _Sampling, chat: bool):
    answer = _Answer(state, request, endpoint, body, chat)
    req, stream = open_stream(state.engine, ids, params)
    if not body.stream:
        return await answer.whole(req, stream)
    return StreamingResponse(answer.events(req, stream), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- the routes --------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/v1/models")
async def models(state: State):
    return ModelList(object="list", data=[ModelCard(id=state.model_name, object="model", created=0,
                                                     owned_by="cla2")]).dump()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State):
    from cla2.prompts import build_chat_prompt

    def make_prompt(raw: bytes):
        body = validated(state, raw, ChatRequest)
        try:
            prompt = build_chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        return body, prompt

    body, ids, params = await prepare(state, request, make_prompt)
    return await respond(state, request, "chat", ids, params, body, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, state: State):
    def make_prompt(raw: bytes):
        body = validated(state, raw, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be one string (batches of prompts are not supported)",
                               param="prompt")
            prompt = prompt[0]
        return body, prompt

    body, ids, params = await prepare(state, request, make_prompt)
    return await respond(state, request, "completions", ids, params, body, chat=False)
