"""Batch-1 decode speed of a 7B-shaped LLaMA through cla2's engine, as % of the memory-bandwidth bound.

Random bf16 weights are created directly on the GPU (no download, no host copy). The bound is
weight bytes / measured device copy bandwidth (a device-to-device copy moves each byte twice: read and
write), i.e. the tokens/s if every decode step did nothing but read every weight once. Printed:

- the copy bandwidth and the bound;
- decode tokens/s of the engine (the code `cla2 serve` runs: continuous-batching loop, sampling,
  incremental detokenization), greedy and with the seed's sampling defaults;
- decode tokens/s of a bare loop over the same forward (transformers' LlamaForCausalLM + DynamicCache,
  argmax), which shows how much of the gap is the engine and how much is the eager forward itself.

Needs CUDA (`--smoke` runs a small model, on the CPU when there is no GPU). Under 4 minutes on an H100:

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
    from cla2.engine import cache_kwarg, output_cache
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
    ap.add_argument("--tokenizer", type=Path, help="a real tokenizer folder (default: a stub)")
    args = ap.parse_args()

    import torch
    from cla2.engine import Engine, SamplingParams
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.smoke:
        args.layers, args.hidden_size, args.intermediate_size, args.heads, args.new_tokens = 2, 256, 688, 4, 32
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
    engine = Engine(model, tokenizer, device, max_batch_size=1, name="7b-shaped")
    engine.eos_ids = set()  # random weights: always decode the full length
    prompt = list(range(100, 100 + args.prompt_tokens))
    try:
        engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=8))  # warm up
        rates = {}
        for label, params in (("greedy", SamplingParams(temperature=0, max_new_tokens=args.new_tokens,
                                                        repetition_penalty=1.0)),
                              ("seed sampling defaults", SamplingParams(max_new_tokens=args.new_tokens, seed=0))):
            r = engine.generate([prompt], params)[0]
            rates[label] = (r.completion_tokens - 1) / (r.elapsed - r.time_to_first_token)
    finally:
        engine.close()
    bare = bare_decode(model, prompt, args.new_tokens, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; model: {args.layers} layers, hidden {args.hidden_size}, vocab {args.vocab_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, {str(dtype).split('.')[-1]}, "
          f"{weight_bytes / 1e9:.2f} GB")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s -> bound {bound:.1f} tokens/s ({1000 / bound:.2f} ms/token)")
    for label, rate in rates.items():
        print(f"engine, {label:22s}: {rate:7.1f} tokens/s = {100 * rate / bound:5.1f}% of the bound")
    print(f"bare forward loop, greedy      : {bare:7.1f} tokens/s = {100 * bare / bound:5.1f}% of the bound")
    print(f"(prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, total {time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
