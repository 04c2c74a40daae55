#!/usr/bin/env bash
# The GPU check, prepared to fit one 10-minute device call on one H100:
#   1. the suite's CUDA-marked tests (`pytest -m cuda`; they skip without a GPU),
#   2. the engine bench on a random Orpheus-shaped 3B model in bf16 (bench/gpu_bench.py):
#      plain vs draft vs heads, forward cost by rows.
# Usage: [OUT=dir] [PYTHON=python] bench/gpu_check.sh [gpu_bench flags, e.g. --small]
# Results: $OUT/cuda_tests.txt, $OUT/gpu_bench.md, $OUT/gpu_bench.json (OUT defaults to
# bench/results). Exit status: non-zero when either part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-bench/results}
export OUT
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
timeout 240 "$PYTHON" -m pytest -rfEs -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout 300 "$PYTHON" -m bench.gpu_bench --out "$OUT/gpu_bench.json" "$@" 2>&1 | tee "$OUT/gpu_bench.md"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: cuda tests exit $tests_rc, bench exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
