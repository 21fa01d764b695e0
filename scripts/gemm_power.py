"""Sustained FP8 GEMM: ours against torch's blockwise cuBLAS at one shape, with the GPU's SM clock,
power draw and clock-limit reasons sampled by nvidia-smi while each runs.

    python scripts/gemm_power.py 4096 7168 16384 [--seconds 6] [--order ours torch ours]

Each phase calls one implementation back to back for --seconds (inputs rotating over 4 sets,
the host enqueueing far ahead of the GPU at these sizes), and reports its TFLOP/s over the
phase (2mnk x calls / wall) and the mean of the samples taken in the phase's middle 80%:
SM clock (MHz), power (W), temperature (C), and the clock-event reasons seen (nvidia-smi's
`clocks_event_reasons.active` bit mask: 0x4 software power cap, 0x20/0x40 thermal slowdown...).
The question it answers: does one implementation run at a lower clock than the other at the same
shape under the same power limit (then FLOPs per joule, not per cycle, decide the sustained
figure)? Needs a CUDA GPU, the built library and torch.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time

import jax
import numpy as np

from jax_ds.bench._torch_gemm import TorchGemm
from jax_ds.bench.gemm import block_sets
from jax_ds.ops import gemm


def fields():
    """nvidia-smi's query fields (the reasons field was renamed from clocks_throttle_reasons)."""
    for reasons in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
        q = f"clocks.sm,power.draw,temperature.gpu,{reasons}"
        if subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                          capture_output=True).returncode == 0:
            return q
    raise SystemExit("nvidia-smi answers neither clock-reason field")


def sampler(samples, stop, query):
    """nvidia-smi every 50 ms -> samples [(time, sm MHz, W, C, reasons)] until stop is set."""
    proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                             "-lms", "50"], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        parts = [p.strip() for p in line.split(",")]
        try:
            samples.append((time.perf_counter(), float(parts[0]), float(parts[1]),
                            float(parts[2]), int(parts[3], 16)))
        except (ValueError, IndexError):
            pass
        if stop.is_set():
            break
    proc.terminate()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("m", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("k", type=int)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--order", nargs="+", default=["ours", "torch", "ours"],
                    choices=["ours", "torch"])
    args = ap.parse_args(argv)
    m, n, k = args.m, args.n, args.k
    sets = block_sets(m, n, k, 4)
    f = jax.jit(lambda a8, sa, b8, sb: gemm.fp8_gemm(a8, sa, b8, sb, impl="ffi"))
    ref = [np.asarray(jax.block_until_ready(f(*s)), np.float32) for s in sets]

    tg = TorchGemm()
    if tg.torch is None:
        raise SystemExit(f"torch unavailable: {tg.status}")
    torch = tg.torch
    call, layout = next(iter(tg._recipes().values()))  # the recipe `bench gemm` uses on sm90
    tsets = []
    for a8, sa, b8, sb in sets:
        ta, tb, tsa, tsb = (tg._tensor(x) for x in (a8, b8, sa, sb))
        tsets.append((ta, tb, *layout(tsa, tsb)))
    for (ta, tb, tsa, tsb), r in zip(tsets, ref):
        out = call(ta, tb, tsa, tsb).float().cpu().numpy()
        rel = np.abs(out - r).max() / np.abs(r).max()
        if not rel < 1e-2:
            raise SystemExit(f"torch's recipe disagrees with ours (max rel {rel:.2e})")
    torch.cuda.synchronize()

    samples, stop = [], threading.Event()
    thread = threading.Thread(target=sampler, args=(samples, stop, fields()), daemon=True)
    thread.start()
    time.sleep(1.0)
    phases = []
    for impl in args.order:
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            for i in range(4):
                if impl == "ours":
                    out = f(*sets[i])
                else:
                    out = call(*tsets[i])
            calls += 4
            if calls % 64 == 0:  # keep the host at most ~64 calls ahead
                jax.block_until_ready(out) if impl == "ours" else torch.cuda.synchronize()
        jax.block_until_ready(out) if impl == "ours" else torch.cuda.synchronize()
        t1 = time.perf_counter()
        phases.append((impl, t0, t1, calls))
        time.sleep(1.0)
    stop.set()
    thread.join(timeout=2)

    flops = 2.0 * m * n * k
    dev = jax.devices()[0]
    pick = gemm.gemm_config(m, n, k, dev.core_count).key()
    print(f"{m}x{n}x{k}, ours pick {pick}, {dev.device_kind}")
    print(f"{'impl':6s} {'TFLOP/s':>8s} {'calls':>6s} {'SM MHz':>7s} {'W':>6s} {'C':>4s} reasons")
    for impl, t0, t1, calls in phases:
        lo, hi = t0 + 0.1 * (t1 - t0), t1 - 0.1 * (t1 - t0)
        mid = [s for s in samples if lo <= s[0] <= hi]
        if not mid:
            print(f"{impl:6s} no samples")
            continue
        clk, watts, temp = (np.mean([s[j] for s in mid]) for j in (1, 2, 3))
        reasons = sorted({hex(s[4]) for s in mid})
        print(f"{impl:6s} {flops * calls / (t1 - t0) / 1e12:8.0f} {calls:6d} {clk:7.0f} "
              f"{watts:6.0f} {temp:4.0f} {','.join(reasons)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
