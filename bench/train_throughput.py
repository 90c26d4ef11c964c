#!/usr/bin/env python3
"""Trained (non-padding) tokens per second: cla2's length-grouped batches against the seed's random ones.

    python bench/train_throughput.py            # 320 samples, a small LLaMA; 3-10 minutes on a 2-core CPU
    python bench/train_throughput.py --smoke    # seconds
    python bench/train_throughput.py --device cuda --samples 2000 --hidden 1024 --layers 8

The data is an Alpaca-like length mix: log-normal lengths (median ~170 tokens with the Alpaca-2 template,
a long tail up to max_seq_length 1024), as random token ids. Both sides train the same LoRA model
(r 8 on the seven projections, AdamW) over one epoch of the same samples, batches of 16:

- seed:  RandomSampler, each batch padded to its longest sample (the seed's run_clm_sft_with_peft.py);
- cla2:  cla2.data.LengthGroupedSampler (what `cla2 finetune --group-by-length`, the default, makes the
         Trainer use) with the same padding collator: batches of similar lengths in random order.

It prints each side's padding fraction and trained tokens/s, and their ratio (target >= 1.5); the full
run exits 1 below the target.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5


def lengths(n: int, seed: int, max_len: int = 1024) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=np.log(170), sigma=0.75, size=n)
    return [int(x) for x in np.clip(raw, 40, max_len)]


def run(name, model, opt, batches, device) -> dict:
    import torch

    tokens = padded = 0
    # one batch first, untimed: allocator and kernels warm
    b = {k: v.to(device) for k, v in batches[0].items()}
    model(**b).loss.backward()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    for batch in batches:
        b = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    return {"name": name, "tokens": tokens, "slots": padded, "pad_fraction": 1 - tokens / padded,
            "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model and 64 samples: seconds")
    ap.add_argument("--samples", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "runtime" / "src"))

    import torch
    from cla2.data import LengthGroupedSampler, PadCollator, TokenizedDataset
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.smoke:
        args.samples, args.hidden, args.layers = 64, 64, 2
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
                          else "cpu")
    torch.manual_seed(args.seed)
    lens = lengths(args.samples, args.seed)
    vocab = 8000
    data = TokenizedDataset([{"input_ids": ids, "labels": ids}
                             for ids in (torch.randint(3, vocab, (n,)).tolist() for n in lens)])
    collate = PadCollator(pad_token_id=0)
    bs = args.batch_size

    g = torch.Generator().manual_seed(args.seed)
    seed_order = torch.randperm(len(data), generator=g).tolist()
    grouped_order = list(LengthGroupedSampler(data.lengths, bs, seed=args.seed))
    assert sorted(grouped_order) == sorted(seed_order)  # the same samples, only batched differently

    def batches(order):
        return [collate([data[i] for i in order[k:k + bs]]) for k in range(0, len(order), bs)]

    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=1024)
    results = []
    for name, order in (("seed: random batches of 16, padded to longest", seed_order),
                        ("cla2: length-grouped batches of 16", grouped_order)):
        torch.manual_seed(args.seed)
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
            r=8, lora_alpha=16, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).to(device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        results.append(run(name, model, opt, batches(order), device))
        del model, opt
    seed_r, ours = results
    print(f"{len(lens)} samples, lengths median {sorted(lens)[len(lens) // 2]}, mean {sum(lens) / len(lens):.0f}, "
          f"max {max(lens)}; LLaMA hidden {args.hidden} x {args.layers} layers + LoRA r 8 on {device.type}")
    for r in results:
        print(f"  {r['name']:<48} padding {r['pad_fraction']:6.1%}  {r['tokens_per_s']:9.0f} trained tokens/s "
              f"({r['seconds']:.1f}s)")
    ratio = ours["tokens_per_s"] / seed_r["tokens_per_s"]
    print(f"ratio cla2 / seed: {ratio:.2f}  (target >= {TARGET})")
    if not args.smoke and ratio < TARGET:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
