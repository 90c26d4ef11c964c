#!/usr/bin/env bash
# `make test`'s benchmark smoke runs: every benchmark once at a small size, so none of them rots.
# They print their ratios; they fail only on a real error, never on a noisy ratio (full-size runs and
# their results: docs/benchmarks.md). bench/gpu_train.py and bench/gpu_split.py need a CUDA GPU and are not
# run here.
set -euo pipefail
cd "$(dirname "$0")/.."
rt=.venv-runtime/bin/python
ctl=.venv/bin/python
run() { echo "== bench $*"; "$@"; }

run "$rt" bench/merge_memory.py --smoke
run "$rt" bench/convert_memory.py --smoke
run "$rt" bench/train_throughput.py --smoke
run "$rt" bench/serve_throughput.py --smoke
run "$rt" bench/serve_soak.py --smoke   # streaming clients with hang-ups; /health p99, RSS, slots freed (issue 24)
run "$rt" bench/engine_speed.py --smoke   # the engine against a bare transformers loop (issue 15)
run "$rt" bench/eval_speed.py --smoke
run "$rt" bench/gpu_decode.py --smoke   # the decode path of the GPU bench, on a small model on the CPU
run "$rt" bench/plan_memory.py --smoke   # the plan's estimate against the measured peak (ratios only)
run "$ctl" bench/weights_throughput.py --smoke
run "$ctl" bench/weights_rerun.py --smoke
# bench/demo_stages.py times `make demo` itself (`make bench-demo`); the jobs scenario covers its path.
