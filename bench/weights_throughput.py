#!/usr/bin/env python3
"""Throughput of placing weights with the model_weights role against a plain `cp` of the same files.

Both run on this machine, in the same run, from the same source folder (read once beforehand, so
both read it from the page cache) to the same file system, and both end when the copy is durable:
`cp -r SRC DST && sync DST/*` (fsync of each copied file) against the role, which copies, hashes on a
second thread and fsyncs each file, then renames the folder into place. The role's time is the
placement module's own time (`seconds` in its result); the playbook's whole wall time, with
Ansible's start-up, is printed beside it. Target (issue 2): ratio >= 0.8.

    bench/weights_throughput.py                 2 GB in 4 shards, 3 rounds, prints the ratio
    bench/weights_throughput.py --smoke         32 MB, 1 round: seconds; fails only on real errors
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _weights_common import human, make_model, read_all, run_role, workdir

TARGET = 0.8


def time_cp(src: Path, dst: Path) -> tuple[float, float]:
    """(seconds of `cp -r`, seconds of `cp -r` plus the fsync of every copied file)."""
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    copied = time.perf_counter() - start
    files = [str(p) for p in dst.rglob("*") if p.is_file()]
    subprocess.run(["sync", *files], check=True)
    return copied, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=2048, help="total size of the stand-in model")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (cp, role); medians are compared")
    ap.add_argument("--dir", help="work folder (default .cache/bench; same file system for both)")
    ap.add_argument("--smoke", action="store_true", help="32 MB, 1 round: checks the bench runs, not the target")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if args.smoke:
        args.size_mb, args.rounds = 32, 1

    work = workdir(args.dir)
    try:
        src = work / "src" / "model"
        total = make_model(src, args.size_mb << 20)
        read_all(src)
        cp_times, cp_nosync_times, role_times, wall_times = [], [], [], []
        for r in range(args.rounds):
            dst = work / f"cp-{r}"
            nosync, synced = time_cp(src, dst)
            cp_nosync_times.append(nosync)
            cp_times.append(synced)
            shutil.rmtree(dst)
            data_root = work / f"data-{r}"
            wall, res, _ = run_role(work, [{"name": "model", "path": str(src)}], data_root)
            placed = res["placed"]
            if not placed.get("changed") or placed.get("bytes_copied") != total:
                sys.exit(f"the role copied {placed.get('bytes_copied')} bytes, expected {total}: {placed}")
            role_times.append(float(placed["seconds"]))
            wall_times.append(wall)
            placed_dir = data_root / "models" / "model"
            if sorted(p.name for p in placed_dir.iterdir()) != sorted(
                    [p.name for p in src.iterdir()] + [".cla2-manifest.sha256", ".cla2-stamp.json"]):
                sys.exit(f"placed folder {placed_dir} does not hold the source's files")
            shutil.rmtree(data_root)
        cp_s, cp_ns, role_s, wall_s = (statistics.median(x) for x in (cp_times, cp_nosync_times, role_times, wall_times))
        cp_tp, role_tp = total / cp_s, total / role_s
        ratio = role_tp / cp_tp
        print(f"weights_throughput: {human(total)} in {len(list(src.iterdir()))} files, {args.rounds} round(s), medians")
        print(f"  cp -r + fsync       {cp_s:8.2f} s  {human(cp_tp)}/s   (cp -r alone, data left in the page cache:"
              f" {cp_ns:.2f} s, {human(total / cp_ns)}/s, ratio {cp_ns / role_s:.2f})")
        print(f"  model_weights role  {role_s:8.2f} s  {human(role_tp)}/s  (copy + sha256 + fsync + rename;"
              f" whole playbook {wall_s:.1f} s)")
        print(f"  ratio role/cp       {ratio:8.2f}   target >= {TARGET}"
              f"{'' if args.smoke else ('  MET' if ratio >= TARGET else '  NOT MET')}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
