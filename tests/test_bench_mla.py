"""`python -m jax_ds.bench mla`: the grid it times, and a CPU smoke run (ours is n/a on CPU)."""
import argparse
import json

from jax_ds.bench import mla as bench_mla
from jax_ds.bench.__main__ import main


def _args(*argv):
    parser = argparse.ArgumentParser()
    bench_mla.add_arguments(parser)
    return parser.parse_args(argv)


def test_grid_and_its_parts():
    full = bench_mla.shapes(_args())
    assert len(full) == 3 * 4 * 2 * 2  # FlashMLA's grid: s_k x h_q x s_q x fixed/var, b = 128
    assert {(b, s_k, h) for b, s_k, h, *_ in full} == {
        (128, s, h) for s in (4096, 8192, 16384) for h in (16, 32, 64, 128)}
    assert {r[1:3] for r in bench_mla.shapes(_args("--quick"))} == {(4096, 16), (4096, 128)}
    some = bench_mla.shapes(_args("--s-k", "8192", "--h-q", "16", "64"))
    assert {r[1:3] for r in some} == {(8192, 16), (8192, 64)} and len(some) == 8


def test_tiny_run_writes_json(tmp_path):
    assert main(["mla", "--tiny", "--budget", "0.01", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("mla-*-tiny.json")  # a part of the grid: its own file
    result = json.loads(path.read_text())
    assert result["copy_ceiling_gbps"] > 0 and len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["results"]["xla"]["us"] > 0 and "ours" in row["results"]
