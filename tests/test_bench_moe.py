"""`python -m jax_ds.bench moe --wgrad` on CPU: both ways of the expert wgrad run and agree (the
GEMM rows need the kernels: GPU only)."""

import json

from jax_ds.bench.__main__ import main


def test_bench_moe_wgrad_runs(tmp_path):
    assert main(["moe", "--wgrad", "--tiny", "--no-torch", "--sets", "2", "--budget", "0.01",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("moe-*-wgrad-tiny.json")
    rows = json.loads(path.read_text())["wgrad_rows"]
    assert [r["rule_takes_windows"] for r in rows] == [True, False]
    for r in rows:
        assert r["results"]["windows"]["tflops"] > 0 and r["results"]["xla_ragged"]["tflops"] > 0
        assert r["diff"] < 1e-6  # the same float32 sums, in another order
