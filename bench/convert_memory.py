#!/usr/bin/env python3
"""Peak memory of `cla2 convert` against transformers' from_pretrained + save_pretrained(safetensors).

    python bench/convert_memory.py            # ~1B-parameter fp16 LLaMA in three .bin shards (~2 GB; a minute or two)
    python bench/convert_memory.py --smoke    # a small model, seconds; prints the ratio

A random fp16 LLaMA is written as hfl publishes theirs (pytorch_model-0000N-of-00003.bin shards made with
torch.save + pytorch_model.bin.index.json + config.json) into a temporary folder. Each side then runs in its
own subprocess, in the same run, and its peak resident memory is read from the kernel (wait4's ru_maxrss):

- cla2 convert: `python -m cla2 convert --model B --out O1` (pickle-free, streams tensor by tensor, no torch)
- baseline:     AutoModelForCausalLM.from_pretrained(B, fp16).save_pretrained(O2, safe_serialization=True)
                (what the old refusal told operators to run, where torch >= 2.6)

Both outputs are then compared tensor by tensor (bit for bit). The full-size run exits 1 when the ratio is
above the target (0.1); --smoke only prints it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_memory import (  # the same model generator and meter
    REPO,
    measure,
    write_model,
)

TARGET = 0.1

BASELINE = r"""
import inspect, sys, torch
from transformers import AutoModelForCausalLM
base, out = sys.argv[1:3]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
kw = {"safe_serialization": True} if "safe_serialization" in inspect.signature(model.save_pretrained).parameters else {}
model.save_pretrained(out, **kw)
"""


def write_bin_model(folder: Path, shape: dict) -> int:
    """The generated model with its safetensors shards turned into torch.save .bin shards, one at a time."""
    import torch
    from safetensors.torch import load_file

    n = write_model(folder, shards=3, **shape)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    names = {}
    for st in sorted(set(index["weight_map"].values())):
        name = st.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(folder / st), folder / name)
        names[st] = name
        (folder / st).unlink()
    index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors.index.json").unlink()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a small model, seconds; only prints the ratio")
    ap.add_argument("--keep", type=Path, default=None, help="write the models here and keep them")
    ap.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        shape = {"layers": 4, "hidden": 512, "intermediate": 1376, "heads": 8, "vocab": 8000}
    else:  # ~1.04B parameters: 2.1 GB in fp16, three shards
        shape = {"layers": 16, "hidden": 2048, "intermediate": 5504, "heads": 16, "vocab": 55296}
    if args.write:
        (args.write / "n").write_text(str(write_bin_model(args.write / "base", shape)))
        return
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        root = Path(tmp)
        t0 = time.time()
        # Written by a child process: a child's ru_maxrss starts from its parent's resident size at fork,
        # so this process must stay small (no torch) until both measurements are done.
        subprocess.run([sys.executable, __file__, "--write", str(root), *(["--smoke"] if args.smoke else [])],
                       check=True)
        print(f"wrote a {int((root / 'n').read_text()) / 1e9:.2f}B-parameter fp16 LLaMA as 3 .bin shards "
              f"in {time.time() - t0:.0f}s")
        ours, ours_s = measure([sys.executable, "-m", "cla2", "convert", "--model", str(root / "base"),
                                "--out", str(root / "st-cla2")])
        base, base_s = measure([sys.executable, "-c", BASELINE, str(root / "base"), str(root / "st-hf")])
        ratio = ours / base
        print(f"cla2 convert:                       peak RSS {ours:8.0f} MiB  {ours_s:6.1f}s")
        print(f"from_pretrained + save_pretrained:  peak RSS {base:8.0f} MiB  {base_s:6.1f}s")
        print(f"ratio cla2 / baseline: {ratio:.3f}  (target <= {TARGET} at full size)")
        sys.path.insert(0, str(REPO / "runtime" / "src"))
        from safetensors import safe_open

        theirs = {k: f for f in sorted((root / "st-hf").glob("*.safetensors"))
                  for k in safe_open(f, "pt").keys()}  # noqa: SIM118
        differ = 0
        count = 0
        for f in sorted((root / "st-cla2").glob("*.safetensors")):
            with safe_open(f, "pt") as fh:
                for k in fh.keys():  # noqa: SIM118
                    with safe_open(theirs[k], "pt") as other:
                        a, b = fh.get_tensor(k), other.get_tensor(k)
                    count += 1
                    differ += int(a.dtype != b.dtype or not bool((a.view(-1) == b.view(-1)).all()))
        print(f"tensors compared: {count}, differing: {differ}")
        if differ or count != len(theirs):
            raise SystemExit("the two conversions differ")
    if not args.smoke and ratio > TARGET:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
