#!/usr/bin/env python3
"""Re-run time of placing weights does not grow with their size.

Places stand-in weights with the model_weights role on this machine (local connection; one item from
a folder on the host, like a shared mount, and one sent from the "controller" with rsync, half the
size each), waits for the writes to reach the disk, then times re-runs, alternating 2 GB of weights
and 20 MB. A re-run must change nothing and read no weight (it compares a stamp of sizes and
mtimes), so the ratio stays near 1. The time is the whole ansible-playbook run.
Target (issue 2): re-run time 2 GB / 20 MB <= 1.2.

    bench/weights_rerun.py              2 GB vs 20 MB, 3 re-runs each, prints the ratio
    bench/weights_rerun.py --smoke      64 MB vs 4 MB, 1 re-run each: fails only on real errors
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _weights_common import changed_count, human, make_model, run_role, workdir

TARGET = 1.2


def setup(work: Path, total_mb: int) -> tuple[Path, list[dict], Path, float, int]:
    """Stand-in weights of total_mb, placed once: (case folder, items, data root, first-run seconds, bytes)."""
    case = work / f"{total_mb}mb"
    shared = case / "share" / "model-a"
    controller = case / "controller" / "model-b"
    size = make_model(shared, (total_mb << 20) // 2) + make_model(controller, (total_mb << 20) // 2)
    items = [{"name": "model-a", "path": str(shared)}, {"name": "model-b", "src": str(controller)}]
    data_root = case / "data"
    first, _, out = run_role(case, items, data_root)
    if changed_count(out) == 0:
        sys.exit("the first placement changed nothing")
    return case, items, data_root, first, size


def rerun(case: Path, items: list[dict], data_root: Path, label: str) -> float:
    seconds, res, out = run_role(case, items, data_root)
    if changed_count(out) != 0:
        sys.stderr.write(out[-4000:])
        sys.exit(f"a re-run with {label} changed something: it must change nothing")
    if res["query"].get("bytes_hashed"):
        sys.exit(f"a re-run with {label} read {res['query']['bytes_hashed']} bytes of weights: it must read none")
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large-mb", type=int, default=2048)
    ap.add_argument("--small-mb", type=int, default=20)
    ap.add_argument("--reruns", type=int, default=3)
    ap.add_argument("--dir", help="work folder (default .cache/bench)")
    ap.add_argument("--smoke", action="store_true", help="64 MB vs 4 MB, 1 re-run: checks the bench runs")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if args.smoke:
        args.large_mb, args.small_mb, args.reruns = 64, 4, 1
    work = workdir(args.dir)
    try:
        small = setup(work, args.small_mb)
        large = setup(work, args.large_mb)
        # Let the writes of the first placements reach the disk, then alternate the re-runs so that
        # the load of a shared machine weighs on both sizes alike.
        subprocess.run(["sync"], check=True)
        s_times, l_times = [], []
        for _ in range(args.reruns):
            s_times.append(rerun(*small[:3], f"{args.small_mb} MB"))
            l_times.append(rerun(*large[:3], f"{args.large_mb} MB"))
        s_first, s_size, l_first, l_size = small[3], small[4], large[3], large[4]
        s_rerun, l_rerun = statistics.median(s_times), statistics.median(l_times)
        ratio = l_rerun / s_rerun
        print(f"weights_rerun: model_weights role on this machine, {args.reruns} re-run(s) each, median")
        print(f"  {human(s_size):>9}: first run {s_first:6.1f} s, re-run {s_rerun:6.2f} s (changed=0)")
        print(f"  {human(l_size):>9}: first run {l_first:6.1f} s, re-run {l_rerun:6.2f} s (changed=0)")
        print(f"  ratio re-run large/small {ratio:5.2f}   target <= {TARGET}"
              f"{'' if args.smoke else ('  MET' if ratio <= TARGET else '  NOT MET')}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
