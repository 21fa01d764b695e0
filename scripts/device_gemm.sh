#!/usr/bin/env bash
# Build, test, sanitize and benchmark the FP8 GEMM on a CUDA machine (no internet needed); on a
# machine of several GPUs, also the LAST issue's runs (steps eptest, ep, epxla, pipeline, train).
#
#   OUT=/path/to/logs scripts/device_gemm.sh [info] [build] [test] [sanitize] [bench] [sweep] [ab]
#                                            [moe] [mla] [cudnnrd] [gaps]
#   OUT=/path/to/logs scripts/device_gemm.sh info build eptest ep epxla pipeline train  # several GPUs
#
# Knobs (environment): BUILD=cmake (skip `pip install -e .`), BENCH_ARGS="--shapes quick" or
# "--m 4096 8192" (a part of the shapes), TEST_WORKERS (pytest-xdist processes, 4; 1 = none),
# TEST_TIMEOUT / SANITIZE_TIMEOUT / BENCH_TIMEOUT / SWEEP_TIMEOUT (seconds; 540 / 240 / 540 / 540),
# EP_ARGS / PIPE_ARGS / TRAIN_ARGS / MOE_ARGS / MLA_ARGS (extra arguments of bench ep / pipeline /
# train / moe / mla),
# SWEEP_ARGS (e.g. "--m 64 128 --split"), AB_ARGS (m n k triples, scripts/gemm_ab.py),
# PYTHON (python3).
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0) on shared multi-GPU hosts.
#
# Run from anywhere; it works in the repo root. No step names = the first five, in that order. Each step
# logs to $OUT/<step>.log; a failing step is reported and the next one still runs. The summary
# (step, ok/FAILED, seconds) comes last, and the exit status is the number of failed steps.
# Benchmark JSON/PNG land in $OUT and are copied to benchmarks/results/.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the source tree, with _C*.so copied in
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"

step_info() {
  nvidia-smi
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "nvidia-cudnn-cu13", "torch",
          "nanobind", "scikit-build-core", "numpy", "ml_dtypes"):
    try:
        print(f"{p:20s} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"{p:20s} (not installed)")
import jax
print("jax devices:", jax.devices())
try:
    import torch
    print("torch", torch.__version__, "CUDA", torch.version.cuda,
          "available", torch.cuda.is_available())
except Exception as e:
    print("torch import failed:", e)
EOF
  command -v nvcc && nvcc --version | tail -2
  cmake --version | head -1
  command -v compute-sanitizer || echo "compute-sanitizer not on PATH"
}

have_c() { "$PY" -c "import jax_ds._C" 2>/dev/null; }

copy_built() {  # newest _C*.so under build/ into jax_ds/ (git ignores *.so)
  local so
  so=$(find build -name '_C*.so' -printf '%T@ %p\n' 2>/dev/null | sort -nr | head -1 |
       cut -d' ' -f2)
  [ -n "$so" ] && cp -v "$so" jax_ds/
}

step_build() {  # BUILD=cmake skips pip (leaves the Python environment untouched)
  local how=""
  if [ "${BUILD:-pip}" != pip ]; then
    echo "### BUILD=${BUILD}: skipping pip install -e ."
  elif "$PY" -m pip install --no-build-isolation --no-deps -v -e . ; then
    if have_c; then how="pip install -e ."; elif copy_built && have_c; then
      how="pip install -e . (+ copied the built _C into jax_ds/)"; fi
  else
    echo "### pip install -e . failed; falling back to cmake"
  fi
  if [ -z "$how" ]; then
    cmake -S . -B build/dev -DPython_EXECUTABLE="$(command -v "$PY")" -DCMAKE_BUILD_TYPE=Release \
      && cmake --build build/dev -j16 && copy_built && have_c && how="cmake build/dev + copy"
  fi
  echo "### build path: ${how:-NONE WORKED}"
  "$PY" -m jax_ds.info
  [ -n "$how" ]
}

step_test() {  # the modules holding GPU tests (the others may import packages the image lacks)
  # 271 tests took ~8 min in one process on the H200, mostly compiles (CPU): with pytest-xdist
  # (on the CUDA image) TEST_WORKERS processes share the GPU, each allocating on demand.
  local par=()
  if "$PY" -c "import xdist" 2>/dev/null && [ "${TEST_WORKERS:-4}" -gt 1 ]; then
    par=(-n "${TEST_WORKERS:-4}")
  fi
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TEST_TIMEOUT:-540}" "$PY" -m pytest -m gpu -q \
    -rs --durations=15 "${par[@]}" $(grep -l "mark.gpu" tests/test_*.py)
}

step_sanitize() {
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 1; }
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \
    timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool memcheck --target-processes all \
    --error-exitcode 3 \
    "$PY" scripts/sanitize_gemm.py || return $?
  # The MoE routing kernels, through their GPU tests (small cases: memcheck is slow).
  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \
    timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool memcheck --target-processes all \
    --error-exitcode 3 \
    "$PY" -m pytest -m gpu -q -x tests/test_moe_routing.py -k "333 or 1-1-1 or gradients"
}

# python -m jax_ds.bench <suite> [args] with BENCH_TIMEOUT; its JSON/PNG land in $OUT and are
# copied to benchmarks/results/. The status is the benchmark's.
run_bench() {
  local suite=$1; shift
  timeout "${BENCH_TIMEOUT:-540}" "$PY" -m jax_ds.bench "$suite" --out "$OUT" "$@"
  local rc=$?
  mkdir -p benchmarks/results
  cp -v "$OUT/$suite"-*.json "$OUT/$suite"-*.png benchmarks/results/ 2>/dev/null
  return $rc
}

step_bench() { run_bench gemm ${BENCH_ARGS:-}; }

step_eptest() {  # the multi-GPU EP tests: ragged all_to_all, per assignment and per token
  nvidia-smi topo -m || true
  timeout "${TEST_TIMEOUT:-540}" "$PY" -m pytest -m gpu -q -rs tests/test_expert.py
}

step_ep() { run_bench ep ${EP_ARGS:-}; }

# XLA's other implementations of ragged-all-to-all (the exchange of `ours` on GPU), one process
# each, the largest EP only, JSON tagged with the variant (XLA_FLAGS is in the JSON too). The
# flags exist in jaxlib 0.11.2 (benchmarks/NOTES-multigpu.md: what each selects); step ep is the
# default (one-shot kernel, NCCL barrier). A variant that fails is logged and the next one runs.
EPXLA_VARIANTS=(
  "peer-oneshot|--xla_gpu_experimental_ragged_all_to_all_use_barrier_with_nccl=false"
  "nccl-sendrecv|--xla_gpu_unsupported_use_ragged_all_to_all_one_shot_kernel=false --xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true"
  "device-kernel|--xla_gpu_experimental_ragged_all_to_all_use_device_kernel=true --xla_enable_nccl_symmetric_buffers_for_collectives=RaggedAllToAll --xla_gpu_unsupported_use_ragged_all_to_all_one_shot_kernel=false"
)
step_epxla() {
  local n rc=0 v name flags
  n=$("$PY" -c "import jax; print(jax.device_count())") || return $?
  [ "$n" -ge 2 ] || { echo "epxla: $n device(s); needs 2 or more"; return 1; }
  for v in "${EPXLA_VARIANTS[@]}"; do
    name=${v%%|*}; flags=${v#*|}
    echo "--- $name: $flags"
    XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flags" BENCH_TIMEOUT=${EPXLA_TIMEOUT:-240} \
      run_bench ep --ep "$n" --contestants ours ours_dedup --tag "xla-$name" ${EP_ARGS:-} \
      || { echo "--- $name: FAILED ($?)"; rc=1; }
  done
  return $rc
}

step_pipeline() { run_bench pipeline ${PIPE_ARGS:-}; }

# The whole model's training step on data x expert (tokens/s; the profiler traces, kept under
# $OUT/train-trace, give the share of the all-to-all under compute).
step_train() { run_bench train --trace-dir "$OUT/train-trace" ${TRAIN_ARGS:-}; }

step_sweep() {  # every tile x cluster size on the benchmark shapes (kernel times) -> $OUT/sweep.json
  OUT="$OUT" timeout "${SWEEP_TIMEOUT:-540}" "$PY" scripts/sweep_gemm.py ${SWEEP_ARGS:-}
}

step_ab() {  # sustained A/B: gemm_config's pick against 128x128 pairs without split
  timeout "${SWEEP_TIMEOUT:-540}" "$PY" scripts/gemm_ab.py ${AB_ARGS:-}
}

step_moe() { run_bench moe ${MOE_ARGS:-}; }  # grouped GEMM + routing benchmark (GPU 2)

step_mla() { run_bench mla ${MLA_ARGS:-}; }  # MLA decode benchmark (GPU 3)

# XLA's cuDNN ragged-dot fusion (flag xla_gpu_experimental_use_ragged_dot_fusion; NOTES-moe) off
# and on: whether the compiled 8-group ragged dot holds a cuDNN call, then `bench moe --bf16
# --quick` under each (JSON in $OUT/ragged-dot-fusion-{false,true}/; the cuDNN version: step info).
step_cudnnrd() {
  local f flags rc=0
  for f in false true; do
    flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_experimental_use_ragged_dot_fusion=$f"
    echo "--- $flags"
    XLA_FLAGS="$flags" "$PY" - <<'EOF' || rc=1
import jax, jax.numpy as jnp
x = jax.ShapeDtypeStruct((8192, 7168), jnp.bfloat16)
w = jax.ShapeDtypeStruct((8, 7168, 4096), jnp.bfloat16)
g = jax.ShapeDtypeStruct((8,), jnp.int32)
hlo = jax.jit(jax.lax.ragged_dot).lower(x, w, g).compile().as_text()
print("compiled ragged dot: cudnn mentions", hlo.count("cudnn"), "custom-calls",
      hlo.count("custom-call("), "dots", hlo.count(" dot("))
EOF
    XLA_FLAGS="$flags" timeout "${BENCH_TIMEOUT:-540}" "$PY" -m jax_ds.bench moe --bf16 --quick \
      --out "$OUT/ragged-dot-fusion-$f" ${MOE_ARGS:-} || rc=1
  done
  return $rc
}

# The short shapes' time between calls (scripts/gemm_gaps.py), the device-bound executable's
# outputs fresh (new buffers each execution: XLA re-records its CUDA graph) and then in place
# (donated back in, as bench's device-bound timing now runs them).
step_gaps() {
  local o rc=0
  for o in fresh in-place; do
    echo "--- JAX_DS_BENCH_OUTPUTS=$o"
    JAX_DS_BENCH_OUTPUTS=$o timeout "${SWEEP_TIMEOUT:-540}" "$PY" scripts/gemm_gaps.py || rc=1
  done
  return $rc
}

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(info build test sanitize bench)
SUMMARY=()
FAILED=0
for step in "${STEPS[@]}"; do
  if ! declare -F "step_$step" >/dev/null; then
    echo "unknown step '$step' (steps: $(declare -F | sed -n 's/^declare -f step_//p' | tr '\n' ' '))"
    SUMMARY+=("$step|unknown|0"); FAILED=$((FAILED + 1)); continue
  fi
  echo "=================== $step ==================="
  start=$(date +%s)
  "step_$step" 2>&1 | tee "$OUT/$step.log"
  rc=$?
  secs=$(($(date +%s) - start))
  if [ $rc -eq 0 ]; then status=ok; else status="FAILED (rc $rc)"; FAILED=$((FAILED + 1)); fi
  SUMMARY+=("$step|$status|$secs")
done

echo
echo "=================== summary ($OUT) ==================="
printf '%-10s %-16s %8s\n' step result seconds
for line in "${SUMMARY[@]}"; do
  IFS='|' read -r s r t <<<"$line"
  printf '%-10s %-16s %8s\n' "$s" "$r" "$t"
done | tee "$OUT/summary.txt"
exit $FAILED
