"""Output folders, weight files and run records: written completely or not at all.

Every job leaves a ``run.json`` beside its output (``run_record``): the same common keys for all of them,
so a supervisor (or a person, months later) reads any job's record the same way, plus the job's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

RUN_FILE = "run.json"


class OutputExistsError(FileExistsError):
    pass


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that exists and is not empty, unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {out} exists and is not empty: choose another --out, or pass --overwrite to replace it"
        )


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename.

    On failure the temporary folder is removed and ``out`` is left exactly as it was. With ``overwrite``
    an existing ``out`` is replaced only once the new one is complete.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def shard_names(shards: int, ext: str = "safetensors") -> list[str]:
    if shards == 1:
        return [f"model.{ext}"]
    return [f"model-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]


def save_sharded(state_dict: dict[str, torch.Tensor], folder: Path, shards: int = 1) -> None:
    """Save a state dict as ``shards`` safetensors files of about equal size, with an index when > 1."""
    from safetensors.torch import save_file

    sizes = [(n, t.numel() * t.element_size()) for n, t in state_dict.items()]
    total = sum(size for _, size in sizes)
    # Fill shards in order, each up to an equal share of what is left, keeping at least one tensor
    # for every shard still to come (so a model whose embedding dominates still gets `shards` files).
    groups: list[list[str]] = []
    i = 0
    for k in range(shards):
        left = shards - k
        target = sum(size for _, size in sizes[i:]) / left
        group: list[str] = []
        size = 0
        while i < len(sizes) and (not group or left == 1 or (size < target and i < len(sizes) - (left - 1))):
            group.append(sizes[i][0])
            size += sizes[i][1]
            i += 1
        if group:
            groups.append(group)
    files = shard_names(len(groups))
    weight_map = {}
    for fname, group in zip(files, groups, strict=True):
        save_file({n: state_dict[n].contiguous() for n in group}, str(Path(folder) / fname),
                  metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def dtype_key() -> str:
    """What this transformers calls the weight dtype, in ``from_pretrained`` and in the config:
    ``dtype`` from 4.56 on, ``torch_dtype`` before (torch 2.1 images cannot go past 4.55)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def check_loadable(model: Path) -> None:
    """Refuse, with the way out, PyTorch .bin weights that this transformers will not read: from 4.50 on
    it refuses ``torch.load`` under torch < 2.6 (CVE-2025-32434; Cambricon's image has torch 2.1), and
    the published Chinese-LLaMA-2 / Alpaca-2 folders are .bin."""
    from transformers.utils import import_utils

    bins = [f for f in weight_files(model) if f.suffix == ".bin"]
    if not bins or not hasattr(import_utils, "check_torch_load_is_safe"):
        return
    try:
        import_utils.check_torch_load_is_safe()
    except ValueError:
        import transformers

        raise ValueError(
            f"model folder {model} holds PyTorch .bin weights ({bins[0].name}), and transformers "
            f"{transformers.__version__} does not read .bin files with torch {torch.__version__} (torch.load "
            "before torch 2.6 is unsafe for untrusted files, CVE-2025-32434). Convert it to safetensors once, in "
            f"place and without running the files' pickles: cla2 convert --model {model} (the model_weights role "
            "does this when it places a .bin model; with torch >= 2.6 elsewhere, from_pretrained(DIR)"
            ".save_pretrained(OUT) works too)") from None


def load_pretrained(auto_cls, model: Path, dtype: torch.dtype):
    """``auto_cls.from_pretrained(model)`` with its weights in ``dtype``, on any supported transformers
    (callers run ``check_loadable`` first, before anything is written)."""
    return auto_cls.from_pretrained(str(model), **{dtype_key(): dtype})


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model folder (safetensors preferred, else PyTorch .bin), or a clear error."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = model_dir / index_name
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (model_dir / f).exists()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
            return [model_dir / f for f in files]
        if (model_dir / single).exists():
            return [model_dir / single]
    raise FileNotFoundError(
        f"model folder {model_dir} holds no weights (model.safetensors[.index.json] or "
        "pytorch_model.bin[.index.json]): point --model at a complete Hugging Face model folder"
    )


# ------------------------------------------------------------------------------------- run records
def iso_time(t: float | None = None) -> str:
    """An epoch time as ISO 8601 UTC, to the second (``2026-12-02T15:04:35Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def versions() -> dict[str, str | None]:
    """The versions that decide what a job did: cla2, python, torch and the libraries around it."""
    import importlib.metadata as md

    from cla2 import __version__

    out: dict[str, str | None] = {"cla2": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "accelerate", "deepspeed", "torch_mlu", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def jsonable(v):
    """Arguments as JSON: paths absolute, tuples as lists, anything else unknown as its string."""
    if isinstance(v, Path):
        return str(v.resolve())
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [jsonable(x) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def run_record(job: str, args: dict, started: float, ended: float | None = None, outcome: str = "succeeded",
               **extra) -> dict:
    """A job's run.json: the common keys (job, args, versions, started, ended, seconds, outcome), then the job's
    own ``extra`` keys. ``ended`` None (a record written while the job runs) leaves ended and seconds null."""
    common = {"job": job, "args": jsonable({k: v for k, v in args.items() if not k.startswith("_")}),
              "versions": versions(), "started": iso_time(started),
              "ended": iso_time(ended) if ended is not None else None,
              "seconds": round(ended - started, 2) if ended is not None else None, "outcome": outcome}
    return {**common, **extra}


def write_json(path: Path, data: dict) -> None:
    """``data`` as JSON in ``path``, through a temporary sibling and one rename (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)
