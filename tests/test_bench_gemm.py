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


def test_input_set_count_matches_the_h100_file():
    """bench gemm's input sets per shape (scripts/lib_ab.py times with the same count): as the
    committed H100 run recorded them."""
    import pathlib

    from jax_ds.bench.gemm import SETS, input_set_count
    path = (pathlib.Path(__file__).parent.parent / "benchmarks" / "results"
            / "gemm-nvidia-h100-80gb-hbm3-2026-12-06-tall-192x128.json")
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 19
    for row in rows:
        assert input_set_count(row["m"], row["n"], row["k"]) == row["input_sets"], row["m"]
    assert input_set_count(64, 128, 128) == SETS[1] and input_set_count(8192, 8192, 8192) >= 4
