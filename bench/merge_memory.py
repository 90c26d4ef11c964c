#!/usr/bin/env python3
"""Peak memory of `cla2 merge` against loading the whole model and calling peft's merge_and_unload.

    python bench/merge_memory.py            # ~1B-parameter fp16 LLaMA in three shards (~2 GB; a few minutes)
    python bench/merge_memory.py --smoke    # a small model, seconds; prints the ratio

A random LLaMA (config, three safetensors shards, the bundled tokenizer) and a LoRA adapter shaped like
the seed's (r 64 on the seven projections, embed_tokens and lm_head saved in full, fp16) are written to
a temporary folder. Each side then runs in its own subprocess, in the same run, and its peak resident
memory is read from the kernel (wait4's ru_maxrss):

- cla2 merge:  `python -m cla2 merge --adapter A --model B --out O1`
- baseline:    AutoModelForCausalLM.from_pretrained(B, fp16) + PeftModel.from_pretrained(A) +
               merge_and_unload() + save_pretrained(O2) (the seed's way with enough memory)

The full-size run exits 1 when the ratio is above the target (0.35); --smoke only prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.35

BASELINE = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def write_model(folder: Path, layers: int, hidden: int, intermediate: int, heads: int, vocab: int, shards: int) -> int:
    """A random fp16 LLaMA in ``shards`` safetensors files, written one shard at a time."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    names: list[tuple[str, tuple[int, int]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [(p + f"self_attn.{m}.weight", (hidden, hidden)) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [(p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, intermediate)),
                  (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    total = sum(math.prod(s) for _, s in names)
    per_shard = total / shards
    groups: list[list] = [[]]
    acc = 0
    for n, s in names:
        if acc >= per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((n, s))
        acc += math.prod(s)
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        sd = {n: (torch.randn(s, generator=gen) * 0.02).half() if len(s) == 2 else torch.ones(s, dtype=torch.float16)
              for n, s in group}
        save_file(sd, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in sd})
        del sd
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 2},
                                                                     "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
              "torch_dtype": "float16", "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def write_adapter(folder: Path, base: Path, layers: int, hidden: int, intermediate: int, vocab: int, r: int) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    sd = {}
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
              "down_proj": (hidden, intermediate)}
    for i in range(layers):
        for m, (out_f, in_f) in shapes.items():
            kind = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            p = f"base_model.model.model.layers.{i}.{kind}.{m}"
            sd[f"{p}.lora_A.weight"] = (torch.randn((r, in_f), generator=gen) * 0.01).half()
            sd[f"{p}.lora_B.weight"] = (torch.randn((out_f, r), generator=gen) * 0.01).half()
    sd["base_model.model.model.embed_tokens.weight"] = (torch.randn((vocab, hidden), generator=gen) * 0.02).half()
    sd["base_model.model.lm_head.weight"] = (torch.randn((vocab, hidden), generator=gen) * 0.02).half()
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.05,
              "target_modules": list(shapes), "modules_to_save": ["embed_tokens", "lm_head"], "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": str(base)}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def measure(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (peak RSS in MiB, seconds). Fails loudly if the command fails."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO / "runtime" / "src")}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.stderr.write(stderr.decode(errors="replace")[-3000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 1024, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a small model, seconds; only prints the ratio")
    ap.add_argument("--keep", type=Path, default=None, help="write the models here and keep them")
    ap.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "runtime" / "src"))
    if args.smoke:
        shape = {"layers": 4, "hidden": 512, "intermediate": 1376, "heads": 8, "vocab": 8000}
    else:  # ~1.04B parameters: 2.1 GB in fp16, three shards
        shape = {"layers": 16, "hidden": 2048, "intermediate": 5504, "heads": 16, "vocab": 55296}
    if args.write:
        n = write_model(args.write / "base", shards=3, **shape)
        write_adapter(args.write / "adapter", args.write / "base", shape["layers"], shape["hidden"],
                      shape["intermediate"], shape["vocab"], r=64)
        (args.write / "n").write_text(str(n))
        return
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        root = Path(tmp)
        t0 = time.time()
        # Written by a child process: a child's ru_maxrss starts from its parent's resident size at fork,
        # so this process must stay small (no torch) until both measurements are done.
        subprocess.run([sys.executable, __file__, "--write", str(root), *(["--smoke"] if args.smoke else [])],
                       check=True)
        print(f"wrote a {json.loads((root / 'n').read_text()) / 1e9:.2f}B-parameter fp16 LLaMA in 3 shards and "
              f"a r64 adapter in {time.time() - t0:.0f}s")
        ours, ours_s = measure([sys.executable, "-m", "cla2", "merge", "--adapter", str(root / "adapter"),
                                "--model", str(root / "base"), "--out", str(root / "merged-cla2")])
        base, base_s = measure([sys.executable, "-c", BASELINE, str(root / "base"), str(root / "adapter"),
                                str(root / "merged-peft")])
        ratio = ours / base
        print(f"cla2 merge:                        peak RSS {ours:8.0f} MiB  {ours_s:6.1f}s")
        print(f"whole model + merge_and_unload:    peak RSS {base:8.0f} MiB  {base_s:6.1f}s")
        print(f"ratio cla2 / baseline: {ratio:.3f}  (target <= {TARGET} at full size)")
        # same result, checked one tensor at a time
        from safetensors import safe_open

        def tensors(folder: Path):
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(f, "pt") as fh:
                    for k in fh.keys():  # noqa: SIM118
                        yield k, fh.get_tensor(k)

        theirs = {k: f for f in sorted((root / "merged-peft").glob("*.safetensors"))
                  for k in safe_open(f, "pt").keys()}  # noqa: SIM118
        worst = 0.0
        for k, t in tensors(root / "merged-cla2"):
            with safe_open(theirs[k], "pt") as fh:
                worst = max(worst, (t.float() - fh.get_tensor(k).float()).abs().max().item())
        print(f"max abs difference between the two merged models: {worst:.2e}")
    if not args.smoke and ratio > TARGET:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
