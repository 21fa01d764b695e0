#!/usr/bin/env bash
# The LAST issue's runs on a multi-GPU machine (nvidia-h200-x2/x4/x8), in one device call:
# build, the multi-GPU tests, `bench ep`, `bench pipeline`. Logs and JSON go to $OUT (and the JSON
# to benchmarks/results/). NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
#
#   OUT=/path/to/logs scripts/device_multigpu.sh [build] [test] [ep] [pipeline]
#
# Knobs (environment): TEST_TIMEOUT / EP_TIMEOUT / PIPE_TIMEOUT (seconds; 240 / 300 / 300),
# EP_ARGS / PIPE_ARGS (extra arguments), PYTHON (python3). No step names = all four, in order.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"

step_build() {
  nvidia-smi --query-gpu=index,name,driver_version --format=csv
  nvidia-smi topo -m || true
  "$PY" -m pip install --no-build-isolation --no-deps -q -e . && "$PY" -m jax_ds.info
}
step_test() {
  timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -m gpu -q -rs tests/test_expert.py
}
step_ep() {
  timeout "${EP_TIMEOUT:-300}" "$PY" -m jax_ds.bench ep --out "$OUT" ${EP_ARGS:-}
}
step_pipeline() {
  timeout "${PIPE_TIMEOUT:-300}" "$PY" -m jax_ds.bench pipeline --out "$OUT" ${PIPE_ARGS:-}
}

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build test ep pipeline)
FAILED=0
for step in "${STEPS[@]}"; do
  declare -F "step_$step" >/dev/null || { echo "unknown step '$step'"; FAILED=$((FAILED + 1)); continue; }
  echo "=================== $step ==================="
  start=$(date +%s)
  "step_$step" 2>&1 | tee "$OUT/$step.log"
  rc=$?
  echo "### $step: rc $rc, $(($(date +%s) - start)) s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || FAILED=$((FAILED + 1))
done
mkdir -p benchmarks/results && cp -v "$OUT"/ep-*.json "$OUT"/pipeline-*.json benchmarks/results/ 2>/dev/null
exit $FAILED
