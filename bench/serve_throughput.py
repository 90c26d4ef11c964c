"""Serving throughput: N concurrent streaming clients vs the same requests one at a time.

Real HTTP: `cla2 serve`'s app (FastAPI + the batching engine) under uvicorn on 127.0.0.1, clients
streaming SSE with httpx. The baseline is what the seed's server does: one request after another.
Printed: total generated tokens/s of each mode and their ratio (target >= 5 with 8 clients, issue 15),
then the CPU the idle server uses (the whole process: uvicorn, the engine's thread, everything) over
--idle-seconds with no request (target < 0.5% of a core over 30 s).

The model is issue 15's: a random LLaMA, hidden 256, 4 layers, fp32, with the real 55296-piece tokenizer
from ../shared when it is there (else a 8000-piece one trained here).

    .venv-runtime/bin/python bench/serve_throughput.py            # full size
    .venv-runtime/bin/python bench/serve_throughput.py --smoke    # seconds, for `make test`
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import resource
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime" / "src"))
SHARED = Path(os.environ.get("CLA2_SHARED", REPO.parent / "shared"))
REAL_TOKENIZER = SHARED / "fixtures" / "chinese-llama-2-tokenizer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_local = threading.local()


def stream_one(url: str, prompt: str, max_tokens: int) -> int:
    """One streaming chat request; returns the completion tokens (from the usage chunk)."""
    import httpx

    if not hasattr(_local, "client"):  # one connection per client thread, as a real client keeps
        _local.client = httpx.Client(timeout=600)
    c = _local.client
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                data = json.loads(line[6:])
                if "error" in data:
                    raise RuntimeError(data["error"]["message"])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
    return tokens


def random_model(folder: Path, hidden_size: int, layers: int, smoke: bool) -> Path:
    """The serving benches' random LLaMA, with the real tokenizer from ../shared when it is there (else a
    trained one: 8000 pieces, 1000 at the smoke size)."""
    from cla2 import tiny

    real = REAL_TOKENIZER if REAL_TOKENIZER.is_dir() else None
    return tiny.main(folder, hidden_size=hidden_size, layers=layers, intermediate_size=hidden_size * 8 // 3,
                     heads=max(1, hidden_size // 64), tokenizer=real, vocab_size=1000 if smoke else 8000, shards=1)


def cpu_seconds() -> float:
    """CPU time of this whole process so far (every thread: the server's, the engine's, the clients')."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens: seconds")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (one at a time, concurrent)")
    ap.add_argument("--model", type=Path, help="use this model folder instead of a random one")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.max_tokens, args.hidden_size, args.layers, args.idle_seconds = 4, 12, 64, 2, 2.0
        args.rounds = 1

    import torch
    import uvicorn
    from cla2.engine import Engine
    from cla2.serve import create_app

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = random_model(Path(tmp) / "model", args.hidden_size, args.layers, args.smoke)
        engine = Engine.from_pretrained(model, max_batch_size=args.clients, name="bench")
        engine.eos_ids = set()  # random weights: generate every requested token in both modes
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(engine, web=False), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        try:
            prompts = [f"请写一段关于第{i}个城市的介绍。" for i in range(args.clients)]
            with cf.ThreadPoolExecutor(args.clients) as ex:  # warm up every client thread's connection
                list(ex.map(lambda p: stream_one(url, p, 2), prompts))
            engine.max_running = 0
            seq_tokens = con_tokens = 0
            seq_s = con_s = 0.0
            for _ in range(args.rounds):  # interleaved: a machine busy with something else slows both alike
                t0 = time.perf_counter()
                with cf.ThreadPoolExecutor(1) as ex:
                    seq_tokens += sum(ex.map(lambda p: stream_one(url, p, args.max_tokens), prompts))
                seq_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                with cf.ThreadPoolExecutor(args.clients) as ex:
                    con_tokens += sum(ex.map(lambda p: stream_one(url, p, args.max_tokens), prompts))
                con_s += time.perf_counter() - t0
            time.sleep(0.5)  # the last responses' tails
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            time.sleep(args.idle_seconds)
            idle = (cpu_seconds() - cpu0) / (time.perf_counter() - t0)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            engine.close()
    expected = args.rounds * args.clients * args.max_tokens
    if seq_tokens != con_tokens or seq_tokens != expected:
        print(f"FAIL: generated {seq_tokens} tokens one at a time, {con_tokens} concurrently, "
              f"expected {expected}", file=sys.stderr)
        return 1
    seq_tps, con_tps = seq_tokens / seq_s, con_tokens / con_s
    print(f"model: hidden {args.hidden_size}, {args.layers} layers, vocab {engine.vocab_size}; {args.clients} requests x {args.max_tokens} tokens, "
          f"{args.rounds} rounds; "
          f"torch threads {torch.get_num_threads()}")
    print(f"one at a time : {seq_tps:8.1f} generated tokens/s ({seq_s:.2f}s)")
    print(f"{args.clients} concurrent  : {con_tps:8.1f} generated tokens/s ({con_s:.2f}s), "
          f"largest batch {engine.max_running}")
    print(f"ratio: {con_tps / seq_tps:.2f}x (target >= 5)")
    print(f"idle server: {100 * idle:.2f}% of a core over {args.idle_seconds:.0f}s (target < 0.5%)")
    if engine.max_running < 2:
        print("FAIL: concurrent requests were never batched together", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
