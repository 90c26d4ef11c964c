#!/usr/bin/env python3
"""LoRA training throughput and model FLOPs utilisation on one CUDA GPU, with a 7B-shaped LLaMA.

Standalone: needs only torch, transformers and peft (not cla2), so it runs on any lent GPU box:

    python bench/gpu_train.py                      # 7B shape, bf16, LoRA r 64 on the 7 projections
    python bench/gpu_train.py --steps 3 --seq 512  # shorter
    python bench/gpu_train.py --layers 4           # a quick check of the script itself

The model is random (no download) and is initialised on the GPU, in bf16, so start-up takes seconds,
not minutes. The set-up follows cla2 finetune's defaults: LoRA r 64 / alpha 128 on q,k,v,o,gate,up,down,
embed_tokens and lm_head trained in full (--no-modules-to-save leaves them frozen), AdamW, gradient
checkpointing. Every sample is a full --seq tokens (no padding), so tokens/s counts trained tokens.

MFU counts model FLOPs per token as 4 * N_frozen + 6 * N_trainable + 12 * layers * hidden * seq
(frozen weights: forward + input gradient; trainable ones add the weight gradient; attention scores and
values, forward and backward). Recomputation by gradient checkpointing is not counted, as is usual
for MFU. The peak is the card's dense bf16 figure (H100/H200 SXM: 989 TFLOPS) unless --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import time


def peak_tflops(name: str) -> float:
    name = name.upper()
    for key, value in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0),
                       ("L4", 121.0), ("V100", 125.0)):
        if key in name:
            return value
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=55296)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--modules-to-save", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    args = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        raise SystemExit("gpu_train.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    dev = torch.device("cuda")
    t0 = time.time()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(4096, args.seq),
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with dev:  # weights are created (and randomly initialised) on the GPU
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(prev)
    n_params = sum(p.numel() for p in model.parameters())
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      modules_to_save=["embed_tokens", "lm_head"] if args.modules_to_save else None)
    model = get_peft_model(model, lora)
    for prm in model.parameters():  # trainable tensors in fp32, as cla2 finetune does
        if prm.requires_grad:
            prm.data = prm.data.float()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    torch.cuda.synchronize()
    init_s = time.time() - t0

    gen = torch.Generator(device=dev).manual_seed(0)

    def step() -> float:
        ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=dev, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.time() - t1

    tokens = args.batch * args.seq * args.steps
    tps = tokens / elapsed
    flops_per_token = 4 * n_frozen + 6 * n_train + 12 * args.layers * args.hidden * args.seq
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or peak_tflops(name)
    mfu = tps * flops_per_token / (peak * 1e12)
    result = {
        "device": name, "torch": torch.__version__, "params": n_params, "trainable": n_train,
        "layers": args.layers, "hidden": args.hidden, "seq": args.seq, "batch": args.batch, "steps": args.steps,
        "gradient_checkpointing": args.gradient_checkpointing, "modules_to_save": args.modules_to_save,
        "init_s": round(init_s, 1), "step_s": round(elapsed / args.steps, 3), "tokens_per_s": round(tps, 1),
        "model_tflops_per_s": round(tps * flops_per_token / 1e12, 1), "peak_tflops": peak, "mfu": round(mfu, 4),
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1), "last_loss": round(loss, 3),
    }
    print(f"{name}: LoRA r{args.rank} on a {n_params / 1e9:.2f}B-parameter LLaMA ({n_train / 1e6:.0f}M trainable), "
          f"batch {args.batch} x {args.seq} tokens, bf16")
    print(f"  init {init_s:.1f}s, {elapsed / args.steps:.2f}s/step, {tps:,.0f} tokens/s, "
          f"{result['model_tflops_per_s']} model TFLOP/s, MFU {mfu:.1%} of {peak} TFLOPS, "
          f"peak memory {result['max_memory_gib']} GiB")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
