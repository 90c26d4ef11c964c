#!/usr/bin/env python3
"""The placement plan's memory estimate (`cla2 plan`) against the measured peak of the jobs it plans.

    python bench/plan_memory.py            # a ~100M-parameter fp32 LLaMA on the CPU (a few minutes)
    python bench/plan_memory.py --smoke    # a small model, seconds; prints the ratios

A random LLaMA is written with `cla2 tiny` (trained 1000-piece tokenizer). Each case runs in its own
subprocess, in the same run: it imports everything and loads the tokenizer, reads its resident memory
(VmRSS), runs the job, and reads its peak resident memory (VmHWM). The job's measured memory is the
difference; the plan's estimate is ``bytes_per_device`` for the same job, batch and context (on the CPU
the plan counts no runtime reserve: the imports are the reserve there, and are subtracted here).

- generate: the engine decodes ``batch`` requests together until each reaches the model's window (the
  KV cache the plan budgets for), with prompts joining a running batch.
- finetune: `cla2 finetune` for a few steps at a fixed micro-batch and sequence length, no DeepSpeed.
- finetune-data: `cla2 finetune` on data of mixed lengths (most short, the longest half the context),
  grouped by length so that the longest batch runs first; the estimate is the plan the job made itself from
  its data (run.json's ``plan``: each micro-batch budgeted at the data's longest example).

On a GPU the same comparison reads torch.cuda.max_memory_allocated (bench/gpu_split.py). The target is
within 25% (ratio estimate / measured in 0.75 .. 1.25); the full-size run exits 1 outside it, --smoke
only prints.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = (0.75, 1.25)

CHILD = r"""
import json, sys, random
from pathlib import Path

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
case, model, batch, context, work = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
import torch
torch.set_num_threads(2)
from transformers import AutoTokenizer
from cla2 import plan
from cla2.engine import Engine, SamplingParams
import cla2.finetune, cla2.training, peft, transformers  # noqa: F401  (what the jobs import)
tok = AutoTokenizer.from_pretrained(str(model))
shape = plan.read_shape(model)
before = rss("VmRSS")
if case == "generate":
    p = plan.plan_inference("generate", shape, plan.Devices("cpu", (64 * 1024**3,)), 4, "fp32", batch=batch,
                            context=context)
    engine = Engine.from_pretrained(model, device="cpu", dtype="fp32", max_batch_size=batch)
    rng = random.Random(0)
    half = context // 2
    prompts = [[1] + [rng.randrange(3, shape.vocab) for _ in range(half - 1)] for _ in range(batch)]
    engine.eos_ids = set()  # decode to the window: the cache the plan budgets for
    engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=context - half - 1))
    engine.close()
    estimate = p.bytes_per_device
elif case == "finetune-data":
    data = work / "sft.jsonl"
    rng = random.Random(0)
    words = "的 一 是 在 不 了 有 和 人 这 中 大 为 上 个 国 我 以 要 他".split()
    with data.open("w") as f:
        for i in range(4 * batch):  # one example of `context` words (about the context once tokenized), the rest short
            n = context if i == 0 else rng.randint(context // 16, context // 4)
            f.write(json.dumps({"instruction": "写", "output": "".join(rng.choice(words) for _ in range(n))},
                               ensure_ascii=False) + "\n")
    run = cla2.finetune.main(model=model, data=data, out=work / "out", max_steps=3, batch_size=batch,
                             gradient_accumulation_steps=1, max_seq_length=2 * context, deepspeed="none",
                             gradient_checkpointing=False, save_steps=1000, logging_steps=1, device="cpu",
                             dtype="fp32", group_by_length=True)
    p = plan.TrainingPlan(**{k: v for k, v in run["plan"].items() if k != "deepspeed"})
    estimate = p.bytes_per_device
else:
    p = plan.plan_training("finetune", shape, 64 * 1024**3, 1, 4, "fp32", "cpu", seq_len=context, batch=batch,
                           zero_stage=0, gradient_checkpointing=False)
    data = work / "sft.jsonl"
    rng = random.Random(0)
    words = "的 一 是 在 不 了 有 和 人 这 中 大 为 上 个 国 我 以 要 他".split()
    with data.open("w") as f:
        for _ in range(4 * batch):
            # longer than --max-seq-length once templated: every example is cut to exactly `context` tokens
            f.write(json.dumps({"instruction": "".join(rng.choice(words) for _ in range(context // 4)),
                                "output": "".join(rng.choice(words) for _ in range(context))}, ensure_ascii=False) + "\n")
    cla2.finetune.main(model=model, data=data, out=work / "out", max_steps=3, batch_size=batch,
                       gradient_accumulation_steps=1, max_seq_length=context, deepspeed="none",
                       gradient_checkpointing=False, save_steps=1000, logging_steps=1, device="cpu", dtype="fp32",
                       group_by_length=False)
    estimate = p.bytes_per_device
print(json.dumps({"measured": rss("VmHWM") - before, "estimate": estimate, "plan": p.to_json()}))
"""


def run_case(case: str, model: Path, batch: int, context: int, work: Path) -> dict:
    rt = REPO / ".venv-runtime" / "bin" / "python"
    python = str(rt) if rt.exists() else sys.executable
    out = subprocess.run([python, "-c", CHILD, case, str(model), str(batch), str(context), str(work)],
                         check=False, capture_output=True, text=True, timeout=1800, cwd=work)
    if out.returncode != 0:
        sys.exit(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a small model; print the ratios, never fail on them")
    args = ap.parse_args()
    size = ({"layers": 4, "hidden": 256, "intermediate": 688, "heads": 4, "context": 256, "batch": 4} if args.smoke else
            {"layers": 12, "hidden": 768, "intermediate": 2048, "heads": 12, "context": 1024, "batch": 8})
    with tempfile.TemporaryDirectory(prefix="cla2-plan-bench-") as tmp:
        model = Path(tmp) / "model"
        subprocess.run([str(REPO / ".venv-runtime" / "bin" / "cla2"), "tiny", "--out", str(model), "--layers", str(size["layers"]),
                        "--hidden-size", str(size["hidden"]), "--intermediate-size", str(size["intermediate"]),
                        "--heads", str(size["heads"]), "--max-position-embeddings", str(size["context"]),
                        "--vocab-size", "1000", "--shards", "2"], check=True, capture_output=True)
        ok = True
        print(f"model: {size['layers']} layers, hidden {size['hidden']}, fp32; context {size['context']}")
        for case, batch, context in (("generate", size["batch"], size["context"]),
                                     ("finetune", 2, size["context"] // 2),
                                     ("finetune-data", 2, size["context"] // 2)):
            work = Path(tmp) / case
            work.mkdir()
            r = run_case(case, model, batch, context, work)
            ratio = r["estimate"] / r["measured"]
            inside = TARGET[0] <= ratio <= TARGET[1]
            ok &= inside
            verdict = ("smoke size: fixed costs the plan does not model dominate; the target is for the full size"
                       if args.smoke else f"{'within' if inside else 'OUTSIDE'} {TARGET[0]}..{TARGET[1]}")
            tokens = f"{r['plan']['seq_len']} tokens ({r['plan']['tokens_from']})" if case == "finetune-data" else f"{context} tokens"
            print(f"{case:<9} batch {batch} x {tokens}: estimate {r['estimate'] / 2**20:8.1f} MiB, measured "
                  f"peak {r['measured'] / 2**20:8.1f} MiB, ratio {ratio:.2f} ({verdict})")
    return 0 if ok or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
