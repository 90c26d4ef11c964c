#!/usr/bin/env python3
"""Build an offline wheelhouse of a wheel's dependencies for another Python (the image's).

    wheelhouse.py --wheel cla2-0.1.0-py3-none-any.whl --dest DIR --python-version 3.11 \
        --platform manylinux_2_28_x86_64 --provided torch==2.13.0 [--pip 'python3 -m pip']

Packages the image already ships (``--provided``, e.g. torch and torch_mlu in Cambricon's image) are
never downloaded: a stub wheel ``NAME-VERSION+provided`` with no files stands in for each one during
resolution, so pip resolves every other dependency against the image's version and the real (multi-GB)
package never enters the wheelhouse. The stubs are removed before the script exits. Prints a JSON line
with the wheelhouse's file names.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", required=True, help="the wheel whose dependencies to collect")
    ap.add_argument("--dest", required=True, type=Path)
    ap.add_argument("--python-version", required=True, help="the image's Python, e.g. 3.11")
    ap.add_argument("--platform", action="append", default=[], help="pip platform tags (repeatable)")
    ap.add_argument("--provided", action="append", default=[], help="NAME==VERSION the image already has")
    ap.add_argument("--pip", default=f"{sys.executable} -m pip")
    ap.add_argument("--index-url", default="")
    args = ap.parse_args()

    args.dest.mkdir(parents=True, exist_ok=True)
    pyver = args.python_version.replace(".", "")
    platforms = args.platform or ["manylinux_2_28_x86_64"]
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp)
        constraints = stubs / "constraints.txt"
        lines = []
        for spec in args.provided:
            name, _, version = spec.partition("==")
            if not version:
                ap.error(f"--provided {spec!r}: write NAME==VERSION")
            stub_wheel(stubs, name, version)
            lines.append(f"{name}=={version}+provided")
        constraints.write_text("\n".join(lines) + "\n")
        cmd = [*shlex.split(args.pip), "download", "--quiet", "--dest", str(args.dest),
               "--only-binary=:all:", "--python-version", args.python_version, "--implementation", "cp",
               "--abi", f"cp{pyver}", "--find-links", str(stubs), "--constraint", str(constraints)]
        for plat in [*platforms, "any"]:
            cmd += ["--platform", plat]
        if args.index_url:
            cmd += ["--index-url", args.index_url]
        cmd.append(args.wheel)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stdout + proc.stderr)
            sys.stderr.write(f"pip download failed for {args.wheel} (Python {args.python_version}); "
                             "see pip's message above\n")
            return proc.returncode
    for spec in args.provided:
        for stub in args.dest.glob(f"{spec.partition('==')[0].replace('-', '_')}-*+provided-*.whl"):
            stub.unlink()
    own = args.dest / Path(args.wheel).name
    if own.exists():
        own.unlink()  # the wheelhouse holds the dependencies only; the wheel travels on its own
    names = sorted(p.name for p in args.dest.glob("*.whl"))
    print(json.dumps({"dest": str(args.dest), "wheels": names}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
