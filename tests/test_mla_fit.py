"""scripts/mla_fit.py: the per-call cost that does not grow with s_k, on a made-up file whose
times are exactly 20 us + 70 us per 1024 keys, and on the committed H100 run NOTES-mla quotes."""
import json
import pathlib
import subprocess
import sys

from jax_ds.testing import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "mla_fit.py"


def _load():
    return load_script(SCRIPT)


def test_a_straight_line_is_split_exactly():
    rows = [{"h_q": 128, "s_q": 1, "varlen": False, "s_k": s, "flops": 1e9 * s, "bytes": 1,
             "results": {"ours": {"device_us": 20 + 70 * s / 1024}}} for s in (4096, 8192, 16384)]
    ((h, sq, var, pts, per4096, intercept, rate),) = _load().fits(rows)
    assert (h, sq, var) == (128, 1, False) and [s for s, _ in pts] == [4096, 8192, 16384]
    assert abs(per4096 - 280) < 1e-6 and abs(intercept - 20) < 1e-6
    # the slope alone: 1e9 * 16384 FLOP in 70 * 16 us
    assert abs(rate - 1e9 * 16384 / 1e12 / (70 * 16e-6)) < 1e-6


def test_the_h100_run_quoted_in_the_notes():
    path = ROOT / "benchmarks/results/mla-nvidia-h100-80gb-hbm3-2026-12-06-head-7ed7483.json"
    out = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True,
                         text=True, check=True).stdout
    line = next(s for s in out.splitlines() if s.startswith("h128 Sq1 fixed"))
    assert "per 4096 keys 278.6  intercept 41.6  slope alone 524 TFLOP/s" in line
    assert len(json.loads(path.read_text())["rows"]) == 3 * len(out.splitlines())  # three s_k
