"""`cla2 env`: what this process sees: library versions, device kind and count, memory, dtype support."""

from __future__ import annotations

import json as jsonlib
import platform
import sys


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def report(device: str | None = None) -> dict:
    import torch

    from cla2 import __version__
    from cla2.device import pick

    dev = pick(device)
    return {
        "cla2": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_mlu": _version("torch_mlu"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "deepspeed": _version("deepspeed"),
        "device": dev.kind,
        "backend": dev.backend,
        "count": dev.count,
        "names": [dev.name(i) for i in range(dev.count)],
        "memory": dev.memory(),
        "dtypes": {n: dev.dtype_supported(t) for n, t in
                   (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16))},
    }


def main(device: str | None = None, json: bool = False) -> dict:
    """Print the device report: torch / torch_mlu / transformers / peft / deepspeed versions, the device
    kind and count, memory per device and fp16 / bf16 support.

    Args:
        device: mlu, cuda, cpu or auto (default: auto, the first of mlu, cuda, cpu that is usable).
        json: Print JSON instead of text.
    """
    rep = report(device)
    if json:
        print(jsonlib.dumps(rep, indent=2))
        return rep
    gib = 1024**3
    lines = [f"cla2 {rep['cla2']}  python {rep['python']}  ({sys.executable})"]
    for lib in ("torch", "torch_mlu", "transformers", "peft", "deepspeed"):
        lines.append(f"  {lib:<13} {rep[lib] or 'not installed'}")
    lines.append(f"device {rep['device']} x{rep['count']} (distributed backend {rep['backend']})")
    for mem, name in zip(rep["memory"], rep["names"], strict=True):
        lines.append(f"  [{mem['index']}] {name}: {mem['free'] / gib:.1f} GiB free of {mem['total'] / gib:.1f} GiB")
    lines.append("dtypes: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in rep["dtypes"].items()))
    print("\n".join(lines))
    return rep
