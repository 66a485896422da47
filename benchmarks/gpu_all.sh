#!/usr/bin/env bash
# Everything that needs a GPU, in under 6 minutes: the GPU tests, then the GPU step benchmark.
#
#   benchmarks/gpu_all.sh [RESULTS_DIR]    (default: benchmarks/results/gpu-YYYYmmdd-HHMMSS)
#
# Each part runs under its own timeout (tests 220 s, benchmark 110 s) and writes its
# output to RESULTS_DIR: device.log (torch, CUDA, devices), tests.log and junit.xml
# (tests/gpu and the CUDA cases of tests/integration/test_fork.py), gpu_step.log and
# gpu_step.json/.png, and one line per part in summary.txt. Exits 1 if a part failed or
# timed out. Without CUDA the tests skip and the benchmark measures only its CPU figures.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
status=0

run() {  # run NAME LIMIT_S COMMAND...: COMMAND's output to $OUT/NAME.log, a line to summary.txt
  local name=$1 limit=$2 started rc
  shift 2
  started=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $(($(date +%s) - started)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}

run device 30 "$PY" -c 'import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i))'
run tests 220 "$PY" -m pytest -m gpu -v -rsP -p no:cacheprovider --junitxml="$OUT/junit.xml" \
  tests/gpu tests/integration/test_fork.py
run gpu_step 110 "$PY" -m benchmarks.gpu_step --steps 6
for f in gpu_step.json gpu_step.png gpu_step_page_sizes_cpu.json; do
  [ -f "benchmarks/results/$f" ] && cp "benchmarks/results/$f" "$OUT/"
done
echo "results in $OUT"
exit "$status"
