#!/usr/bin/env python3
"""Re-run time of placing weights does not grow with their size.

Places stand-in weights with the model_weights role on this machine (local connection; one item from
a folder on the host, like a shared mount, and one sent from the "controller" with rsync, half the
size each), then times re-runs: with 2 GB of weights and with 20 MB. A re-run must change nothing
and read no weight (it compares a stamp of sizes and mtimes), so the ratio stays near 1.
Target (issue 2): re-run time 2 GB / 20 MB <= 1.2.

    bench/weights_rerun.py              2 GB vs 20 MB, 3 re-runs each, prints the ratio
    bench/weights_rerun.py --smoke      64 MB vs 4 MB, 1 re-run each: fails only on real errors
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _weights_common import changed_count, human, make_model, run_role, workdir

TARGET = 1.2


def measure(work: Path, total_mb: int, reruns: int) -> tuple[float, float, int]:
    """(first placement seconds, median re-run seconds, bytes) for total_mb of weights."""
    case = work / f"{total_mb}mb"
    shared = case / "share" / "model-a"
    controller = case / "controller" / "model-b"
    size = make_model(shared, (total_mb << 20) // 2) + make_model(controller, (total_mb << 20) // 2)
    items = [{"name": "model-a", "path": str(shared)}, {"name": "model-b", "src": str(controller)}]
    data_root = case / "data"
    first, _, out = run_role(case, items, data_root)
    if changed_count(out) == 0:
        sys.exit("the first placement changed nothing")
    times = []
    for _ in range(reruns):
        seconds, res, out = run_role(case, items, data_root)
        if changed_count(out) != 0:
            sys.stderr.write(out[-4000:])
            sys.exit(f"a re-run with {total_mb} MB changed something: it must change nothing")
        if res["query"].get("bytes_hashed"):
            sys.exit(f"a re-run read {res['query']['bytes_hashed']} bytes of weights: it must read none")
        times.append(seconds)
    shutil.rmtree(case)
    return first, statistics.median(times), size


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
        s_first, s_rerun, s_size = measure(work, args.small_mb, args.reruns)
        l_first, l_rerun, l_size = measure(work, args.large_mb, args.reruns)
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
