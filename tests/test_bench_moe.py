"""`python -m jax_ds.bench moe --bf16` on CPU: both ways of the bf16 expert GEMMs (forward, dgrad
and wgrad) run and agree (the FP8 rows need the kernels: GPU only)."""

import json

import pytest

from jax_ds.bench.__main__ import main


def test_bench_moe_bf16_runs(tmp_path):
    assert main(["moe", "--bf16", "--tiny", "--no-torch", "--sets", "2", "--budget", "0.01",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("moe-*-bf16-tiny.json")
    rows = json.loads(path.read_text())["bf16_rows"]
    assert [r["op"] for r in rows] == ["forward"] * 2 + ["dgrad"] * 2 + ["wgrad"] * 2
    assert [r["rule_takes_windows"] for r in rows if r["op"] != "dgrad"] == [True, False] * 2
    for r in rows:
        assert r["results"]["windows"]["tflops"] > 0 and r["results"]["xla_ragged"]["tflops"] > 0
        assert r["diff"] < 1e-6  # the same float32 sums, in another order


def test_tiny_goes_with_bf16(tmp_path):
    with pytest.raises(SystemExit, match="--tiny goes with --bf16"):
        main(["moe", "--tiny", "--no-torch", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())
