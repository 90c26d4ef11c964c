#!/usr/bin/env python3
"""Build an offline wheelhouse of a wheel's dependencies for another Python (the image's), from a hashed lock.

    wheelhouse.py --wheel cla2-0.1.0-py3-none-any.whl --dest DIR --python-version 3.11 \
        --platform manylinux_2_28_x86_64 --provided torch==2.13.0 [--lock FILE] \
        [--pip 'python3 -m pip'] [--deepspeed pypi | --deepspeed files/cndsp-....whl]

The wheelhouse holds exactly what a lock lists, each file checked against the lock's sha256 (pip's
``--require-hashes``): so every host of a rack, on any day, gets the stack that CI tested. The lock is the one of
``locks/stacks.yml`` beside this script whose Python and torch (major.minor) are the image's (``make lock``
makes them, locks/lock.py), or ``--lock FILE``. An image that no lock covers is refused before anything is
downloaded, naming the stacks that are covered. A file whose hash differs from the lock stops the build,
naming the package.

Packages the image already ships (``--provided``, e.g. torch and torch_mlu in Cambricon's image) are not in
the locks (they were resolved as empty stand-ins) and are never downloaded. The image's torch must also satisfy
the wheel's own ``torch`` extra (cla2: ``torch>=2.1``); an older one is refused first.

``--deepspeed pypi`` adds the lock's DeepSpeed. PyPI publishes it as a source distribution only: its locked
sdist is built once on the controller into a pure-Python wheel (ops compiled just in time on the host,
``DS_BUILD_OPS=0``). A path takes the vendor's wheel as it is (Cambricon's cndsp build); its dependencies come
from what the lock holds (PyPI DeepSpeed's), and the install in the image, which has no index, names any that
is missing. Without ``--deepspeed``, DeepSpeed itself stays out.

Writes DEST/requirements.txt: every wheel the lock brought, NAME==VERSION with the sha256 of the file in the
wheelhouse, which the role installs with ``pip install --require-hashes --no-deps``. Prints a JSON line with the
wheelhouse's file names, the lock and the DeepSpeed requirement to install.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError:  # a controller Python without packaging: pip always vendors it
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import Version

LOCKS = Path(__file__).resolve().parent / "locks"


def release(version: str) -> Version:
    """The release a version names: a vendor's 2.1.0a0+git... is 2.1.0."""
    return Version(Version(version).base_version)


def torch_requirement(wheel: Path) -> str | None:
    """The specifier of the wheel's ``torch`` extra (``>=2.1`` for cla2), or None."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        for line in zf.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and 'extra == "torch"' in line:
                spec = line.split(":", 1)[1].split(";")[0].strip()
                return spec[len("torch"):].strip().strip("()") or None
    return None


def stub_wheel(folder: Path, name: str, version: str) -> Path:
    """Write an empty wheel for NAME==VERSION+provided (metadata only) into folder."""
    dist = name.replace("-", "_")
    ver = f"{version}+provided"
    info = f"{dist}-{ver}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: cla2-kit\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    out = folder / f"{dist}-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return out


def stacks(folder: Path = LOCKS) -> list[dict]:
    import yaml  # the controller's Python runs Ansible, which needs it

    return yaml.safe_load((folder / "stacks.yml").read_text())


def pick_lock(python: str, torch: str, folder: Path = LOCKS) -> Path | str:
    """The lock of the stack whose Python and torch (major.minor) are the image's; else why there is none."""
    def minor(v: str) -> tuple[int, ...]:
        return release(v).release[:2]

    known = stacks(folder)
    for stack in known:
        if minor(stack["python"]) == minor(python) and minor(stack["torch"]) == minor(torch):
            return folder / f"{stack['name']}.txt"
    listed = "; ".join(f"{s['name']} (Python {s['python']}, torch {'.'.join(map(str, minor(s['torch'])))}: "
                       f"{s['images']})" for s in known)
    return (f"no wheelhouse lock covers this image (Python {python}, torch {torch}): the kit has locks for {listed}. "
            "Load an image of one of those stacks, or add the image's stack to "
            "roles/cla2_runtime/files/locks/stacks.yml, run `make lock`, and test it (the lock is what CI tested); "
            "cla2_runtime_lock names a lock of your own.")


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    """NAME (normalised) -> (VERSION, the requirement's text with its hashes) of a hashed lock."""
    out: dict[str, tuple[str, str]] = {}
    block: list[str] = []
    for line in [*path.read_text().splitlines(), ""]:
        if block and (not line.startswith(" ") or not line.strip().startswith("--hash")):
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", block[0])
            if m:
                out[normalise(m.group(1))] = (m.group(2), "\n".join(block))
            block = []
        if line and not line.startswith((" ", "#")):
            block = [line]
        elif block and line.strip().startswith("--hash"):
            block.append(line)
    return out


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_pip(args: argparse.Namespace, what: str, *pip_args: str, env: dict | None = None) -> bool:
    cmd = [*shlex.split(args.pip), *pip_args]
    if args.index_url:
        cmd += ["--index-url", args.index_url]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        sys.stderr.write(f"{what} failed (see pip's message above)\n")
    return proc.returncode == 0


def build_deepspeed(args: argparse.Namespace, block: str, folder: Path) -> Path | None:
    """Build the lock's DeepSpeed sdist (hash checked) into a pure-Python wheel in folder."""
    req = folder / "deepspeed.txt"
    req.write_text(block + "\n")
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    if not run_pip(args, "building the locked DeepSpeed on the controller (or provide the vendor's wheel: "
                   "cla2_runtime_deepspeed_wheel)", "wheel", "--quiet", "--no-deps", "--require-hashes",
                   "--wheel-dir", str(folder), "-r", str(req), env=env):
        return None
    found = sorted(folder.glob("deepspeed-*.whl"))
    if not found or not found[-1].name.endswith("-py3-none-any.whl"):
        sys.stderr.write(f"{found[-1].name if found else 'no wheel'}: DeepSpeed was not built as pure Python; "
                         "provide a wheel for the image instead (cla2_runtime_deepspeed_wheel)\n")
        return None
    return found[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", required=True, help="the wheel whose dependencies to collect")
    ap.add_argument("--dest", required=True, type=Path)
    ap.add_argument("--python-version", required=True, help="the image's Python, e.g. 3.11")
    ap.add_argument("--platform", action="append", default=[], help="pip platform tags (repeatable)")
    ap.add_argument("--provided", action="append", default=[], help="NAME==VERSION the image already has")
    ap.add_argument("--lock", type=Path, help="the hashed lock to take (default: the stack's, from locks/)")
    ap.add_argument("--pip", default=f"{sys.executable} -m pip")
    ap.add_argument("--index-url", default="")
    ap.add_argument("--deepspeed", default="",
                    help="'pypi' (the lock's DeepSpeed) or the path of the vendor's DeepSpeed wheel")
    args = ap.parse_args()
    vendor_ds = Path(args.deepspeed) if args.deepspeed not in ("", "pypi") else None
    if vendor_ds is not None and (vendor_ds.suffix != ".whl" or not vendor_ds.is_file()):
        ap.error(f"--deepspeed {args.deepspeed!r}: not a wheel file (give 'pypi' or the vendor's .whl)")

    provided = []  # (name, version) as given
    for spec in args.provided:
        name, _, version = spec.partition("==")
        if not version:
            ap.error(f"--provided {spec!r}: write NAME==VERSION")
        provided.append((name, version))
    torch_version = next((v for n, v in provided if n.lower() == "torch"), None)
    wanted = torch_requirement(Path(args.wheel))
    if wanted and torch_version is None:
        sys.stderr.write(f"{Path(args.wheel).name} runs on the image's torch, but no --provided torch==VERSION "
                         "was given: the image must ship torch (and the role must list it among the provided "
                         "packages)\n")
        return 2
    if wanted and not SpecifierSet(wanted).contains(release(torch_version)):
        sys.stderr.write(
            f"the image ships torch {torch_version}, but {Path(args.wheel).name} needs torch{wanted}: "
            "load a PyTorch image whose torch satisfies that: Cambricon's torch 2.1.0 / Python 3.10 image "
            "(torch_mlu 1.22; docs/support.md, which PyTorch image to ask Cambricon for)\n")
        return 2
    lock = args.lock or pick_lock(args.python_version, torch_version or "0")
    if isinstance(lock, str):
        sys.stderr.write(lock + "\n")
        return 2
    if not lock.is_file():
        sys.stderr.write(f"--lock {lock}: no such file\n")
        return 2
    entries = read_lock(lock)
    shipped = {normalise(n) for n, _ in provided}
    ds_block = entries.pop("deepspeed", (None, None))[1]
    if args.deepspeed == "pypi" and ds_block is None:
        sys.stderr.write(f"{lock}: no deepspeed in the lock; remake it with cla2's deepspeed extra (make lock)\n")
        return 2
    overlap = sorted(shipped & set(entries))
    if overlap:
        sys.stderr.write(f"{lock} lists {overlap}, which the image ships: a lock never replaces the image's own "
                         "packages; remake it (make lock)\n")
        return 2

    args.dest.mkdir(parents=True, exist_ok=True)
    pyver = args.python_version.replace(".", "")
    platforms = args.platform or ["manylinux_2_28_x86_64"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reqs = work / "lock.txt"
        reqs.write_text("\n".join(block for _, block in entries.values()) + "\n")
        cmd = ["download", "--quiet", "--no-deps", "--require-hashes", "--dest", str(args.dest),
               "--only-binary=:all:", "--python-version", args.python_version, "--implementation", "cp",
               "--abi", f"cp{pyver}", *[a for plat in [*platforms, "any"] for a in ("--platform", plat)],
               "-r", str(reqs)]
        if not run_pip(args, f"downloading {lock.name} for Python {args.python_version}", *cmd):
            return 1
        ds_name = ""
        if vendor_ds is not None:
            ds_name = vendor_ds.name.split("-")[0]
            shutil.copy2(vendor_ds, args.dest / vendor_ds.name)
        elif args.deepspeed == "pypi":
            built = build_deepspeed(args, ds_block, work)
            if built is None:
                return 1
            ds_name = "deepspeed"
            shutil.copy2(built, args.dest / built.name)
    # What the image installs with --require-hashes: every wheel the lock brought, with its file's hash (the
    # downloads were checked against the lock; DeepSpeed's wheel was built from the checked sdist).
    lines = []
    for whl in sorted(args.dest.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        if (normalise(name) in entries and entries[normalise(name)][0] == version) or (
                ds_name == "deepspeed" and normalise(name) == "deepspeed" and vendor_ds is None):
            lines.append(f"{name}=={version} --hash=sha256:{sha256(whl)}")
    (args.dest / "requirements.txt").write_text("\n".join(lines) + "\n")
    names = sorted(p.name for p in args.dest.glob("*.whl"))
    print(json.dumps({"dest": str(args.dest), "wheels": names, "lock": str(lock), "deepspeed": ds_name}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
