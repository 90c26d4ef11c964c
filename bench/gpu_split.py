#!/usr/bin/env python3
"""A replica split over two real devices (a CUDA GPU and the CPU), and the plan's estimate on the GPU.

    python bench/gpu_split.py      # needs a CUDA GPU; about a minute

The CPU tests split a replica over devices that are all the CPU; this is the one check where the layers,
and their KV caches, really sit on two devices and the hidden states cross between them:

1. A random LLaMA (fp16 on the GPU side, the real shape's vocabulary 55296) is loaded once on cuda:0
   alone and once with its layers split cuda:0 | cpu (``cla2.loading._load_split``, as ``--devices``
   does). The split engine's outputs (8 concurrent requests, greedy and seeded, and the eval scorer's
   letters) must equal the single-device ones token for token; each layer's KV cache must be on its
   layer's device. The CPU half runs in fp32 there (CPU fp16 matmuls are slow), so the split run uses
   fp32 on both sides for the equality check.
2. The plan's estimate for one GPU replica (weights + KV cache at the batch and context used + the
   prefill's activations) against torch.cuda.max_memory_allocated for the same run: the ratio should be
   within 0.75 .. 1.25.

Exits 1 when an output differs, a cache sits on the wrong device, or the ratio is outside the target.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch


def main() -> int:
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_split.py needs a CUDA GPU")
    from cla2 import plan, tiny
    from cla2.engine import Engine, SamplingParams
    from cla2.loading import _load_split, load_model
    from transformers import AutoModelForCausalLM

    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny.main(Path(tmp) / "m", layers=8, hidden_size=512, heads=8, intermediate_size=1376,
                          max_position_embeddings=1024, vocab_size=1000, shards=2)
        prompts = ["你好", "从前有座山", "a b c d", "测试" * 30, "hello world", "龘龘", "[INST] 写诗 [/INST]", "很长" * 60]
        gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
        groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

        # 1. split cuda:0 | cpu against cuda:0 alone, fp32 on both
        net = _load_split(AutoModelForCausalLM, model, torch.float32, [gpu, cpu], groups)
        split = Engine(net, load_model(model, device="cpu")[1], gpu, max_batch_size=8, decode_graphs=False)
        single_net, tok, _ = load_model(model, device="cuda", dtype="fp32")
        single = Engine(single_net, tok, gpu, max_batch_size=8, decode_graphs=False)
        for params in (SamplingParams(temperature=0, max_new_tokens=64), SamplingParams(max_new_tokens=64, seed=3)):
            a = split.generate(prompts, params)
            b = single.generate(prompts, params)
            same = [x.token_ids == y.token_ids for x, y in zip(a, b, strict=True)]
            print(f"split cuda:0|cpu vs cuda:0, {'greedy' if params.temperature == 0 else 'seeded'}: "
                  f"{sum(same)}/{len(same)} outputs equal; split batch reached {split.max_running}")
            if not all(same):
                failures.append("split outputs differ")
        q = split.stream("从前有座山", SamplingParams(temperature=0, max_new_tokens=8))
        next(q)
        layer_devices = [k.device.type for k, *_ in split._cache] if split._cache is not None else []
        for _ in q:
            pass
        want = ["cuda"] * 4 + ["cpu"] * 4
        print(f"KV cache devices per layer: {layer_devices}")
        if layer_devices and layer_devices != want:
            failures.append(f"KV cache on {layer_devices}, expected {want}")
        split.close()
        single.close()
        del net, single_net

        # 2. the plan's estimate against the allocator's peak, one fp16 replica on the GPU
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        engine = Engine.from_pretrained(model, device="cuda", dtype="fp16", max_batch_size=8, decode_graphs=False)
        engine.eos_ids = set()
        engine.generate([[1] + [5] * 511] * 8, SamplingParams(temperature=0, max_new_tokens=511))
        measured = torch.cuda.max_memory_allocated() - base
        engine.close()
        est = plan.plan_inference("generate", plan.read_shape(model), plan.Devices("cpu", (10**12,)), 2, "fp16",
                                  batch=8, context=1024).bytes_per_device  # kind cpu: no runtime reserve counted
        ratio = est / measured
        print(f"plan estimate {est / 2**20:.1f} MiB, max_memory_allocated {measured / 2**20:.1f} MiB, ratio {ratio:.2f}")
        if not 0.75 <= ratio <= 1.25:
            failures.append(f"estimate ratio {ratio:.2f} outside 0.75..1.25")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
