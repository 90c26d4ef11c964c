#!/usr/bin/env python3
"""Build an offline wheelhouse of a wheel's dependencies for another Python (the image's).

    wheelhouse.py --wheel cla2-0.1.0-py3-none-any.whl --dest DIR --python-version 3.11 \
        --platform manylinux_2_28_x86_64 --provided torch==2.13.0 [--constraint 'SPEC' ...] \
        [--pip 'python3 -m pip'] [--deepspeed pypi | --deepspeed files/cndsp-....whl]
    wheelhouse.py --pins-for-torch 2.1.2      the pins it adds for that torch, one a line

Packages the image already ships (``--provided``, e.g. torch and torch_mlu in Cambricon's image) are
never downloaded: a stub wheel ``NAME-VERSION+provided`` with no files stands in for each one during
resolution, so pip resolves every other dependency against the image's version and the real (multi-GB)
package never enters the wheelhouse. The stubs are removed before the script exits. Prints a JSON line
with the wheelhouse's file names and the constraints applied.

The image's torch must satisfy the wheel's own ``torch`` extra (cla2: ``torch>=2.1``); an older one is
refused before anything is downloaded. pip alone cannot pick the right versions for an older torch:
transformers and numpy do not declare the torch they need, so the newest ones would be taken and fail
at import in the image. ``TORCH_LIMITS`` adds the pins that are known to be needed.

``--deepspeed`` adds DeepSpeed: ``pypi`` takes the wheel's ``deepspeed`` extra. PyPI publishes DeepSpeed as
a source distribution only, so it is built once on the controller into a pure-Python wheel (ops compiled
just in time on the host, ``DS_BUILD_OPS=0``), under the same pins, then resolved for the image like any
other wheel. A path takes the vendor's wheel as it is (Cambricon's cndsp build): it goes into the
wheelhouse with its own dependencies, and cla2's ``deepspeed`` extra (which names PyPI's versions) is not
used. The JSON line names the requirement to install (``deepspeed``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shlex
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

# (torch older than, pin): what upstream dropped, so pip (which cannot know it) must be told.
TORCH_LIMITS = [
    # transformers 4.56 needs torch >= 2.2 and disables its torch support below that
    # (huggingface/transformers#40317, "byebye torch 2.1").
    ("2.2", "transformers<4.56"),
    # torch 2.1 and 2.2 are built against NumPy 1.x: NumPy 2 breaks their numpy interop.
    ("2.3", "numpy<2"),
]


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


def torch_pins(torch_version: str) -> list[str]:
    """The pins ``TORCH_LIMITS`` asks for, for the image's torch."""
    v = release(torch_version)
    return [pin for below, pin in TORCH_LIMITS if v < Version(below)]


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


def build_deepspeed(args: argparse.Namespace, folder: Path, constraints: Path) -> str | None:
    """Build (or take) a pure-Python DeepSpeed wheel under the pins into folder; its version, or None."""
    cmd = [*shlex.split(args.pip), "wheel", "--quiet", "--no-deps", "--wheel-dir", str(folder),
           "--constraint", str(constraints), "deepspeed"]
    if args.index_url:
        cmd += ["--index-url", args.index_url]
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    found = sorted(folder.glob("deepspeed-*.whl"))
    if proc.returncode or not found:
        sys.stderr.write(proc.stdout + proc.stderr)
        sys.stderr.write("could not build a DeepSpeed wheel on the controller (see pip's message above); "
                         "provide the vendor's wheel instead (cla2_runtime_deepspeed_wheel)\n")
        return None
    name = found[-1].name
    if not name.endswith("-py3-none-any.whl"):
        sys.stderr.write(f"{name}: DeepSpeed was built for this controller, not as pure Python; "
                         "provide a wheel for the image instead (cla2_runtime_deepspeed_wheel)\n")
        return None
    return name.split("-")[1]


def main() -> int:
    if sys.argv[1:2] == ["--pins-for-torch"] and len(sys.argv) == 3:
        # What the Makefile's torch 2.1 test environment takes, so that it resolves as the role does.
        print("\n".join(torch_pins(sys.argv[2])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", required=True, help="the wheel whose dependencies to collect")
    ap.add_argument("--dest", required=True, type=Path)
    ap.add_argument("--python-version", required=True, help="the image's Python, e.g. 3.11")
    ap.add_argument("--platform", action="append", default=[], help="pip platform tags (repeatable)")
    ap.add_argument("--provided", action="append", default=[], help="NAME==VERSION the image already has")
    ap.add_argument("--constraint", action="append", default=[],
                    help="an extra pin for the resolution, e.g. 'transformers==4.55.4' (repeatable)")
    ap.add_argument("--pip", default=f"{sys.executable} -m pip")
    ap.add_argument("--index-url", default="")
    ap.add_argument("--deepspeed", default="",
                    help="'pypi' (cla2's deepspeed extra) or the path of the vendor's DeepSpeed wheel")
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
    pins = list(args.constraint)
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
            "load a PyTorch image whose torch satisfies that (Cambricon publishes torch 2.1 variants "
            "of its image, e.g. v1.17.0-torch2.1.0-ubuntu20.04-py310)\n")
        return 2
    if torch_version:
        pins += torch_pins(torch_version)

    args.dest.mkdir(parents=True, exist_ok=True)
    pyver = args.python_version.replace(".", "")
    platforms = args.platform or ["manylinux_2_28_x86_64"]
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp)
        constraints = stubs / "constraints.txt"
        lines = list(pins)
        for name, version in provided:
            stub_wheel(stubs, name, version)
            lines.append(f"{name}=={version}+provided")
        constraints.write_text("\n".join(lines) + "\n")
        requirements = [args.wheel]
        ds_name = ""
        if vendor_ds is not None:
            # NAME-VERSION(-BUILD)-PY-ABI-PLATFORM.whl: its platform tag may be a plain linux_x86_64
            ds_name = vendor_ds.name.split("-")[0]
            tag = vendor_ds.name[:-len(".whl")].split("-")[-1]
            platforms = [*platforms, *(t for t in tag.split(".") if t != "any" and t not in platforms)]
            requirements.append(str(vendor_ds.resolve()))
        elif args.deepspeed == "pypi":
            ds_name = "deepspeed"
            built = build_deepspeed(args, stubs, constraints)
            if built is None:
                return 1
            lines.append(f"deepspeed=={built}")
            constraints.write_text("\n".join(lines) + "\n")
            requirements = [f"{args.wheel}[deepspeed]"]
        cmd = [*shlex.split(args.pip), "download", "--quiet", "--dest", str(args.dest),
               "--only-binary=:all:", "--python-version", args.python_version, "--implementation", "cp",
               "--abi", f"cp{pyver}", "--find-links", str(stubs), "--constraint", str(constraints)]
        for plat in [*platforms, "any"]:
            cmd += ["--platform", plat]
        if args.index_url:
            cmd += ["--index-url", args.index_url]
        cmd += requirements
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stdout + proc.stderr)
            sys.stderr.write(f"pip download failed for {args.wheel} (Python {args.python_version}); "
                             "see pip's message above\n")
            return proc.returncode
    for name, _ in provided:
        for stub in args.dest.glob(f"{name.replace('-', '_')}-*+provided-*.whl"):
            stub.unlink()
    own = args.dest / Path(args.wheel).name
    if own.exists():
        own.unlink()  # the wheelhouse holds the dependencies only; the wheel travels on its own
    names = sorted(p.name for p in args.dest.glob("*.whl"))
    print(json.dumps({"dest": str(args.dest), "wheels": names, "constraints": pins, "deepspeed": ds_name}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
