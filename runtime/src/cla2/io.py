"""Output folders, weight files and run records: written completely or not at all.

Every job leaves a ``run.json`` beside its output, written and read by ``cla2.record``: the same common keys for
all of them, so a supervisor (or a person, months later) reads any job's record the same way, plus the job's own.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from cla2.compat import dtype_key, torch_load_refused

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


class OutputBusyError(RuntimeError):
    """Another live process is writing the same output."""


# Known names beside an output folder OUT (never with a pid in them, so the next run of OUT finds them):
#   .OUT.lock     flock(2)-locked by the process that writes OUT; it holds its pid. Removed when done.
#   .OUT.partial  the new output being written; a killed writer leaves it, the next writer removes it.
#   .OUT.old      the previous OUT, moved aside for the swap and removed after it.
#   .OUT.carry    (training) the previous OUT whose checkpoints and logs move into the new OUT after the swap.
def partial_dir(out: Path) -> Path:
    return Path(out).parent / f".{Path(out).name}.partial"


def _aside(out: Path, kind: str) -> Path:
    return Path(out).parent / f".{Path(out).name}.{kind}"


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder's entries (its directory itself, not its files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path, missing_ok: bool = False) -> None:
    """fsync every file under ``folder`` and every folder (itself included), so a rename after it publishes
    data that is on disk, not only in the page cache. ``missing_ok``: a file or folder removed while walking
    (another rank rotating checkpoints) is passed over."""
    folder = Path(folder)
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                try:
                    fsync_path(p)
                except FileNotFoundError:
                    if not missing_ok:
                        raise
        try:
            fsync_path(Path(root))
        except FileNotFoundError:
            if not missing_ok:
                raise


# ------------------------------------------------------------------------------------- free space
class NoSpaceError(OSError):
    """The output does not fit the free space of its file system (errno ENOSPC); nothing was written."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]"
        return str(self.strerror)


def human(n: float) -> str:
    """A byte count as people read it (decimal units: 12.3 MB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def file_system(path: Path) -> tuple[Path, str]:
    """The nearest existing folder at or above ``path``, and a description of the file system holding it
    (its mount point, with its type where /proc/self/mounts says)."""
    where = Path(os.path.abspath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    mount = os.path.realpath(where)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    kind = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[1].replace("\\040", " ") == mount:
                kind = fields[2] + " "  # the last entry for a mount point is the one on top
    return where, f"the {kind}file system mounted at {mount}"


def check_free_space(out: Path, needed: int, what: str) -> None:
    """Refuse (NoSpaceError, before anything is written) when ``needed`` bytes do not fit the free space of
    the file system ``out`` is to be written on; ``what`` says what they are."""
    where, fs = file_system(out)
    free = shutil.disk_usage(where).free
    if needed <= free:
        return
    raise NoSpaceError(
        errno.ENOSPC,
        f"not enough free space for {out} in {where} ({fs}): it needs {human(needed)} ({needed} bytes: {what}), "
        f"{human(free)} ({free} bytes) is free; nothing was written: free {human(needed - free)} there, "
        "or choose another --out on a larger disk")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_output(out: Path) -> None:
    """Undo what a writer of ``out`` killed mid-way (SIGKILL, power loss) left beside it; the caller holds
    ``output_lock(out)``, so no live process owns these names. A swap cut between its two renames is rolled
    back (the previous ``out`` comes back); a partial output is removed."""
    out = Path(out)
    old, carry, partial = _aside(out, "old"), _aside(out, "carry"), partial_dir(out)
    for aside in (old, carry):
        if aside.is_dir() and not out.exists():
            aside.rename(out)
    if carry.is_dir():  # the swap happened; move back what the new output does not hold (checkpoints, logs)
        for entry in sorted(carry.iterdir()):
            if not (out / entry.name).exists() and not is_final_output(entry.name):
                entry.rename(out / entry.name)
        shutil.rmtree(carry)
    for p in (old, partial):
        if p.exists():
            shutil.rmtree(p)
    # partials with a pid in their name, from before these names were fixed: removed once their writer is dead
    for p in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


FINAL_OUTPUT_PREFIXES = ("adapter_", "tokenizer", "special_tokens_map", "added_tokens", "README", "run.json",
                         "loss.png", ".adapter.partial")


def is_final_output(name: str) -> bool:
    """Whether ``name`` is one of the files a training run writes at its end (the set replaced as a whole)."""
    return name.startswith(FINAL_OUTPUT_PREFIXES)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the flock(2) lock of ``out`` (``.OUT.lock`` beside it), having recovered what a killed writer left.

    A live writer of the same output makes this fail at once (OutputBusyError, with its pid); a dead one
    holds nothing (the kernel drops a killed process's locks).
    """
    import fcntl

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _aside(out, "lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise OutputBusyError(f"output {out} is being written by another process (pid {holder}, lock {lock}): "
                                  "wait for it to finish, or stop it, or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        recover_output(out)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        os.close(fd)


def replace_dir(new: Path, out: Path) -> None:
    """Make the complete folder ``new`` the folder ``out``: fsync it, move the old ``out`` aside, rename, fsync
    the parent, remove the old one. A reader sees the old folder or the new one, never a mix."""
    new, out = Path(new), Path(out)
    fsync_tree(new)
    old = _aside(out, "old")
    if out.exists():
        out.rename(old)
    new.rename(out)
    fsync_path(out.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def replace_final_files(new: Path, out: Path) -> None:
    """Make the complete folder ``new`` (a training run's final files) the folder ``out``, keeping what else
    ``out`` holds (checkpoints, logs): fsync ``new``, move ``out`` aside as ``.OUT.carry``, rename ``new`` in,
    move the other entries back, remove the rest. The final files change as one set: a kill leaves the old
    set or the new one, and ``recover_output`` (the next writer of ``out``) finishes or rolls back the move."""
    new, out = Path(new), Path(out)
    fsync_tree(new)
    carry = _aside(out, "carry")
    if out.exists():
        out.rename(carry)
    new.rename(out)
    fsync_path(out.parent)
    if carry.exists():
        for entry in sorted(carry.iterdir()):
            if not (out / entry.name).exists() and not is_final_output(entry.name):
                entry.rename(out / entry.name)
        fsync_path(out)
        shutil.rmtree(carry)


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename.

    On failure the temporary folder is removed and ``out`` is left exactly as it was. With ``overwrite``
    an existing ``out`` is replaced only once the new one is complete. The temporary folder has a known
    name (``.OUT.partial``): a writer killed by SIGKILL leaves it, and the next writer of ``out`` removes it,
    under ``output_lock`` (never while its writer lives).
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    with output_lock(out):
        check_output_dir(out, overwrite)  # recovery may have brought a previous output back
        tmp = partial_dir(out)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, out)


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


def check_loadable(model: Path) -> None:
    """Refuse, with the way out, PyTorch .bin weights that this transformers will not read: from 4.50 on
    it refuses ``torch.load`` under torch < 2.6 (CVE-2025-32434; Cambricon's image has torch 2.1), and
    the published Chinese-LLaMA-2 / Alpaca-2 folders are .bin."""
    bins = [f for f in weight_files(model) if f.suffix == ".bin"]
    if bins and torch_load_refused():
        import transformers

        raise ValueError(
            f"model folder {model} holds PyTorch .bin weights ({bins[0].name}), and transformers "
            f"{transformers.__version__} does not read .bin files with torch {torch.__version__} (torch.load "
            "before torch 2.6 is unsafe for untrusted files, CVE-2025-32434). Convert it to safetensors once, in "
            f"place and without running the files' pickles: cla2 convert --model {model} (the model_weights role "
            "does this when it places a .bin model; with torch >= 2.6 elsewhere, from_pretrained(DIR)"
            ".save_pretrained(OUT) works too)")


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


def write_json(path: Path, data: dict) -> None:
    """``data`` as JSON in ``path``, through a temporary sibling and one rename (never half-written)."""
    path = Path(path)
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk (ENOSPC), a kill: no temporary file stays behind, ``path`` is as it was
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
