"""`python -m jax_ds.bench gemm`: a CPU smoke run (the reference as "ours", no torch)."""
import json

import pytest

from jax_ds.bench.__main__ import main
from jax_ds.bench.gemm import DIFF_LIMIT

ARGS = ["gemm", "--shapes", "tiny", "--impl", "xla", "--no-torch", "--budget", "0.01",
        "--repeats", "1"]


def test_bench_gemm_some_m(tmp_path):
    assert main([*ARGS, "--m", "128", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gemm-*-tiny-m128.json")  # a part of the shapes: its own file
    result = json.loads(path.read_text())
    assert result["complete"] and result["m_filter"] == [128]
    assert "xla_flags" in result  # the run's XLA_FLAGS, whatever they are
    (row,) = result["rows"]
    assert (row["m"], row["n"], row["k"]) == (128, 384, 256)
    assert row["diff"] <= DIFF_LIMIT and row["results"]["ours"]["tflops"] > 0


def test_bench_gemm_unknown_m(tmp_path):
    with pytest.raises(SystemExit, match="no 'tiny' shape has m in"):
        main([*ARGS, "--m", "5", "--out", str(tmp_path)])
