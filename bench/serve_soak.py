"""Serving soak: many streaming clients for a long time, some of them hanging up mid-stream (issue 24).

`cla2 serve` runs as its own process, as in production (`python -m cla2 serve ... --device cpu --no-web`),
on a random LLaMA with the real 55296-piece tokenizer from ../shared when it is there. --clients clients
(asyncio + httpx, one keep-alive connection each, as real clients keep) send streaming chat requests one
after another for --seconds; a --disconnect share of them closes its stream after a few chunks, as a user who
closes the tab does. A stream that receives nothing for --stall-timeout seconds counts as stalled. Beside them
a monitor asks GET /health every 0.5 s, first with the server idle (the baseline) and then under the load.

Printed: requests, completed, hung up on purpose, errors by kind (HTTP status, stalled, connection, stream
cut before [DONE], error event); p50/p99 of /health idle and under load and the ratio of the p99s; the
server's RSS after the warm-up, the largest seen and at the end, with the ratio end / start; whether the
engine's queue and batch were empty again (cla2_queue_length and cla2_running_requests in /metrics) once
the clients stopped. It exits 1 on any error or on slots left held, never on a ratio.

    .venv-runtime/bin/python bench/serve_soak.py                     # 30 minutes, 64 clients
    .venv-runtime/bin/python bench/serve_soak.py --seconds 86400     # a day
    .venv-runtime/bin/python bench/serve_soak.py --smoke             # seconds, for `make test`
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_throughput import (  # the same model and ports as the throughput bench
    free_port,
    random_model,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime" / "src"))
PROBE_EVERY = 0.5  # seconds between two /health requests


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Tally:
    def __init__(self) -> None:
        self.requests = self.completed = self.hung_up = self.tokens = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.examples.setdefault(kind, detail[:300])


async def one_request(client, url: str, rng: random.Random, args, tally: Tally) -> None:
    """One streaming chat request, read to its [DONE] or, for a share of them, hung up on after a few chunks."""
    import httpx

    body = {"messages": [{"role": "user", "content": f"请介绍第{rng.randrange(10_000)}个城市的历史和文化。"
                          * rng.randint(1, 4)}],
            "max_tokens": rng.randint(args.min_tokens, args.max_tokens), "temperature": 0.8, "stream": True}
    hang_up_after = rng.randint(1, 4) if rng.random() < args.disconnect else None
    tally.requests += 1
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                tally.error(f"HTTP {r.status_code}", (await r.aread()).decode(errors="replace"))
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    tally.completed += 1
                    return
                data = json.loads(line[6:])
                if "error" in data:
                    tally.error("error event", json.dumps(data["error"]))
                    return
                chunks += 1
                tally.tokens += bool(data["choices"] and data["choices"][0]["delta"].get("content"))
                if hang_up_after is not None and chunks >= hang_up_after:
                    tally.hung_up += 1
                    return  # leaving the block closes the response: the server sees the client go
            tally.error("stream cut before [DONE]", f"after {chunks} chunks")
    except httpx.ReadTimeout:
        tally.error("stalled", f"nothing for {args.stall_timeout:.0f}s after {chunks} chunks")
    except httpx.TransportError as e:
        tally.error("connection", f"{type(e).__name__}: {e}")


async def client_loop(i: int, url: str, deadline: float, args, tally: Tally) -> None:
    import httpx

    rng = random.Random(i)
    timeout = httpx.Timeout(30.0, read=args.stall_timeout)
    async with httpx.AsyncClient(timeout=timeout) as client:
        await asyncio.sleep(rng.random() * 2)  # the clients arrive over two seconds, not in one burst
        while time.monotonic() < deadline:
            await one_request(client, url, rng, args, tally)


async def probe(url: str, until: float, latencies: list[float], tally: Tally) -> None:
    """GET /health every PROBE_EVERY seconds until ``until``; each answer's latency goes to ``latencies``."""
    import httpx

    async with httpx.AsyncClient(timeout=30.0) as client:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            try:
                r = await client.get(url + "/health")
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    tally.error(f"/health HTTP {r.status_code}", r.text)
            except httpx.TransportError as e:
                tally.error("/health connection", f"{type(e).__name__}: {e}")
            await asyncio.sleep(max(0.0, PROBE_EVERY - (time.perf_counter() - t0)))


async def watch(pid: int, until: float, seen: list[float], tally: Tally) -> None:
    """The server's RSS every 5 s into ``seen``, and a progress line every minute (a soak runs for hours)."""
    began = last = time.monotonic()
    while time.monotonic() < until:
        seen.append(rss_mib(pid))
        if time.monotonic() - last >= 60:
            last = time.monotonic()
            print(f"[{last - began:6.0f}s] {tally.requests} requests, {tally.completed} completed, {tally.hung_up} hung up, "
                  f"{sum(tally.errors.values())} errors; server RSS {seen[-1]:.0f} MiB", flush=True)
        await asyncio.sleep(5)


def gauges(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith(("cla2_queue_length", "cla2_running_requests"))}


async def soak(url: str, pid: int, args) -> tuple[Tally, list[float], list[float], list[float]]:
    tally = Tally()
    idle: list[float] = []
    await probe(url, time.monotonic() + args.idle_seconds, idle, tally)
    deadline = time.monotonic() + args.seconds
    loaded: list[float] = []
    rss = [rss_mib(pid)]
    await asyncio.gather(probe(url, deadline, loaded, tally), watch(pid, deadline, rss, tally),
                         *(client_loop(i, url, deadline, args, tally) for i in range(args.clients)))
    return tally, idle, loaded, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="8 clients for 8 seconds on a tiny model")
    ap.add_argument("--seconds", type=float, default=1800.0, help="how long the clients run")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--disconnect", type=float, default=0.1, help="share of requests hung up on mid-stream")
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--stall-timeout", type=float, default=60.0, help="seconds without a byte: a stalled stream")
    ap.add_argument("--idle-seconds", type=float, default=10.0, help="the idle /health baseline's length")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--model", type=Path, help="use this model folder instead of a random one")
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.clients, args.max_tokens, args.idle_seconds = 8.0, 8, 24, 2.0
        args.hidden_size, args.layers, args.max_batch_size = 64, 2, 4

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = random_model(Path(tmp) / "model", args.hidden_size, args.layers, args.smoke)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # every client may wait for a slot: a 429 here would be an error, not the overload it is meant for
        argv = [sys.executable, "-m", "cla2", "serve", "--model", str(model), "--port", str(port), "--device", "cpu",
                "--no-web", "--max-batch-size", str(args.max_batch_size), "--max-waiting", str(args.clients),
                "--log-level", "warning"]
        env = dict(os.environ, PYTHONPATH=str(REPO / "runtime" / "src"))
        server = subprocess.Popen(argv, env=env)
        try:
            import httpx

            t0 = time.monotonic()
            while True:
                if server.poll() is not None:
                    print(f"FAIL: cla2 serve exited {server.returncode} before it was ready", file=sys.stderr)
                    return 1
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() - t0 > 300:
                    print("FAIL: cla2 serve not ready after 300s", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            for _ in range(2):  # warm-up: the first requests' allocations are not a leak
                httpx.post(url + "/v1/chat/completions", timeout=120, json={
                    "messages": [{"role": "user", "content": "你好"}], "max_tokens": args.max_tokens})
            t_start = time.monotonic()
            tally, idle, loaded, rss = asyncio.run(soak(url, server.pid, args))
            elapsed = time.monotonic() - t_start - args.idle_seconds
            rss_end = rss_mib(server.pid)
            left: dict[str, float] = {}
            for _ in range(50):  # the hung-up requests' cancellations reach the engine within a step or two
                left = gauges(url)
                if not any(left.values()):
                    break
                time.sleep(0.2)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

    errors = sum(tally.errors.values())
    print(f"model: hidden {args.hidden_size}, {args.layers} layers; {args.clients} streaming clients for "
          f"{elapsed:.0f}s, batch {args.max_batch_size}, {100 * args.disconnect:.0f}% hung up mid-stream, "
          f"stall timeout {args.stall_timeout:.0f}s")
    print(f"requests: {tally.requests} sent, {tally.completed} completed, {tally.hung_up} hung up on purpose, "
          f"{errors} errors ({tally.requests / elapsed:.1f} requests/s, {tally.tokens / elapsed:.0f} streamed chunks/s)")
    for kind, n in tally.errors.most_common():
        print(f"  error {kind}: {n} (e.g. {tally.examples[kind]})")
    p99_idle, p99_load = percentile(idle, 0.99), percentile(loaded, 0.99)
    print(f"/health idle      : p50 {1000 * percentile(idle, 0.5):7.1f} ms, p99 {1000 * p99_idle:7.1f} ms "
          f"({len(idle)} probes)")
    print(f"/health under load: p50 {1000 * percentile(loaded, 0.5):7.1f} ms, p99 {1000 * p99_load:7.1f} ms "
          f"({len(loaded)} probes); ratio of the p99s {p99_load / p99_idle:.1f}x")
    print(f"server RSS: {rss[0]:.0f} MiB after the warm-up, {max(rss):.0f} MiB at most, {rss_end:.0f} MiB at the "
          f"end; ratio end / start {rss_end / rss[0]:.3f}")
    quarters = [rss[min(len(rss) - 1, len(rss) * k // 4)] for k in (1, 2, 3)] + [rss_end]
    print("server RSS at each quarter of the run: " + ", ".join(f"{q:.0f}" for q in quarters) + " MiB "
          "(flat once the allocator's arenas are warm; a leak keeps growing)")
    print("after the clients stopped: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(left.items())))
    failed = False
    if errors:
        print(f"FAIL: {errors} request(s) failed", file=sys.stderr)
        failed = True
    if any(left.values()):
        print(f"FAIL: the engine still holds requests once every client is gone: {left}", file=sys.stderr)
        failed = True
    if tally.completed == 0:
        print("FAIL: no request completed", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
