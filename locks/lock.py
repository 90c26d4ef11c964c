#!/usr/bin/env python3
"""Every lock of the kit, made by one tool (``uv pip compile --generate-hashes``) from what is declared.

    make lock                     locks/lock.py: remake each lock whose declared inputs changed, keeping the
                                  versions it had where they still fit (uv takes the existing file's pins as
                                  preferences, as pip-compile does)
    make lock UPGRADE=1           locks/lock.py --upgrade: resolve every lock anew, newest versions
    locks/lock.py --check         exit 1 naming each lock whose inputs changed since it was made (no network)

Each lock lists every package of one environment, transitive ones included, with the sha256 of each of its
files, and is installed with ``pip install --require-hashes --no-deps -r LOCK``:

- ``locks/controller.txt``: the controller's ``.venv`` (requirements.txt), any Python >= 3.11, any platform;
- ``roles/cla2_runtime/files/locks/<stack>.txt``: the wheelhouse the cla2_runtime role builds for an image,
  one per stack of ``roles/cla2_runtime/files/locks/stacks.yml`` (the image's Python and torch; the image's
  own torch is never in it);
- ``locks/runtime-torch<X.Y>.txt``: the runtime's test venvs, one per torch that ``make test`` runs, each held
  to its stack's lock so the suite tests the versions that the role installs;
- ``locks/pytorch-image.txt``: the sandbox's stand-in PyTorch image (torch's CPU build and what it needs).

The first line after the header names a digest of the lock's inputs (the declared requirements, the stack, the
locks it is held to, and this file's recipe for it); ``--check`` recomputes it. A remake that changes a
version lists the changes in CHANGELOG.md under "Unreleased".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STACKS = ROOT / "roles" / "cla2_runtime" / "files" / "locks" / "stacks.yml"
# The local CPU build of torch on the kit's development and CI machines; elsewhere, PyTorch's CPU index.
TORCH_CPU_LINKS = os.environ.get("CLA2_TORCH_FIND_LINKS", "/opt/wheels")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
HEADER = "# Made by `make lock` (locks/lock.py, uv pip compile --generate-hashes): do not edit by hand."
LINUX_X86_64 = "x86_64-manylinux_2_28"


@dataclass(frozen=True)
class Lock:
    """One environment's lock: what it is resolved from and for which interpreter."""

    name: str
    path: str  # relative to the checkout
    requirements: tuple[str, ...]  # requirement lines beside the sources' own
    python: str  # the oldest Python it must install on (universal) or the one it is for
    platform: str | None = LINUX_X86_64  # uv's --python-platform; None: universal (markers for every platform)
    held_to: tuple[str, ...] = ()  # names of other locks whose versions constrain this one
    torch_cpu: bool = False  # finds the CPU build of torch (TORCH_CPU_LINKS or PyPI's CPU index)
    provided: tuple[str, ...] = ()  # NAME==VERSION the image ships: resolved as empty stand-ins, never emitted
    sources: tuple[str, ...] = field(default=())  # requirements.txt or pyproject.toml files to resolve
    extras: tuple[str, ...] = ()  # of the pyproject.toml sources


def stacks() -> list[dict]:
    import yaml  # the controller's Python has it (Ansible needs it)

    return yaml.safe_load(STACKS.read_text())


def locks() -> list[Lock]:
    """Every lock, in the order they are made (a lock held to another comes after it)."""
    out = [Lock("controller", "locks/controller.txt", (), python="3.11", platform=None,
                sources=("requirements.txt",))]
    for stack in stacks():
        out.append(Lock(stack["name"], f"roles/cla2_runtime/files/locks/{stack['name']}.txt",
                        tuple(stack.get("pins", [])), python=stack["python"], provided=(f"torch=={stack['torch']}",),
                        sources=("runtime/pyproject.toml",), extras=("deepspeed",)))
    # The runtime's test venvs: the project with its test tools, torch, and what installs the project
    # itself without a build environment of its own (setuptools, wheel).
    out.append(Lock("runtime-torch2.13", "locks/runtime-torch2.13.txt",
                    ("torch==2.13.0+cpu", "setuptools", "wheel"), python="3.11", held_to=("py3.11-torch2.13",),
                    torch_cpu=True, sources=("runtime/pyproject.toml",), extras=("test", "deepspeed")))
    out.append(Lock("runtime-torch2.1", "locks/runtime-torch2.1.txt",
                    ("torch==2.1.2", "setuptools", "wheel"), python="3.11", held_to=("py3.10-torch2.1",),
                    sources=("runtime/pyproject.toml",), extras=("test",)))
    # the stand-in image's torch: what it shares with its stack's wheelhouse at the same versions, as a vendor's
    # image would not have the wheelhouse replace them
    out.append(Lock("pytorch-image", "locks/pytorch-image.txt", ("torch==2.13.0+cpu",), python="3.11",
                    held_to=("py3.11-torch2.13",), torch_cpu=True))
    return out


def declared(source: str) -> object:
    """What a source file declares: pyproject.toml's requirements only (not its tool settings)."""
    text = (ROOT / source).read_text()
    if source.endswith("pyproject.toml"):
        project = tomllib.loads(text)["project"]
        return {k: project.get(k) for k in ("requires-python", "dependencies", "optional-dependencies")}
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def digest(lock: Lock, by_name: dict[str, Lock]) -> str:
    """sha256 of everything the lock is made from."""
    parts = {
        "recipe": asdict(lock),
        "declared": {s: declared(s) for s in lock.sources},
        "held_to": {n: hashlib.sha256((ROOT / by_name[n].path).read_bytes()).hexdigest()
                    if (ROOT / by_name[n].path).exists() else None for n in lock.held_to},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def recorded_digest(path: Path) -> str | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines()[:4]:
        if line.startswith("# inputs: "):
            return line.split(":", 1)[1].strip()
    return None


def versions(path: Path) -> dict[str, str]:
    """NAME -> VERSION of a lock (or any requirements file of NAME==VERSION lines)."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
            if m:
                out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def wheelhouse():
    """The role's wheelhouse builder, whose empty stand-in wheels resolve an image's own packages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("wheelhouse", STACKS.parents[1] / "wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_lock(lock: Lock, by_name: dict[str, Lock], uv: str, upgrade: bool, exclude_newer: str) -> str:
    """Run uv for one lock; the lock's text, header included."""
    work = ROOT / ".cache" / "lock"
    work.mkdir(parents=True, exist_ok=True)
    infile = work / f"{lock.name}.in"
    infile.write_text("\n".join(lock.requirements) + "\n")
    out = ROOT / lock.path
    out.parent.mkdir(parents=True, exist_ok=True)
    # uv takes the pins of the file it writes as preferences; it writes through a copy so a failed run
    # leaves the lock as it was.
    draft = work / f"{lock.name}.txt"
    if out.exists() and not upgrade:
        shutil.copyfile(out, draft)
    elif draft.exists():
        draft.unlink()
    cmd = [uv, "pip", "compile", *lock.sources, str(infile.relative_to(ROOT)),
           *[a for extra in lock.extras for a in ("--extra", extra)], "-o", str(draft.relative_to(ROOT)),
           "--generate-hashes", "--no-header", "--quiet", "--python-version", lock.python]
    cmd += ["--universal"] if lock.platform is None else ["--python-platform", lock.platform]
    if upgrade:
        cmd.append("--upgrade")
    if exclude_newer:
        cmd += ["--exclude-newer", exclude_newer]
    for name in lock.held_to:
        cmd += ["-c", by_name[name].path]
    if lock.torch_cpu:
        cmd += (["--find-links", TORCH_CPU_LINKS] if Path(TORCH_CPU_LINKS).is_dir()
                else ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"])
    with tempfile.TemporaryDirectory() as tmp:
        if lock.provided:
            constraints = Path(tmp) / "provided.txt"
            constraints.write_text("".join(f"{spec}+provided\n" for spec in lock.provided))
            for spec in lock.provided:
                wheelhouse().stub_wheel(Path(tmp), *spec.split("=="))
            cmd += ["--find-links", tmp, "-c", str(constraints)]
            cmd += [a for spec in lock.provided for a in ("--no-emit-package", spec.split("==")[0])]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"lock {lock.name}: uv could not resolve {[*lock.sources, *lock.requirements]} for "
                         f"Python {lock.python} (see uv's message above); "
                         f"{lock.path} is unchanged")
    body = draft.read_text()
    body = "\n".join(line for line in body.splitlines()
                     if not line.startswith(("# Made by `make lock`", "# lock: ", "# inputs: ")))
    what = f"Python {lock.python}, " + ("any platform" if lock.platform is None else lock.platform)
    if lock.provided:
        what += "; provided by the image, not in the lock: " + ", ".join(lock.provided)
    if lock.held_to:
        what += "; held to " + ", ".join(by_name[n].path for n in lock.held_to)
    return f"{HEADER}\n# lock: {lock.name} ({what})\n# inputs: {digest(lock, by_name)}\n{body.lstrip()}\n"


def changelog(changes: dict[str, list[str]]) -> None:
    """List version changes under CHANGELOG.md's Unreleased section (made when missing)."""
    path = ROOT / "CHANGELOG.md"
    text = path.read_text()
    lines = [f"- Locks: `{lock}`: {'; '.join(items)}." for lock, items in changes.items()]
    if "\n## Unreleased\n" not in text:
        title, _, rest = text.partition("\n\n")
        text = f"{title}\n\n## Unreleased\n\n{rest}"
    head, _, rest = text.partition("\n## Unreleased\n\n")
    path.write_text(f"{head}\n## Unreleased\n\n" + "\n".join(lines) + "\n" + rest)


def check() -> int:
    all_locks = locks()
    by_name = {lk.name: lk for lk in all_locks}
    stale = [lk for lk in all_locks if recorded_digest(ROOT / lk.path) != digest(lk, by_name)]
    for lk in stale:
        why = "missing" if not (ROOT / lk.path).exists() else "its declared inputs changed since it was made"
        print(f"{lk.path}: {why}; run `make lock`", file=sys.stderr)
    return 1 if stale else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only say which locks are out of date")
    ap.add_argument("--upgrade", action="store_true", help="resolve anew instead of keeping the locked versions")
    ap.add_argument("--only", action="append", default=[], help="remake this lock even if current (a name; repeatable)")
    ap.add_argument("--exclude-newer", default="", help="resolve as PyPI stood then (a date), e.g. 2026-12-03")
    ap.add_argument("--uv", default=shutil.which("uv") or "uv")
    args = ap.parse_args()
    if args.check:
        return check()
    all_locks = locks()
    by_name = {lk.name: lk for lk in all_locks}
    unknown = set(args.only) - set(by_name)
    if unknown:
        ap.error(f"--only {sorted(unknown)}: no such lock; the locks are {sorted(by_name)}")
    changes: dict[str, list[str]] = {}
    for lock in all_locks:
        path = ROOT / lock.path
        if args.only and lock.name not in args.only:
            continue
        if not (args.upgrade or args.only) and recorded_digest(path) == digest(lock, by_name):
            print(f"{lock.path}: current")
            continue
        before = versions(path)
        text = compile_lock(lock, by_name, args.uv, args.upgrade, args.exclude_newer)
        path.write_text(text)
        after = versions(path)
        items = [f"{n} {before.get(n, '(new)')} → {after.get(n, '(removed)')}"
                 for n in sorted(set(before) | set(after)) if before.get(n) != after.get(n)]
        if before and items:
            changes[lock.path] = items
        print(f"{lock.path}: {'; '.join(items) if items else 'no version changed'}")
    if changes:
        changelog(changes)
        print("CHANGELOG.md: the version changes are listed under Unreleased")
    return 0


if __name__ == "__main__":
    sys.exit(main())
