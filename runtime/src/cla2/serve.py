"""`cla2 serve`: an OpenAI-compatible HTTP API and a web chat over one batching engine.

Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming with SSE or not), and the web
chat at ``/chat``. The server listens first and loads the model after, so ``/health`` tells a monitor
whether the model is loading (503), loaded (200) or failed to load (503 with the cause).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cla2 import plan
from cla2.engine import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    Engine,
    InvalidRequest,
    Result,
    SamplingParams,
)

DEFAULT_PORT = 19327


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

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param,
                                                    "code": code}}


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body, status_code=err.status)


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
               web: bool = True, loader=None) -> FastAPI:
    """The FastAPI app. Pass a ready ``engine``, or a ``loader()`` that returns one: it runs in a thread
    once the server is up, and /health reports its progress."""
    from contextlib import asynccontextmanager

    state = ServerState(engine, model_name)

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
        if state.engine is not None and loader is not None:
            state.engine.close()

    app = FastAPI(title="cla2", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.cla2 = state
    metrics = Metrics(state)
    app.state.metrics = metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/"):
            if api_key is not None:
                auth = request.headers.get("authorization", "")
                given = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(given.encode(), api_key.encode()):
                    metrics.http.labels(path, "401").inc()
                    return _error_response(APIError(
                        401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                        code="invalid_api_key"))
            if state.engine is None:
                metrics.http.labels(path, "503").inc()
                return _error_response(APIError(
                    503, f"the model is not ready ({state.status}{': ' + state.error if state.error else ''})",
                    type="server_error", code="model_not_ready"))
        try:
            response = await call_next(request)
        except APIError as err:
            response = _error_response(err)
        if not path.startswith("/chat"):
            # known routes only as labels: a scan of random URLs must not grow the metric without bound
            label = path if path in ("/health", "/metrics", "/v1/models", "/v1/chat/completions",
                                     "/v1/completions") else "other"
            metrics.http.labels(label, str(response.status_code)).inc()
        return response

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

    async def parse(request: Request, cls: type[_Sampling]) -> _Sampling:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        try:
            body = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(x) for x in first.get("loc", ())) or None
            raise APIError(400, f"invalid request: {param}: {first.get('msg')}", param=param) from None
        if body.model is not None and body.model != state.model_name:
            raise APIError(404, f"the model '{body.model}' does not exist: this server serves "
                                f"'{state.model_name}' (see GET /v1/models)", param="model",
                           code="model_not_found")
        return body

    def open_stream(prompt: str, body: _Sampling):
        try:
            return state.engine.astream(prompt, body.params())
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None

    def usage(r: Result) -> dict:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    async def respond(endpoint: str, prompt: str, body: _Sampling, chat: bool):
        started = time.perf_counter()
        stream = open_stream(prompt, body)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        model = state.model_name

        def finished(result: Result) -> None:
            metrics.done(endpoint, result)

        if not body.stream:
            result: Result | None = None
            first = True
            async for piece in stream:
                if isinstance(piece, Result):
                    result = piece
                elif first and piece:
                    metrics.ttft.observe(time.perf_counter() - started)
                    first = False
            finished(result)
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

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from cla2.prompts import build_chat_prompt

        body = await parse(request, ChatRequest)
        try:
            prompt = build_chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        return await respond("chat", prompt, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be one string (batches of prompts are not supported)",
                               param="prompt")
            prompt = prompt[0]
        return await respond("completions", prompt, body, chat=False)

    if web:
        import gradio as gr

        from cla2.webui import build

        auth = None
        if api_key is not None:
            # With a key the web chat asks for it too (any user name, the key as password).
            auth = lambda user, password: hmac.compare_digest(password.encode(), api_key.encode())  # noqa: E731
        app = gr.mount_gradio_app(app, build(lambda: state.engine), path="/chat", auth=auth,
                                  auth_message="Password: the server's API key" if auth else None)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(
    *,
    model: Path,
    adapter: Path | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    device: str | None = None,
    devices: list[int] | None = None,
    dtype: str | None = None,
    max_batch_size: int | None = None,
    model_name: str | None = None,
    truncate: bool = False,
    decode_graphs: bool | None = None,
    web: bool = True,
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
        device: mlu, cuda or cpu (default: the best available).
        devices: Device indices of this replica, e.g. 0,1: the layers are spread over them (default: the
            plan's first group, as few devices as the model fits on; see `cla2 plan`).
        dtype: fp32, fp16, bf16 or auto.
        max_batch_size: Requests decoded together in one batch (default: 8, or fewer when the plan finds room
            for fewer; a number given here stands).
        model_name: Name in /v1/models and the responses (default: the model folder's name).
        truncate: Cut over-long prompts from the left instead of refusing them.
        decode_graphs: Decode a request that runs alone through a static KV cache and a CUDA graph (torch.compile;
            default: on for CUDA only; the first request of each cache size waits while it compiles).
        web: Mount the web chat at /chat (never shared publicly).
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
        placement, replica = plan.for_inference("serve", model, device, dtype, devices, max_batch_size)
        return Engine.from_pretrained(model, adapter=adapter, device=device, dtype=dtype,
                                      max_batch_size=placement.batch, name=name, truncate=truncate,
                                      decode_graphs=decode_graphs, devices=replica,
                                      layer_groups=[s.layers for s in placement.shares])

    app = create_app(model_name=name, api_key=api_key, web=web, loader=loader)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
