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
5xx), SSE event lines hold no line separator, and metric labels come from an allow-list. Each connection
is bounded (``Limits``, ``bounded_protocol``): the time its request head and body take to arrive (408), its
idle time, their number (idle ones give way to new clients), and with a key every route but /health needs it.

Where each part lives: this module builds the app (``create_app``: the state, the guard middleware that
refuses before any handler runs and counts every response, /health, /metrics, the web chat's mount) and
runs it (``main``); :mod:`cla2.api` holds the OpenAI request and response shapes and the /v1 route
handlers, which get the server's state as a FastAPI dependency; :mod:`cla2.loading` loads the model.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
# Connection limits (see ``Limits``). A request head (its request line and headers) must arrive within
# this, as HAProxy's `timeout http-request` (30 s in the role) and nginx's `client_header_timeout` (60 s)
# ask; a request's body within DEFAULT_BODY_TIMEOUT of its head (2 MB at 70 kB/s).
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
# uvicorn's own default for an idle keep-alive connection
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0
# Connections open at once (fewer when the open-files limit leaves no room for them: see connection_limit)
DEFAULT_MAX_CONNECTIONS = 1024
# Open files kept free of connections: the model's files, the log, the loader, gradio's, the pool's.
FILES_KEPT = 64
# uvicorn's listen backlog, which asyncio also takes as the number of connections it accepts in one turn of
# the loop, before any of them is seen by the protocol (and so by the connection limit): at most this many
# (uvicorn's default), fewer when open files are scarce (see connection_limit).
DEFAULT_BACKLOG = 2048
# h11's own default for a request head
DEFAULT_MAX_HEADER_BYTES = 16384
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


def body_timeout_error(seconds: float) -> APIError:
    return APIError(408, f"the request body was not complete within {seconds:g} s of its headers "
                         "(cla2 serve --body-timeout): send it at once", code="request_timeout",
                    headers={"Connection": "close"})


def deadline_receive(receive, seconds: float):
    """``receive`` with a deadline for the request's body: ``seconds`` from now (the request head has just
    arrived), a handler still waiting for the rest of the body gets a 408 (and the connection is closed).
    uvicorn has no such timeout (only one for idle keep-alive connections); a body that is never read
    (the request was refused, or the route has none) is the connection's, closed by BoundedH11Protocol."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    complete = False

    async def timed():
        nonlocal complete
        if complete:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise body_timeout_error(seconds) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            complete = True
        return message

    return timed


class Guard:
    """Pure ASGI (no BaseHTTPMiddleware: it would stand between a handler and the client's disconnect):
    refuses what ``refusal`` says, bounds the time a body takes to arrive, and counts every response under
    an allow-listed path label."""

    def __init__(self, app, state: ServerState, api_key: str | None, max_body_bytes: int,
                 body_timeout: float | None = None):
        self.app, self.state, self.api_key, self.max_body_bytes = app, state, api_key, max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.body_timeout is not None:
            receive = deadline_receive(receive, self.body_timeout)
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
               web_concurrency: int = 8, body_timeout: float | None = DEFAULT_BODY_TIMEOUT) -> FastAPI:
    """The FastAPI app. Pass a ready ``engine``, or a ``loader()`` that returns one: it runs in a thread
    once the server is up, and /health reports its progress. ``max_body_bytes``: larger bodies get 413.
    ``web_concurrency``: web chat answers generated at once (the others wait in gradio's queue).
    ``body_timeout``: a handler still waiting for its body this long after the request began gets 408
    (None: no limit); the other connection limits are the server's (``uvicorn_config``).

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
    app.add_middleware(Guard, state=state, api_key=api_key, max_body_bytes=max_body_bytes,
                       body_timeout=body_timeout)
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


# ---- the connections: what uvicorn bounds, and what it does not ------------------------------------------

@dataclass(frozen=True)
class Limits:
    """How long and how many: see ``cla2 serve --help`` (each field is the flag of the same name)."""
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    backlog: int = DEFAULT_BACKLOG


def _timeout_answer(what: str, seconds: float, flag: str) -> bytes:
    body = json.dumps(APIError(408, f"the request {what} was not complete within {seconds:g} s "
                                    f"(cla2 serve {flag})", code="request_timeout").body).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def bounded_protocol(limits: Limits):
    """uvicorn's h11 protocol with what uvicorn leaves open. uvicorn bounds an idle keep-alive connection
    (``timeout_keep_alive``), the size of a request head (``h11_max_incomplete_event_size``) and the
    connections plus requests at once (``limit_concurrency``, then 503), but not the time a request head
    or body takes to arrive: a connection that sends half a head (or nothing), or a byte a second, is held
    for ever, and any byte it sends cancels the keep-alive timer. And ``limit_concurrency`` counts such
    connections too, so they would make every new client's request (/health's too) a 503. So:

    - a request head must be complete within ``header_timeout`` of the connection's opening or of its first
      byte after a keep-alive wait, else 408 (or, when it sent nothing, the connection is closed);
    - a body not complete within ``body_timeout`` of its head: the Guard answers 408 while a handler waits
      for it (``deadline_receive``); here the connection is closed when it is still coming after the
      response (a refused request, a route that reads no body) or when no response came in the grace;
    - at ``max_connections`` open, a new connection closes the oldest one that has no request in flight
      (half-open, or idle between requests), so idle connections cannot starve new clients (nginx reuses
      its idle keep-alive connections the same way when worker_connections run out); only when every
      connection has a request in flight does the new one get uvicorn's 503.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    grace = max(limits.body_timeout, 1.0)
    warned = [0.0]

    class BoundedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._timer: asyncio.TimerHandle | None = None
            self._phase: str | None = None  # "head" or "body": what the timer waits for
            self._grace_used = False
            self._opened = time.monotonic()

        # -- the timer
        def _arm(self, phase: str, seconds: float, callback) -> None:
            self._disarm()
            self._phase, self._timer = phase, self.loop.call_later(seconds, callback)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, None

        def _track(self) -> None:
            """After h11 has read what arrived: the timer for what the connection waits for now."""
            if self.transport.is_closing() or self.transport.get_protocol() is not self:  # gone, or a websocket
                self._disarm()
                return
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                if self._phase != "body":
                    self._grace_used = False
                    self._arm("body", limits.body_timeout, self._body_late)
            elif state is not h11.IDLE:  # the request is in (or the connection ends)
                self._disarm()

        # -- uvicorn's protocol, with the timer
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._make_room()
            self._arm("head", limits.header_timeout, self._head_late)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE and self._phase != "head":
                self._arm("head", limits.header_timeout, self._head_late)  # the first byte after keep-alive
            super().data_received(data)
            self._track()

        def on_response_complete(self) -> None:
            # Answered before its body was all there (a refusal, a route that reads none), the body timer
            # stays: the rest may come until the body's deadline, then the connection closes.
            super().on_response_complete()
            self._track()

        # -- what the timer does
        def _head_late(self) -> None:
            self._timer = self._phase = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # half a head
                self.transport.write(_timeout_answer("head", limits.header_timeout, "--header-timeout"))
            log.debug("closed a connection whose request head was not complete within %g s (--header-timeout)",
                      limits.header_timeout)
            self.transport.close()

        def _body_late(self) -> None:
            self._timer = self._phase = None
            if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_started and not self._grace_used:
                # a handler reading the body answers 408 itself (deadline_receive): give it the time to
                self._grace_used = True
                self._phase, self._timer = "body", self.loop.call_later(grace, self._body_late)
                return
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                cycle.keep_alive = False  # close once the response is out
                return
            self.transport.close()

        # -- the connection limit
        def _idle(self) -> bool:
            return ((self.cycle is None or self.cycle.response_complete) and self.conn.their_state is h11.IDLE
                    and not self.transport.is_closing())

        def _make_room(self) -> None:
            while len(self.connections) > limits.max_connections:
                idle = [c for c in self.connections
                        if c is not self and isinstance(c, BoundedH11Protocol) and c._idle()]
                if not idle:
                    return  # every other connection has a request in flight: this one's gets uvicorn's 503
                oldest = min(idle, key=lambda c: c._opened)
                self.connections.discard(oldest)
                oldest._disarm()
                oldest.transport.close()
                now = time.monotonic()
                if now - warned[0] > 60:
                    warned[0] = now
                    log.warning("%d connections open (cla2 serve --max-connections): closing the oldest idle "
                                "ones as new ones come (once a minute at most)", limits.max_connections)

    return BoundedH11Protocol


def connection_limit(requested: int | None) -> tuple[int, int]:
    """``--max-connections`` and the listen backlog, so that the open files never run out. asyncio accepts
    up to ``backlog`` connections in one turn of the loop before the protocol sees them, and when accept()
    fails with "Too many open files" it goes on trying the rest of that turn and schedules one retry per
    try (CPython 3.11's selector_events._accept_connection), each logging a traceback: a server that once
    runs out of files drowns in its own retries and never serves /health again. So connections, up to four
    turns of accepts and FILES_KEPT other files must fit in the open-files limit. The soft limit is raised
    toward the hard one first (as Go's runtime does at start since 1.19); a limit given that still does not
    fit is an error, the default shrinks to fit."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return requested or DEFAULT_MAX_CONNECTIONS, DEFAULT_BACKLOG
    want = (requested or DEFAULT_MAX_CONNECTIONS) + FILES_KEPT + 4 * DEFAULT_BACKLOG
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    files = want if soft == resource.RLIM_INFINITY else soft
    backlog = max(8, min(DEFAULT_BACKLOG, (files - FILES_KEPT) // 8))
    room = files - FILES_KEPT - 4 * backlog
    if requested is not None:
        if requested > room:
            raise ValueError(f"--max-connections {requested} needs about {requested + FILES_KEPT + 4 * backlog} "
                             f"open files, and this process may open {soft} (ulimit -n; hard limit {hard}): raise "
                             f"the limit (systemd: LimitNOFILE=) or lower --max-connections to {max(room, 1)}")
        return requested, backlog
    if room < 8:
        raise ValueError(f"this process may open {soft} files (ulimit -n), too few to serve: raise the limit "
                         f"to at least 256")
    return min(DEFAULT_MAX_CONNECTIONS, room), backlog


def uvicorn_config(app, host: str, port: int, limits: Limits = Limits(), log_level: str = "info"):
    """uvicorn's Config for ``app`` with ``limits``: uvicorn's own settings where it has one, the protocol
    above for the rest (h11: the only HTTP/1.1 parser in the kit's locks)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=bounded_protocol(limits),
                          timeout_keep_alive=limits.keep_alive_timeout,
                          # one over: _make_room keeps at most max_connections open, so uvicorn's 503 comes
                          # only when each of them has a request in flight
                          limit_concurrency=limits.max_connections + 1,
                          h11_max_incomplete_event_size=limits.max_header_bytes, backlog=limits.backlog)


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
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
    max_connections: int | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
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
        header_timeout: Seconds a request's head (request line and headers) may take to arrive, from the
            connection's opening or its first byte after a keep-alive wait; then 408 and the connection closes.
        body_timeout: Seconds a request's body may take to arrive after its head; then 408 and the connection
            closes.
        keep_alive_timeout: Seconds an idle connection is kept open between requests.
        max_connections: Connections open at once (default: 1024, or fewer when the open-files limit, ulimit
            -n, leaves less room). A new one closes the oldest idle or half-open one; when every one has a
            request in flight, the new one gets 503.
        max_header_bytes: Largest request head (request line and headers); a larger one gets 400.
        log_level: uvicorn's log level.
    """

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
    if min(header_timeout, body_timeout, keep_alive_timeout) <= 0 or max_header_bytes < 1024:
        raise ValueError("--header-timeout, --body-timeout and --keep-alive-timeout must be above 0 and "
                         "--max-header-bytes at least 1024")
    if max_connections is not None and max_connections < 1:
        raise ValueError("--max-connections must be at least 1")
    connections, backlog = connection_limit(max_connections)
    limits = Limits(header_timeout=header_timeout, body_timeout=body_timeout, keep_alive_timeout=keep_alive_timeout,
                    max_connections=connections, max_header_bytes=max_header_bytes, backlog=backlog)
    app = create_app(model_name=name, api_key=api_key, web=web, loader=loader, max_body_bytes=max_body_bytes,
                     web_concurrency=max_batch_size or 8, body_timeout=body_timeout)
    import uvicorn

    uvicorn.Server(uvicorn_config(app, host, port, limits, log_level)).run()
