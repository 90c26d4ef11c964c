"""Batch-1 decode speed of a 7B-shaped LLaMA through cla2's engine, as % of the memory-bandwidth bound.

Random bf16 weights are created directly on the GPU (no download, no host copy). The bound is
weight bytes / measured device copy bandwidth (a device-to-device copy moves each byte twice: read and
write), i.e. the tokens/s if every decode step did nothing but read every weight once. Printed:

- the copy bandwidth and the bound;
- decode tokens/s of the engine (the code `cla2 serve` runs: continuous-batching loop, sampling,
  incremental detokenization), greedy and with the seed's sampling defaults, on its two paths: eager
  (`decode_graphs=False`: the batched DynamicCache path, one kernel launch per op) and the default on
  CUDA (`decode_graphs=True`: the lone request in a StaticCache, each step a CUDA graph replayed by
  `torch.compile(mode="reduce-overhead")`), timed after a warm-up run that compiles and captures it;
- decode tokens/s of a bare loop over the same eager forward (transformers' LlamaForCausalLM +
  DynamicCache, argmax), which shows how much of the eager gap is the engine and how much the forward;
- checks of the graph path: it ran every step (no fallback), how many CUDA graph skips and graph
  breaks torch reported, and how far its greedy tokens agree with the eager engine's;
- batch 8 (issue 15): 8 concurrent greedy requests through the engine, with its graph path (the 8 rows in
  the StaticCache bucket of 8, each step one replayed CUDA graph) and without it (the batched DynamicCache
  step), against a bare loop decoding the same 8 prompts as one batch over the eager forward: total
  tokens/s and the ratios graphs / bare loop (target >= 0.7) and graphs / graphs off; and whether every
  batched step ran on the graph path.

Needs CUDA (`--smoke` runs a small model, on the CPU when there is no GPU: there the static path runs
uncompiled, so the smoke run checks its plumbing, not its speed). Expected under 4 minutes on an H200,
compile included (the eager runs take the most):

    python bench/gpu_decode.py                 # 7B shape, bf16, 256 new tokens
    python bench/gpu_decode.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime" / "src"))


class StubTokenizer:
    """Decodes ids to CJK characters. The bench measures the model and the engine, not SentencePiece;
    pass --tokenizer DIR to use a real tokenizer folder instead (its decode costs ~20 us a token)."""

    eos_token_id = 2
    bos_token_id = 1

    def decode(self, ids, **kwargs) -> str:
        return "".join(chr(0x4E00 + i % 20000) for i in ids)


def copy_bandwidth(device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - t0
    del src, dst
    return 2 * nbytes * iters / seconds


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_decode(model, prompt_ids, new_tokens: int, device) -> float:
    """tokens/s of a plain greedy loop over the same forward and cache (no engine)."""
    import torch
    from cla2.compat import cache_kwarg, output_cache
    from transformers import DynamicCache

    kw = cache_kwarg(model)
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids], device=device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: DynamicCache()})
        cache, nxt = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, use_cache=True, **{kw: cache})
            cache, nxt = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
            int(nxt)  # the host needs each token (to stream it), as the engine does
        sync(device)
        return (new_tokens - 1) / (time.perf_counter() - t0)


def bare_decode_batch(model, prompts: list[list[int]], new_tokens: int, device) -> float:
    """Total tokens/s of a plain greedy loop decoding equal-length prompts as one batch."""
    import torch
    from cla2.compat import cache_kwarg, output_cache
    from transformers import DynamicCache

    kw = cache_kwarg(model)
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor(prompts, device=device), use_cache=True, logits_to_keep=1,
                    **{kw: DynamicCache()})
        for step in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.tolist()  # the host needs each token, as the engine does
            if step + 1 < new_tokens:
                out = model(input_ids=nxt, use_cache=True, **{kw: output_cache(out)})
        sync(device)
        return len(prompts) * new_tokens / (time.perf_counter() - t0)


def engine_batch_rate(engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Total tokens/s of the prompts submitted at once (greedy, no repetition penalty), prefill included."""
    from cla2.engine import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, repetition_penalty=1.0)
    engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))  # warm-up
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    if any(r.error for r in results):
        raise RuntimeError(f"the engine failed: {next(r.error for r in results if r.error)}")
    return sum(r.completion_tokens for r in results) / seconds


def engine_rates(engine, prompt, new_tokens: int, warmup_tokens: int) -> tuple[dict[str, float], list[int], float]:
    """Decode tokens/s (first token excluded: it is the prefill), greedy and with the seed's sampling
    defaults, after a warm-up run; also the greedy token ids and the warm-up's seconds."""
    from cla2.engine import SamplingParams

    t0 = time.perf_counter()
    engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=warmup_tokens))
    warmup = time.perf_counter() - t0
    rates, greedy = {}, []
    for label, params in (("greedy", SamplingParams(temperature=0, max_new_tokens=new_tokens,
                                                    repetition_penalty=1.0)),
                          ("seed sampling defaults", SamplingParams(max_new_tokens=new_tokens, seed=0))):
        r = engine.generate([prompt], params)[0]
        if r.error:
            raise RuntimeError(f"the engine failed: {r.error}")
        rates[label] = (r.completion_tokens - 1) / (r.elapsed - r.time_to_first_token)
        greedy = greedy or r.token_ids
    return rates, greedy, warmup


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small model, few tokens (CPU if no GPU)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden-size", type=int, default=4096)
    ap.add_argument("--intermediate-size", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab-size", type=int, default=55296)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--eager-new-tokens", type=int, default=128,
                    help="new tokens of the eager runs (slow, and steady after the first few)")
    ap.add_argument("--tokenizer", type=Path, help="a real tokenizer folder (default: a stub)")
    args = ap.parse_args()

    import torch
    from cla2.engine import Engine
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.smoke:
        args.layers, args.hidden_size, args.intermediate_size, args.heads = 2, 256, 688, 4
        args.new_tokens = args.eager_new_tokens = 32
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke:
        device = torch.device("cpu")
    else:
        print("bench/gpu_decode.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device.type == "cpu":
        dtype = torch.float32
    t0 = time.perf_counter()
    bw = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()  # random weights made on the device
    torch.set_default_dtype(default)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = bw / weight_bytes
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = StubTokenizer()
    prompt = list(range(100, 100 + args.prompt_tokens))
    results: dict[str, float] = {}
    if device.type == "cuda" and not args.smoke:
        torch._logging.set_logs(graph_breaks=True, recompiles=True)  # printed as they happen
    static = "graphs" if device.type == "cuda" else "static cache, no graph"
    for path, graphs in (("eager", False), (static, True)):
        engine = Engine(model, tokenizer, device, max_batch_size=1, name="7b-shaped", decode_graphs=graphs)
        engine.eos_ids = set()  # random weights: always decode the full length
        try:
            new = args.new_tokens if graphs else args.eager_new_tokens
            # the graph path's warm-up has the timed runs' length, so it compiles and captures the graph
            # of the same static cache size; the eager one only lets the card raise its clocks
            rates, ids, warmup = engine_rates(engine, prompt, new, new if graphs else 32)
            results.update({f"engine, {path}, {k}": v for k, v in rates.items()})
            if graphs:
                graph_ids, graph_warmup = ids, warmup
                graph_ok = engine.decode_graphs and engine.static_steps >= 3 * (new - 1)
            else:
                eager_ids = ids
        finally:
            engine.close()
    bare = bare_decode(model, prompt, args.eager_new_tokens, device)
    results["bare eager forward loop, greedy"] = bare
    batch = [[100 + 7 * b + i for i in range(args.prompt_tokens)] for b in range(8)]
    batch_rates, batched, batch_graph_ok = {}, 8, False
    for graphs in (False, True):
        engine = Engine(model, tokenizer, device, max_batch_size=8, name="7b-shaped", decode_graphs=graphs)
        engine.eos_ids = set()
        try:
            # the warm-up inside compiles and captures the bucket of 8 at the timed run's cache length
            batch_rates[graphs] = engine_batch_rate(engine, batch, args.eager_new_tokens)
            batched = min(batched, engine.max_running)
            if graphs:  # every decode step, warm-up included, ran on the static path
                batch_graph_ok = engine.decode_graphs and engine.static_steps == engine.steps > 0
        finally:
            engine.close()
    batch_bare = bare_decode_batch(model, batch, args.eager_new_tokens, device)
    try:
        from torch._dynamo.utils import counters

        skips, breaks = counters["inductor"]["cudagraph_skips"], sum(counters["graph_break"].values())
    except Exception:  # noqa: BLE001 - an older torch without these counters
        skips = breaks = -1
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}, transformers {transformers_version()}; model: "
          f"{args.layers} layers, hidden {args.hidden_size}, vocab {args.vocab_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, {str(dtype).split('.')[-1]}, "
          f"{weight_bytes / 1e9:.2f} GB")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s -> bound {bound:.1f} tokens/s ({1000 / bound:.2f} ms/token)")
    for label, rate in results.items():
        print(f"{label:54s}: {rate:8.1f} tokens/s = {100 * rate / bound:5.1f}% of the bound")
    same = next((i for i, (a, b) in enumerate(zip(eager_ids, graph_ids)) if a != b), min(len(eager_ids),
                                                                                       len(graph_ids)))
    compiled = "CUDA graphs" if device.type == "cuda" else "uncompiled on the CPU"
    print(f"graph path ({compiled}): {'ran every step' if graph_ok else 'FELL BACK to eager (see the warning)'}; "
          f"warm-up incl. compile and capture {graph_warmup:.0f}s; cudagraph skips {skips}, graph breaks {breaks}; "
          f"greedy tokens equal to the eager engine's for the first {same} of {len(eager_ids)}")
    batch_graphs, batch_eager = batch_rates[True], batch_rates[False]
    print(f"batch 8 (8 concurrent requests, largest batch {batched}): engine, {static} "
          f"{batch_graphs:.1f} tokens/s ({'every step' if batch_graph_ok else 'FELL BACK to eager'}); "
          f"engine, eager {batch_eager:.1f} tokens/s; bare batch-8 loop {batch_bare:.1f} tokens/s")
    print(f"batch 8 ratios: {static} / bare loop {batch_graphs / batch_bare:.2f} (target >= 0.7); "
          f"{static} / eager engine {batch_graphs / batch_eager:.2f}; eager engine / bare loop "
          f"{batch_eager / batch_bare:.2f}; {batch_graphs / bound:.1f}x the batch-1 bound")
    print(f"(prompt {args.prompt_tokens} tokens; {args.new_tokens} new tokens on the graph path, "
          f"{args.eager_new_tokens} on the eager ones; total {time.perf_counter() - t0:.0f}s)")
    if skips > 0:
        print("cudagraphs were skipped: rerun with TORCH_LOGS=cudagraphs to see why", file=sys.stderr)
    if batched < 8:
        print(f"FAIL: the 8 concurrent requests ran as a batch of {batched} at most", file=sys.stderr)
    return 0 if graph_ok and batch_graph_ok and batched == 8 else 1


def transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    sys.exit(main())
