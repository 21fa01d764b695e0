"""SM clock and board power while a large FP8 GEMM runs back to back: ours vs cuBLAS (torch).

    python scripts/gemm_clocks.py [m n k] [seconds]
A sustained FP8 GEMM on an H100 runs at its power limit, so TFLOP/s depends on the clock each
kernel can hold. This runs each implementation for `seconds` while nvidia-smi samples the SM clock,
power and clock-event reasons every 100 ms, and prints TFLOP/s, mean clock, mean power and the
reasons seen (nvidia-smi's bit mask: 0x4 software power cap, 0x20 / 0x40 thermal slowdown, ...)
per implementation: a kernel that is slower at the same clock does less per cycle; one that is
slower at a lower clock spends more energy per FLOP.
"""
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_ds.ops import fp8_gemm, quantize_fp8


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
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), jnp.float32)
    b = jax.random.normal(kb, (n, k), jnp.float32)
    a8, sa = quantize_fp8(a, block=(1, 128))
    b8, sb = quantize_fp8(b, block=(128, 128))
    reps = 20

    @jax.jit
    def ours(a8, sa, b8, sb):  # reps GEMMs in one executable: one dispatch
        def body(i, acc):
            return acc + fp8_gemm(a8, sa, b8, sb)[0, 0].astype(jnp.float32)
        return jax.lax.fori_loop(0, reps, body, jnp.float32(0))

    samples, stop = [], threading.Event()
    threading.Thread(target=sampler, args=(samples, stop, query()), daemon=True).start()
    time.sleep(0.5)
    phase("ours", lambda: (jax.block_until_ready(ours(a8, sa, b8, sb)), reps)[1],
          2 * m * n * k, seconds, samples)
    time.sleep(2)  # let the clock recover between phases
    try:
        import torch
        ta = torch.from_numpy(np.asarray(a8).view(np.uint8).copy()).cuda().view(torch.float8_e4m3fn)
        tb = torch.from_numpy(np.asarray(b8).view(np.uint8).copy()).cuda().view(torch.float8_e4m3fn)
        tsa = torch.from_numpy(np.asarray(sa).copy()).cuda().t().contiguous().t()
        tsb = torch.from_numpy(np.asarray(sb).copy()).cuda().t()
        fn = lambda: torch._scaled_mm(ta, tb.t(), scale_a=tsa, scale_b=tsb, out_dtype=torch.bfloat16)
        ref = np.asarray(jnp.asarray(fp8_gemm(a8, sa, b8, sb), jnp.float32))
        diff = float(np.abs(fn().float().cpu().numpy() - ref).max() / np.abs(ref).max())
        if diff > 1e-2:  # this torch build reads the scale layout differently: not the same GEMM
            raise RuntimeError(f"torch's result differs from ours (max rel diff {diff:.2e})")

        def torch_once():
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
            return reps
        phase("torch blockwise", torch_once, 2 * m * n * k, seconds, samples)
    except Exception as e:
        print("torch phase failed:", type(e).__name__, e)
    stop.set()


if __name__ == "__main__":
    main(sys.argv[1:])
