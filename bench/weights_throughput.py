#!/usr/bin/env python3
"""Throughput of placing weights with the model_weights role against a plain `cp` of the same files.

Both run on this machine, in the same run, from the same source folder (read once beforehand, so
both read it from the page cache) to the same file system, and both end when the copy is durable:
`cp -r SRC DST && sync DST/*` (fsync of each copied file) against the role, which copies, hashes and
fsyncs each file, several files at once (one per core), then renames the folder into place. The
role's time is the placement module's own time (`seconds` in its result); the playbook's whole wall
time, with Ansible's start-up, is printed beside it. The role is also run one file at a time
(`model_weights_workers: 1`), to show what the parallel files bring. Each starts on a settled disk
(`sync` and a second's pause after the last one's files are removed), and each goes first once in
three rounds, so neither the disk's backlog nor the machine's load favours one. The load average is
printed: sha256 wants a core per file in flight, so other work on the cores slows the role where it
hardly slows cp. Target (issue 2): ratio role / (cp + fsync) >= 0.8.

    bench/weights_throughput.py                 2 GB in 4 shards, 3 rounds, prints the ratio
    bench/weights_throughput.py --shards 2      as a 7B model is shipped (2 shards)
    bench/weights_throughput.py --smoke         32 MB, 1 round: seconds; fails only on real errors
"""

from __future__ import annotations

import argparse
import os
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


def settle() -> None:
    """Let the disk finish what the last contender left (writeback, freed blocks) before the next starts."""
    os.sync()
    time.sleep(1)


def place(work: Path, src: Path, data_root: Path, total: int, workers: int) -> tuple[float, float, int]:
    """Place src with the role; (playbook wall seconds, the module's own seconds, files it ran at once)."""
    wall, res, _ = run_role(work, [{"name": "model", "path": str(src)}], data_root,
                            extra_vars={"model_weights_workers": workers})
    placed = res["placed"]
    if not placed.get("changed") or placed.get("bytes_copied") != total:
        sys.exit(f"the role copied {placed.get('bytes_copied')} bytes, expected {total}: {placed}")
    placed_dir = data_root / "models" / "model"
    if sorted(p.name for p in placed_dir.iterdir()) != sorted(
            [p.name for p in src.iterdir()] + [".cla2-manifest.sha256", ".cla2-stamp.json"]):
        sys.exit(f"placed folder {placed_dir} does not hold the source's files")
    shutil.rmtree(data_root)
    return wall, float(placed["seconds"]), int(placed["workers"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=2048, help="total size of the stand-in model")
    ap.add_argument("--shards", type=int, default=4, help="weight files the size is split into")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (cp, role, role one file at a time); medians")
    ap.add_argument("--dir", help="work folder (default .cache/bench; same file system for both)")
    ap.add_argument("--smoke", action="store_true", help="32 MB, 1 round: checks the bench runs, not the target")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if args.smoke:
        args.size_mb, args.rounds = 32, 1

    work = workdir(args.dir)
    try:
        src = work / "src" / "model"
        total = make_model(src, args.size_mb << 20, shards=args.shards)
        read_all(src)
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {"cp": [], "cp_nosync": [], "role": [], "wall": [], "serial": []}
        contenders = ["cp", "role", "serial"]
        for r in range(args.rounds):
            for key in contenders[r % 3:] + contenders[:r % 3]:  # each goes first once in three rounds
                settle()
                if key == "cp":
                    dst = work / f"cp-{r}"
                    nosync, synced = time_cp(src, dst)
                    times["cp_nosync"].append(nosync)
                    times["cp"].append(synced)
                    shutil.rmtree(dst)
                    continue
                wall, seconds, used = place(work, src, work / f"data-{r}-{key}", total, 0 if key == "role" else 1)
                times[key].append(seconds)
                if key == "role":
                    times["wall"].append(wall)
                    workers = used
        cp_s, cp_ns, role_s, wall_s, serial_s = (statistics.median(times[k])
                                                 for k in ("cp", "cp_nosync", "role", "wall", "serial"))
        cp_tp, role_tp = total / cp_s, total / role_s
        ratio = role_tp / cp_tp
        print(f"weights_throughput: {human(total)} in {len(list(src.iterdir()))} files ({args.shards} shards),"
              f" {args.rounds} round(s), medians; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f}"
              f" after, {len(os.sched_getaffinity(0))} cores")
        print(f"  cp -r + fsync       {cp_s:8.2f} s  {human(cp_tp)}/s   (cp -r alone, data left in the page cache:"
              f" {cp_ns:.2f} s, {human(total / cp_ns)}/s, ratio {cp_ns / role_s:.2f})")
        print(f"  model_weights role  {role_s:8.2f} s  {human(role_tp)}/s  (copy + sha256 + fsync + rename,"
              f" {workers} files at once; whole playbook {wall_s:.1f} s)")
        print(f"  one file at a time  {serial_s:8.2f} s  {human(total / serial_s)}/s  (model_weights_workers: 1;"
              f" ratio to cp {cp_s / serial_s:.2f})")
        print(f"  ratio role/cp       {ratio:8.2f}   target >= {TARGET}"
              f"{'' if args.smoke else ('  MET' if ratio >= TARGET else '  NOT MET')}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
