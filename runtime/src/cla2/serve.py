"""`cla2 serve`: an OpenAI-compatible HTTP API and a web chat over one batching engine.

Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming with SSE or not), and the web
chat at ``/chat``. The server listens first and loads the model after, so ``/health`` tells a monitor
whether the model is loading (503), loaded (200) or failed to load (503 with the cause).

Hardening (see docs/failure-modes.md, "Server"): bodies are capped (413), POSTs must be JSON (415), any
invalid value is an OpenAI-style 400 (a lone surrogate in a string too), the JSON is parsed and the prompt
tokenised in worker threads (the event loop, and so /health, never waits on them), a full waiting queue
answers 429 with Retry-After, a client that goes away cancels its request (streaming or not; a queued one
leaves the queue at once), a client that goes away while it sends its body is a 499 (no traceback, no
5xx), SSE event lines hold no line separator, and metric labels come from an allow-list.

Where each part lives: this module builds the app (``create_app``: the state, the guard middleware that
refuses before any handler runs and counts every response, /health, /metrics, the web chat's mount) and
runs it (``main``); :mod:`cla2.api` holds the OpenAI request and response shapes and the /v1 route
handlers, which get the server's state as a FastAPI dependency; :mod:`cla2.loading` loads the model.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from cla2 import plan
from cla2.api import APIError, ServerState, State, error_response, router
from cla2.engine import Engine, Result
from cla2.settings import Placement, grouped

DEFAULT_PORT = 19327
# Request bodies above this are refused with 413 before they are read. text-generation-inference's router
# has the same guard (`--payload-limit`, 2 MB by default); 2 MB holds a 4096-token prompt many times over.
DEFAULT_MAX_BODY_BYTES = 2_000_000
# Requests that may wait for a batch slot; the next one gets 429 + Retry-After (TGI's router refuses
# requests over `--max-concurrent-requests`, 128 by default, "instead of having them wait for too long",
# with 429 "Model is overloaded"; the OpenAI client retries a 429 after the Retry-After it is given).
DEFAULT_MAX_WAITING = 64
# The only values of the `path` label of cla2_http_requests_total (a fixed set, as Prometheus' advice on
# label cardinality asks, and as vLLM / TGI label by route template, never by raw URL); anything else
# is "other", and the web chat's many asset paths are not counted.
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
# uvicorn's own logger: its lines go where the server's go, at the level given by --log-level.
log = logging.getLogger("uvicorn.error")


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


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


# ---- the guard: what is refused before any handler runs, and the HTTP counter ------------------------

def needs_key(path: str) -> bool:
    """Whether a request to ``path`` must carry the API key (when the server has one). Everything does but
    /health, which load balancers, HAProxy's check and k8s probes call without credentials (it tells whether
    the model is loaded, nothing more), and the web chat, whose gradio login asks for the key itself. So
    /metrics (Prometheus sends the key with its scrape config's `authorization`), /openapi.json and any
    unknown path are refused without it: a 401, not a 404 that would map the routes for a stranger."""
    return not (path == "/health" or path == "/chat" or path.startswith("/chat/"))


def refusal(scope, state: ServerState, api_key: str | None, max_body_bytes: int) -> APIError | None:
    """Why the request is refused before any handler runs, or None."""
    path, method = scope["path"], scope["method"]
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
    api = path.startswith("/v1/")
    if api_key is not None and needs_key(path):
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

    def __init__(self, app, state: ServerState, api_key: str | None, max_body_bytes: int):
        self.app, self.state, self.api_key, self.max_body_bytes = app, state, api_key, max_body_bytes

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
            err = refusal(scope, self.state, self.api_key, self.max_body_bytes)
            if err is not None:
                await error_response(err)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            if not path.startswith("/chat"):
                self.state.metrics.http.labels(route_label(path), str(status[0])).inc()


# ---- errors any route may raise, as OpenAI-shaped bodies ---------------------------------------------

async def _api_error(request: Request, err: APIError):
    return error_response(err)


async def _not_found(request: Request, exc):
    return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))


async def _not_allowed(request: Request, exc):
    return error_response(APIError(405, f"method {request.method} not allowed on {request.url.path}",
                                   code="method_not_allowed"))


async def _client_gone(request: Request, exc: ClientDisconnect):
    # The client closed the connection before it had sent its whole body (starlette raises this from the
    # body read): no server error, so no traceback and no 5xx. 499 is nginx's "client closed request"
    # (what a client gone during a generation gets too): the HTTP counter records it; nobody reads it. One
    # short line, with the allow-listed route (the raw path is the client's to choose).
    client = f" {request.client.host}:{request.client.port}" if request.client else ""
    log.info("%s %s: the client%s closed the connection before sending its whole body", request.method,
             route_label(request.url.path), client)
    return Response(status_code=499)


async def _internal(request: Request, exc: Exception):
    # Whatever slipped through is still an OpenAI-shaped answer (the traceback goes to the log).
    return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                   type="server_error", code="internal_error"))


# ---- the operator's routes: /health (a monitor's, and HAProxy's check) and /metrics (Prometheus) -----

ops = APIRouter()


@ops.get("/health")
async def health(state: State):
    if state.status == "ok":
        return {"status": "ok", "model": state.model_name}
    body = {"status": state.status}
    if state.error:
        body["error"] = state.error
    return JSONResponse(body, status_code=503)


@ops.get("/metrics")
async def prometheus(state: State):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---- the app -----------------------------------------------------------------------------------------

def create_app(engine: Engine | None = None, model_name: str | None = None, api_key: str | None = None,
               web: bool = True, loader=None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               web_concurrency: int = 8) -> FastAPI:
    """The FastAPI app. Pass a ready ``engine``, or a ``loader()`` that returns one: it runs in a thread
    once the server is up, and /health reports its progress. ``max_body_bytes``: larger bodies get 413.
    ``web_concurrency``: web chat answers generated at once (the others wait in gradio's queue).

    The OpenAI routes are :mod:`cla2.api`'s; they get the state built here as a dependency."""
    from contextlib import asynccontextmanager

    # JSON parsing, validation, the chat template and tokenisation run in this pool, off the event loop
    # (vLLM's OpenAI server tokenises in a ThreadPoolExecutor, `_tokenizer_executor`, for the same reason):
    # a 2 MB prompt takes seconds to tokenise, and /health must answer meanwhile. Two workers, as TGI's
    # router has two tokenizer workers for validation by default (`--validation-workers 2`): a flood of
    # large bodies cannot take every core from the decode thread.
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cla2-prepare")
    state = ServerState(engine, model_name, max_body_bytes=max_body_bytes, pool=pool)
    state.metrics = metrics = Metrics(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if loader is not None and state.engine is None:
            threading.Thread(target=_load, args=(state, loader), name="cla2-load", daemon=True).start()
        yield
        pool.shutdown(wait=False, cancel_futures=True)
        if state.engine is not None and loader is not None:
            state.engine.close()

    app = FastAPI(title="cla2", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.cla2 = state
    app.state.metrics = metrics
    app.add_middleware(Guard, state=state, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(404, _not_found)
    app.add_exception_handler(405, _not_allowed)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal)

    app.include_router(ops)
    app.include_router(router)

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


def _load(state: ServerState, loader) -> None:
    """The loader's engine into ``state`` (in a thread once the server is up); a failure is /health's."""
    try:
        state.engine = loader()
        state.status = "ok"
    except Exception as exc:  # noqa: BLE001 - reported through /health
        state.status, state.error = "error", f"{type(exc).__name__}: {exc}"


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
        decode_graphs: Decode through static KV caches (a batch padded to 1, 2, 4, 8... rows) and CUDA graphs
            (torch.compile; default: on for CUDA only; the first step of each batch and cache size waits while it
            compiles).
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
