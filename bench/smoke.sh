#!/usr/bin/env bash
# `make test`'s benchmark smoke runs: every benchmark once at a small size, so none of them rots.
# They print their ratios; they fail only on a real error, never on a noisy ratio (full-size runs and
# their results: docs/benchmarks.md). GPU benchmarks (bench/gpu_*.py) need a CUDA GPU and are not run here.
set -euo pipefail
cd "$(dirname "$0")/.."
rt=.venv-runtime/bin/python
ctl=.venv/bin/python
run() { echo "== bench $*"; "$@"; }

run "$rt" bench/merge_memory.py --smoke
run "$rt" bench/train_throughput.py --smoke
run "$ctl" bench/weights_throughput.py --smoke
run "$ctl" bench/weights_rerun.py --smoke
for extra in serve_throughput eval_speed demo_stages; do
  if [ -f "bench/$extra.py" ]; then
    py=$rt; [ "$extra" = demo_stages ] && py=$ctl
    run "$py" "bench/$extra.py" --smoke
  fi
done
