"""`cla2 serve`: an OpenAI-compatible HTTP API and a web chat over one batching engine.

Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming with SSE or not), and the web
chat at ``/chat``. The server listens first and loads the model after, so ``/health`` tells a monitor
whether the model is loading (503), loaded (200) or failed to load (503 with the cause).

Hardening (see docs/failure-modes.md, "Server"): bodies are capped (413), POSTs must be JSON (415), any
invalid value is an OpenAI-style 400, the JSON is parsed and the prompt tokenised in worker threads (the
event loop, and so /health, never waits on them), a full waiting queue answers 429 with Retry-After, a
client that goes away cancels its request (streaming or not), and metric labels come from an allow-list.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cla2 import plan
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
from cla2.settings import Placement, grouped

DEFAULT_PORT = 19327
# Request bodies above this are refused with 413 before they are read. text-generation-inference's router
# has the same guard (`--payload-limit`, 2 MB by default); 2 MB holds a 4096-token prompt many times over.
DEFAULT_MAX_BODY_BYTES = 2_000_000
# Requests that may wait for a batch slot; the next one gets 429 + Retry-After (TGI's router refuses
# requests over `--max-concurrent-requests`, 128 by default, "instead of having them wait for too long",
# with 429 "Model is overloaded"; the OpenAI client retries a 429 after the Retry-After it is given).
DEFAULT_MAX_WAITING = 64
RETRY_AFTER_S = 1
# JSON nesting deeper than this is refused (an OpenAI request nests about 5 levels); json.loads itself
# raises RecursionError near 1000 levels, caught too.
MAX_JSON_DEPTH = 32
# The only values of the `path` label of cla2_http_requests_total (a fixed set, as Prometheus' advice on
# label cardinality asks, and as vLLM / TGI label by route template, never by raw URL); anything else
# is "other", and the web chat's many asset paths are not counted.
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


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


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param,
                                                    "code": code}}
        self.headers = headers


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body, status_code=err.status, headers=err.headers)


def _overloaded(why: str) -> APIError:
    return APIError(429, f"the server is busy ({why}): retry after {RETRY_AFTER_S} s", type="server_error",
                    code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})


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


# ---- metrics -----------------------------------------------------------------------------------------

class Metrics:
    def __init__(self, state: ServerState):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("cla2_requests_total", "Generation requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=self.registry)
        self.http = Counter("cla2_http_requests_total", "HTTP requests by path and status",
                            ["path", "status"], registry=self.registry)
        self.prompt_tokens = Counter("cla2_prompt_tokens_total", "Prompt tokens processed",
                                     registry=self.registry)
        self.generation_tokens = Counter("cla2_generation_tokens_total", "Tokens generated",
                                         registry=self.registry)
        self.ttft = Histogram("cla2_time_to_first_token_seconds", "Time from request to first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                              registry=self.registry)
        queue = Gauge("cla2_queue_length", "Requests waiting for a batch slot", registry=self.registry)
        queue.set_function(lambda: state.engine.num_waiting if state.engine else 0)
        running = Gauge("cla2_running_requests", "Requests in the running batch", registry=self.registry)
        running.set_function(lambda: state.engine.num_running if state.engine else 0)

    def done(self, endpoint: str, result: Result) -> None:
        self.requests.labels(endpoint, result.finish_reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.completion_tokens)


class ServerState:
    def __init__(self, engine: Engine | None = None, model_name: str | None = None):
        self.engine = engine
        self.model_name = model_name or (engine.name if engine else "model")
        self.status = "ok" if engine else "loading"
        self.error: str | None = None


def create_app(engine: Engine | None = None, model_name: str | None = None, api_key: str | None = None,
               web: bool = True, loader=None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               web_concurrency: int = 8) -> FastAPI:
    """The FastAPI app. Pass a ready ``engine``, or a ``loader()`` that returns one: it runs in a thread
    once the server is up, and /health reports its progress. ``max_body_bytes``: larger bodies get 413.
    ``web_concurrency``: web chat answers generated at once (the others wait in gradio's queue)."""
    from contextlib import asynccontextmanager

    state = ServerState(engine, model_name)
    # JSON parsing, validation, the chat template and tokenisation run here, off the event loop (vLLM's
    # OpenAI server tokenises in a ThreadPoolExecutor, `_tokenizer_executor`, for the same reason): a 2 MB
    # prompt takes seconds to tokenise, and /health must answer meanwhile. Two workers, as TGI's router has
    # two tokenizer workers for validation by default (`--validation-workers 2`): a flood of large bodies
    # cannot take every core from the decode thread.
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cla2-prepare")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if loader is not None and state.engine is None:
            def load() -> None:
                try:
                    state.engine = loader()
                    state.status = "ok"
                except Exception as exc:  # noqa: BLE001 - reported through /health
                    state.status, state.error = "error", f"{type(exc).__name__}: {exc}"
            threading.Thread(target=load, name="cla2-load", daemon=True).start()
        yield
        pool.shutdown(wait=False, cancel_futures=True)
        if state.engine is not None and loader is not None:
            state.engine.close()

    app = FastAPI(title="cla2", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.cla2 = state
    metrics = Metrics(state)
    app.state.metrics = metrics

    def refusal(scope) -> APIError | None:
        """Why the request is refused before any handler runs, or None."""
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        api = path.startswith("/v1/")
        if api and api_key is not None:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return APIError(400, f"bad Content-Length header {length!r}", code="invalid_request")
            if int(length) > max_body_bytes:
                return APIError(413, f"the request body is {int(length)} bytes; this server takes at most "
                                     f"{max_body_bytes} (cla2 serve --max-body-bytes)", code="body_too_large")
        if api and method == "POST":
            # A browser sends a cross-site form or text/plain POST without asking first (no CORS preflight),
            # so a page the operator visits could otherwise run generations on a keyless loopback server;
            # application/json needs a preflight, which this server never grants.
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return APIError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' "
                                     f"(got {ctype or 'none'})", code="unsupported_media_type")
        if api and state.engine is None:
            return APIError(503, f"the model is not ready ({state.status}"
                                 f"{': ' + state.error if state.error else ''})",
                            type="server_error", code="model_not_ready")
        return None

    class Guard:
        """Pure ASGI (no BaseHTTPMiddleware: it would stand between a handler and the client's disconnect):
        refuses what ``refusal`` says, and counts every response under an allow-listed path label."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            path = scope["path"]
            status = [500]  # what an exception becomes (ServerErrorMiddleware, outside this one)

            async def counting_send(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                err = refusal(scope)
                if err is not None:
                    await _error_response(err)(scope, receive, counting_send)
                else:
                    await self.app(scope, receive, counting_send)
            finally:
                if not path.startswith("/chat"):
                    metrics.http.labels(path if path in ROUTES else "other", str(status[0])).inc()

    app.add_middleware(Guard)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return _error_response(err)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return _error_response(APIError(404, f"no route {request.method} {request.url.path}",
                                        code="not_found"))

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        return _error_response(APIError(405, f"method {request.method} not allowed on {request.url.path}",
                                        code="method_not_allowed"))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        # Whatever slipped through is still an OpenAI-shaped answer (the traceback goes to the log).
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                        type="server_error", code="internal_error"))

    @app.get("/health")
    async def health():
        if state.status == "ok":
            return {"status": "ok", "model": state.model_name}
        body = {"status": state.status}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "cla2"}]}

    async def read_body(request: Request) -> bytes:
        """The body, read up to the limit (a chunked body has no Content-Length for the guard to check)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"the request body is over {max_body_bytes} bytes "
                                    "(cla2 serve --max-body-bytes)", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def validated(raw: bytes, cls: type[_Sampling]) -> _Sampling:
        data = parse_json(raw)
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            # strict: a string, a boolean or a float where a number, an integer or a string belongs is an
            # error, as in OpenAI's API, not something coerced
            body = cls.model_validate(data, strict=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = [str(x) for x in first.get("loc", ())]
            raise APIError(400, f"invalid request: {'.'.join(loc)}: {first.get('msg')}",
                           param=loc[0] if loc else None) from None
        if body.model is not None and body.model != state.model_name:
            raise APIError(404, f"the model '{body.model}' does not exist: this server serves "
                                f"'{state.model_name}' (see GET /v1/models)", param="model",
                           code="model_not_found")
        return body

    async def prepare(request: Request, make_prompt) -> tuple[_Sampling, list[int], SamplingParams]:
        """Read, parse, validate and tokenise (in ``pool``); a full queue is refused before any of it."""
        if state.engine.queue_full:
            raise _overloaded(f"{state.engine.num_waiting} requests wait for a batch slot")
        raw = await read_body(request)

        def work():
            body, prompt = make_prompt(raw)
            try:
                params = body.params().validate(state.engine.window)
                # the window check (and --truncate's cut) here too, not on the loop for a 2 MB prompt's ids
                ids, _ = state.engine.check_prompt(state.engine.encode(prompt), params)
                return body, ids, params
            except InvalidRequest as exc:
                raise APIError(400, str(exc), param=exc.param, code=exc.code) from None

        return await asyncio.get_running_loop().run_in_executor(pool, work)

    def open_stream(ids: list[int], params: SamplingParams):
        try:
            return state.engine.open_async(ids, params)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
        except QueueFull as exc:
            raise _overloaded(str(exc)) from None

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

    def usage(r: Result) -> dict:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    async def respond(request: Request, endpoint: str, ids: list[int], params: SamplingParams, body: _Sampling,
                      chat: bool):
        started = time.perf_counter()
        req, stream = open_stream(ids, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        model = state.model_name

        counted = [False]

        def finished(result: Result) -> None:
            if not counted[0]:
                counted[0] = True
                metrics.done(endpoint, result)

        def gone() -> None:
            # Counted here, once: a stream whose send failed is closed only when it is collected.
            if not counted[0]:
                counted[0] = True
                metrics.requests.labels(endpoint, "cancelled").inc()

        if not body.stream:
            watcher = asyncio.ensure_future(cancel_on_disconnect(request, req, gone))
            result: Result | None = None
            first = True
            try:
                async for piece in stream:
                    if isinstance(piece, Result):
                        result = piece
                    elif first and piece:
                        metrics.ttft.observe(time.perf_counter() - started)
                        first = False
            finally:
                watcher.cancel()
            finished(result)
            if result.finish_reason == "cancelled":
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            if result.error:
                raise APIError(500, f"generation failed: {result.error}", type="server_error")
            choice = ({"index": 0, "message": {"role": "assistant", "content": result.text},
                       "finish_reason": result.finish_reason} if chat else
                      {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None})
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                    "usage": usage(result)}

        include_usage = body.include_usage

        def chunk(delta_or_text, finish_reason=None) -> str:
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": delta_or_text, "finish_reason": finish_reason, "logprobs": None}
            data = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": model,
                    "choices": [choice]}
            if include_usage:
                data["usage"] = None
            return "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"

        async def sse():
            first = True
            watcher = asyncio.ensure_future(cancel_on_disconnect(request, req, gone))
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""})
                async for piece in stream:
                    if isinstance(piece, Result):
                        finished(piece)
                        if piece.error:
                            err = APIError(500, f"generation failed: {piece.error}", type="server_error")
                            yield "data: " + json.dumps(err.body) + "\n\n"
                        else:
                            yield chunk({} if chat else "", piece.finish_reason)
                            if include_usage:
                                data = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                                        "model": model, "choices": [], "usage": usage(piece)}
                                yield "data: " + json.dumps(data) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    if piece:
                        if first:
                            metrics.ttft.observe(time.perf_counter() - started)
                            first = False
                        yield chunk({"content": piece} if chat else piece)
            finally:
                watcher.cancel()
                req.cancel()  # a no-op when it finished
                gone()  # a no-op when it finished

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from cla2.prompts import build_chat_prompt

        def make_prompt(raw: bytes):
            body = validated(raw, ChatRequest)
            try:
                prompt = build_chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages") from None
            return body, prompt

        body, ids, params = await prepare(request, make_prompt)
        return await respond(request, "chat", ids, params, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        def make_prompt(raw: bytes):
            body = validated(raw, CompletionRequest)
            prompt = body.prompt
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise APIError(400, "prompt must be one string (batches of prompts are not supported)",
                                   param="prompt")
                prompt = prompt[0]
            return body, prompt

        body, ids, params = await prepare(request, make_prompt)
        return await respond(request, "completions", ids, params, body, chat=False)

    if web:
        import gradio as gr

        from cla2.webui import build

        auth = None
        if api_key is not None:
            # With a key the web chat asks for it too (any user name, the key as password).
            auth = lambda user, password: hmac.compare_digest(password.encode(), api_key.encode())  # noqa: E731
        app = gr.mount_gradio_app(app, build(lambda: state.engine, concurrency_limit=web_concurrency),
                                  path="/chat", auth=auth,
                                  auth_message="Password: the server's API key" if auth else None)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@grouped
def main(
    *,
    model: Path,
    adapter: Path | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    where: Placement = Placement(),
    max_batch_size: int | None = None,
    model_name: str | None = None,
    truncate: bool = False,
    decode_graphs: bool | None = None,
    web: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_waiting: int = DEFAULT_MAX_WAITING,
    log_level: str = "info",
) -> None:
    """Serve the model over an OpenAI-compatible API (and a web chat at /chat).

    Endpoints: GET /health, GET /metrics, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.
    The server listens at once and loads the model after; /health answers 503 until it is loaded.

    Args:
        model: Model folder (merged, or the base model when --adapter is given).
        adapter: LoRA adapter folder, merged into the model at load time.
        host: Address to bind. Anything but a loopback address needs an API key.
        port: Port to listen on.
        api_key: Clients must send 'Authorization: Bearer KEY'. Also read from the CLA2_API_KEY variable.
        where: Device kind, devices and dtype (cla2.settings.Placement: --device, --devices, --dtype).
        max_batch_size: Requests decoded together in one batch (default: 8, or fewer when the plan finds room
            for fewer; a number given here stands).
        model_name: Name in /v1/models and the responses (default: the model folder's name).
        truncate: Cut over-long prompts from the left instead of refusing them.
        decode_graphs: Decode a request that runs alone through a static KV cache and a CUDA graph (torch.compile;
            default: on for CUDA only; the first request of each cache size waits while it compiles).
        web: Mount the web chat at /chat (never shared publicly). It answers as many users at once as the
            batch holds (--max-batch-size, 8 without it); the others wait in its queue.
        max_body_bytes: Largest request body accepted; a larger one gets 413.
        max_waiting: Requests that may wait for a batch slot once the batch is full; the next one gets 429
            with Retry-After (0: refuse as soon as the batch is full).
        log_level: uvicorn's log level.
    """
    import uvicorn

    api_key = api_key or os.environ.get("CLA2_API_KEY") or None
    if not is_loopback(host) and api_key is None:
        raise ValueError(f"refusing to listen on {host} without an API key: pass --api-key or set CLA2_API_KEY "
                         "(or bind to 127.0.0.1)")
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model folder {model} does not exist")
    name = model_name or Path(model).resolve().name

    def loader() -> Engine:
        # The plan runs first here, not before the server listens: a model that does not fit (or --devices
        # that do not exist) is reported, with the numbers, by /health and the log, as any failure to load
        # is, rather than by a process that exits before anyone can ask it why.
        placement, replica = plan.for_inference("serve", model, where.device, where.dtype, where.devices, max_batch_size)
        return Engine.from_pretrained(model, adapter=adapter, device=where.device, dtype=where.dtype,
                                      max_batch_size=placement.batch, name=name, truncate=truncate,
                                      decode_graphs=decode_graphs, devices=replica,
                                      layer_groups=[s.layers for s in placement.shares], max_waiting=max_waiting)

    if max_body_bytes < 1 or max_waiting < 0:
        raise ValueError("--max-body-bytes must be at least 1 and --max-waiting at least 0")
    app = create_app(model_name=name, api_key=api_key, web=web, loader=loader, max_body_bytes=max_body_bytes,
                     web_concurrency=max_batch_size or 8)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
