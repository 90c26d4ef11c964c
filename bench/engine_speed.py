"""The engine's decode speed as ratios against a bare transformers loop, both measured in the same run.

Model (issue 15): a random LLaMA with the real 55296-piece vocabulary, hidden 256, 4 layers, fp32, on
the CPU. The reference is the leanest loop a user would write: one forward over the batch, a
DynamicCache, argmax, and each new token decoded to text; the batch's prompts have the same length, so
it needs no attention mask. The engine side is what `cla2 serve` runs: streaming requests
(``Engine.stream``, one consumer thread each), greedy with the server's default repetition penalty
(1.1), incremental detokenisation. Both sides produce every requested token (eos switched off: random
weights) and are timed from submission to the last token, prefill included.

The two sides run interleaved, round after round, so a machine busy with something else slows both
alike; each ratio is total tokens / total seconds of one side over the other's. Printed, with targets:

- one streaming request vs a bare batch-1 loop (200 tokens): target >= 0.9;
- 8 concurrent streaming requests vs a bare batch-8 loop (160 tokens each): target >= 0.7;
- the same 8 requests concurrently vs one after another (64 tokens each): target >= 5;
- the bare batch-8 loop vs the bare batch-1 loop: what batching gives the forward itself on this
  machine, i.e. the ceiling of the line above (which also gains from fewer prefills).

The idle server's CPU use is measured by bench/serve_throughput.py (a real server: uvicorn + engine).

    .venv-runtime/bin/python bench/engine_speed.py            # the issue's model, 3 rounds (~2 minutes)
    .venv-runtime/bin/python bench/engine_speed.py --smoke    # seconds, for `make test`
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime" / "src"))
SHARED = Path(os.environ.get("CLA2_SHARED", REPO.parent / "shared"))
REAL_TOKENIZER = SHARED / "fixtures" / "chinese-llama-2-tokenizer"

PROMPTS = ["请写一段关于第{}个城市的介绍。", "Tell me a story about robot number {}.", "第{}首诗：床前明月光",
           "What is {} plus {}?", "用三句话解释第{}条定律。", "List {} fruits, please.", "你好，我是第{}位用户",
           "Translate '{}' into Chinese."]


def bare_loop(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
    """(tokens, seconds) of a plain greedy loop decoding ``prompts`` (equal lengths) as one batch."""
    import torch
    from cla2.compat import cache_kwarg, output_cache
    from transformers import DynamicCache

    kw = cache_kwarg(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ids = torch.tensor(prompts)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: DynamicCache()})
        texts = [""] * len(prompts)
        for step in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):  # the host needs each token as text, as a server does
                texts[i] += tokenizer.decode([t], skip_special_tokens=True)
            if step + 1 < new_tokens:
                out = model(input_ids=nxt[:, None], use_cache=True, **{kw: output_cache(out)})
    return len(prompts) * new_tokens, time.perf_counter() - t0


def engine_streams(engine, prompts: list[list[int]], new_tokens: int, concurrent: bool) -> tuple[int, float]:
    """(tokens, seconds) of streaming requests, all at once (one consumer thread each) or one after another."""
    from cla2.engine import Result, SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)  # the server's greedy: penalty 1.1
    counts = [0] * len(prompts)

    def consume(i: int) -> None:
        for item in engine.stream(prompts[i], params):
            if isinstance(item, Result):
                if item.error:
                    raise RuntimeError(f"the engine failed: {item.error}")
                counts[i] = item.completion_tokens

    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(prompts)):
            consume(i)
    return sum(counts), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small model, few tokens: seconds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens-1", type=int, default=200, help="new tokens of the batch-1 comparison")
    ap.add_argument("--tokens-batch", type=int, default=160, help="new tokens per request, batched comparison")
    ap.add_argument("--tokens-chat", type=int, default=64, help="new tokens per request, concurrent vs sequential")
    ap.add_argument("--tokenizer", type=Path, default=REAL_TOKENIZER,
                    help="tokenizer folder (default: the real 55296-piece one in ../shared)")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.hidden_size, args.layers = 1, 64, 2
        args.tokens_1, args.tokens_batch, args.tokens_chat = 16, 12, 8
    if not args.tokenizer.is_dir():
        print(f"no tokenizer folder at {args.tokenizer}: pass --tokenizer DIR (or set CLA2_SHARED)", file=sys.stderr)
        return 2

    import torch
    from cla2 import tiny
    from cla2.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        path = tiny.main(Path(tmp) / "model", tokenizer=args.tokenizer, hidden_size=args.hidden_size,
                         layers=args.layers, intermediate_size=args.hidden_size * 8 // 3,
                         heads=max(1, args.hidden_size // 64), shards=1)
        engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", max_batch_size=args.batch, name="bench")
    engine.eos_ids = set()  # random weights: every requested token in both modes
    model, tok = engine.model, engine.tokenizer
    enc = [tok(p.format(i + 3, i + 4) if p.count("{}") == 2 else p.format(i + 3)).input_ids
           for i, p in enumerate(PROMPTS * (args.batch // len(PROMPTS) + 1))][:args.batch]
    length = min(map(len, enc))
    prompts = [ids[:length] for ids in enc]  # equal lengths: the bare batch needs no mask
    cases = {  # name: (reference, engine side, target)
        "1 stream vs bare batch-1 loop": (
            lambda: bare_loop(model, tok, prompts[:1], args.tokens_1),
            lambda: engine_streams(engine, prompts[:1], args.tokens_1, True), 0.9),
        f"{args.batch} concurrent streams vs bare batch-{args.batch} loop": (
            lambda: bare_loop(model, tok, prompts, args.tokens_batch),
            lambda: engine_streams(engine, prompts, args.tokens_batch, True), 0.7),
        f"{args.batch} concurrent vs one after another": (
            lambda: engine_streams(engine, prompts, args.tokens_chat, False),
            lambda: engine_streams(engine, prompts, args.tokens_chat, True), 5.0),
    }
    names = list(cases)
    try:
        for ref, eng, _ in cases.values():  # warm-up: allocator, first-call costs
            ref(), eng()
        totals = {name: [0, 0.0, 0, 0.0] for name in cases}
        engine.max_running = 0
        for r in range(args.rounds):
            for name, (ref, eng, _) in cases.items():
                (rt, rs), (et, es) = ref(), eng()
                t = totals[name]
                t[0], t[1], t[2], t[3] = t[0] + rt, t[1] + rs, t[2] + et, t[3] + es
                print(f"round {r + 1}: {name:44s}: {et / es:7.1f} vs {rt / rs:7.1f} tokens/s = "
                      f"{(et / es) / (rt / rs):.2f}", flush=True)
    finally:
        engine.close()
    print(f"model: hidden {args.hidden_size}, {args.layers} layers, vocab {engine.vocab_size}, fp32, CPU; "
          f"prompts {length} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds, interleaved; largest batch {engine.max_running}")
    for name, (_, _, target) in cases.items():
        rt, rs, et, es = totals[name]
        ratio = (et / es) / (rt / rs)
        print(f"{name:44s}: {et / es:7.1f} vs {rt / rs:7.1f} tokens/s, ratio {ratio:.2f} "
              f"(target >= {target}: {'met' if ratio >= target else 'NOT met'})")
    (r1, s1, *_), (r8, s8, *_) = totals[names[0]], totals[names[1]]
    print(f"bare batch-{args.batch} vs bare batch-1 loop: {(r8 / s8) / (r1 / s1):.2f}x: what batching gives the "
          f"model's forward itself on this machine, the ceiling of '{names[2]}' but for prefill costs")
    if engine.max_running < args.batch:
        print(f"FAIL: the concurrent requests never ran as one batch of {args.batch}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
