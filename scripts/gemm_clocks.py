"""SM clock and board power while a large FP8 GEMM runs back to back: ours vs cuBLAS (torch).

    python scripts/gemm_clocks.py [m n k] [seconds]
A sustained FP8 GEMM on an H100 runs at its power limit, so TFLOP/s depends on the clock each
kernel can hold. This runs each implementation for `seconds` while nvidia-smi samples the SM clock,
power and clock-event reasons every 100 ms, and prints TFLOP/s, mean clock, mean power and the
reasons seen (nvidia-smi's bit mask: 0x4 software power cap, 0x20 / 0x40 thermal slowdown, ...)
per implementation: a kernel that is slower at the same clock does less per cycle; one that is
slower at a lower clock spends more energy per FLOP. Both run as `bench gemm` times them: its
input sets for the shape, ours as its device-bound executable (outputs donated back in), torch
(the benchmark's blockwise recipe, checked against our reference) as a CUDA graph of a call per
set; so the TFLOP/s are comparable with the benchmark's device-bound figures.
"""
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds.bench import _timing
from jax_ds.bench._torch_gemm import TorchGemm
from jax_ds.bench.gemm import block_sets, input_set_count
from jax_ds.ops import fp8_gemm, fp8_gemm_reference

REPS = 4  # repeats of the sets per executable (the benchmark doubles up to 32 as needed)
BATCH = 4  # executables queued per wait


def query():
    """nvidia-smi's fields: SM clock, power, clock-event reasons (renamed from
    clocks_throttle_reasons in newer drivers)."""
    for reasons in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
        q = f"clocks.sm,power.draw,{reasons}"
        if subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                          capture_output=True).returncode == 0:
            return q
    raise SystemExit("nvidia-smi answers neither clock-event-reasons field")


def sampler(samples, stop, fields):
    p = subprocess.Popen(["nvidia-smi", f"--query-gpu={fields}",
                          "--format=csv,noheader,nounits", "-lms", "100"],
                         stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if stop.is_set():
            break
        try:
            clock, power, reasons = (x.strip() for x in line.split(","))
            samples.append((time.perf_counter(), float(clock), float(power), int(reasons, 16)))
        except ValueError:
            continue
    p.kill()


def phase(name, run_once, flops_per_call, seconds, samples):
    run_once()  # warm-up / compile
    t0 = time.perf_counter()
    calls = 0
    while time.perf_counter() - t0 < seconds:
        calls += run_once()
    t1 = time.perf_counter()
    s = [(c, p, r) for t, c, p, r in samples if t0 + 0.5 < t < t1]
    clock = np.mean([c for c, _, _ in s]) if s else float("nan")
    power = np.mean([p for _, p, _ in s]) if s else float("nan")
    reasons = ",".join(sorted({hex(r) for _, _, r in s}))
    print(f"{name}: {flops_per_call * calls / (t1 - t0) / 1e12:.0f} TFLOP/s, SM clock "
          f"{clock:.0f} MHz, power {power:.0f} W, reasons {reasons} ({len(s)} samples)",
          flush=True)


def main(argv):
    m, n, k = (int(x) for x in argv[:3]) if len(argv) >= 3 else (4096, 7168, 16384)
    seconds = float(argv[3]) if len(argv) > 3 else 4.0
    # The benchmark's operands and timing: its input sets for the shape (bench.gemm), ours as
    # its device-bound executable (each set once, REPS times over, outputs donated back in),
    # torch as one CUDA graph of a call per set. (Until 2026-12-06 this script looped one set
    # through a fori_loop, which left the GPU idle between iterations at ~100-us calls.)
    sets = block_sets(m, n, k, input_set_count(m, n, k))
    calls = len(sets) * REPS
    run, _, _ = _timing._compile_launch(lambda *o: fp8_gemm(*o), tuple(sets), REPS, True)

    def ours_once():  # a few executions queued back to back, then one wait
        for _ in range(BATCH):
            out = run(tuple(sets))
        jax.block_until_ready(out)
        return BATCH * calls

    samples, stop = [], threading.Event()
    threading.Thread(target=sampler, args=(samples, stop, query()), daemon=True).start()
    time.sleep(0.5)
    phase("ours", ours_once, 2 * m * n * k, seconds, samples)
    time.sleep(2)  # let the clock recover between phases
    torch_gemm = TorchGemm()

    def torch_phase(call, sets_t):
        graph, outs = _timing.torch_graph(call, sets_t)

        def once():
            for _ in range(BATCH * REPS):
                graph.replay()
            torch_gemm.torch.cuda.synchronize()
            return BATCH * REPS * len(sets_t)

        phase("torch blockwise", once, 2 * m * n * k, seconds, samples)
        del outs, graph
        return {}

    ref = np.asarray(fp8_gemm_reference(*sets[0], out_dtype=jnp.float32))
    cell = torch_gemm.measure("torch_blockwise", [{"block": s} for s in sets], ref, torch_phase)
    if "recipe" not in cell:
        print("torch phase not run:", cell)
    stop.set()


if __name__ == "__main__":
    main(sys.argv[1:])
