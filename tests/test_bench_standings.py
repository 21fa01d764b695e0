"""`python -m jax_ds.bench standings`: the committed result files against the issues' bars."""
import json
import pathlib

import pytest

from jax_ds.bench import standings
from jax_ds.bench.__main__ import main

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _load(name):
    return json.loads((RESULTS / name).read_text())


def test_h100_gemm_of_2026_12_05():
    """The counts NOTES-gemm quotes for this file (18 of 19 shapes; 8192^3 was cut)."""
    s = standings.summary(standings.standings(
        _load("gemm-nvidia-h100-80gb-hbm3-2026-12-05-partial.json")))
    assert s["ours/torch blockwise >= 1.0"][:2] == (8, 18)
    assert s["ours/XLA dequant >= 1.5 (m >= 128)"][:3] == (11, 12, ["4096x32768x512"])
    assert s["ours/DeepGEMM H800 >= 0.8"][:2] == (6, 9)
    assert s["kernel/DeepGEMM H800 (not a bar)"][:2] == (9, 9)


def test_moe_and_mla_bars():
    moe = standings.summary(standings.standings(_load("moe-nvidia-h200-2026-12-05.json")))
    assert moe["contiguous ours/torch >= 1.0"][:2] == (6, 6)
    assert moe["permute+FP8 XLA time/ours >= 1.5"][:2] == (1, 1)
    mla = standings.summary(standings.standings(_load("mla-nvidia-h200-2026-12-04.json")))
    assert mla["h16 GB/s / copy ceiling >= 0.85"][:2] == (11, 12)
    assert mla["h128 TFLOP/s >= 500"][:2] == (10, 12)
    assert mla["XLA time/ours >= 5"][:2] == (48, 48)


def test_mla_without_the_reference_column():
    """bench mla --no-xla (the fuse A/B of 2026-12-05): the XLA bar is not measured, not short."""
    mla = standings.summary(standings.standings(_load("mla-nvidia-h200-2026-12-05-fuse0-r2.json")))
    assert mla["h16 GB/s / copy ceiling >= 0.85"][:3] == (12, 12, [])
    assert mla["h128 TFLOP/s >= 500"][:3] == (11, 12, ["b128 s4096 h128 sq1 var"])
    passed, measured, short, missing = mla["XLA time/ours >= 5"]
    assert (passed, measured, short, len(missing)) == (0, 0, [], 48)


def test_h100_mla_h128_with_the_slack_of_2026_12_07():
    """The counts NOTES-mla quotes for main with the align slack (h128 only, no XLA column)."""
    mla = standings.summary(standings.standings(
        _load("mla-nvidia-h100-2026-12-07-h128-slack-sq1.json")))
    assert mla["h128 TFLOP/s >= 500"][:3] == (8, 12, [
        "b128 s4096 h128 sq1 fixed", "b128 s4096 h128 sq1 var", "b128 s4096 h128 sq2 var",
        "b128 s8192 h128 sq1 var"])


def test_every_committed_result_reads():
    files = [p for p in sorted(RESULTS.glob("*.json"))
             if isinstance(d := json.loads(p.read_text()), dict)
             and d.get("suite") in standings.CHECKS]
    assert len(files) >= 20
    for path in files:
        data = json.loads(path.read_text())
        checks = standings.standings(data)
        if not checks:  # only a file of rows no bar is about (bench moe --bf16's bf16_rows)
            kinds = {r.get("kind") for r in data.get("rows", [])}
            assert data["suite"] == "moe" and not data.get("routing"), path.name
            assert not kinds & {"contiguous", "masked"}, path.name
            continue
        # a key the reader gets wrong shows as a file with nothing measured
        assert any(ok is not None for *_, ok in checks), path.name
        values = [value for _, _, value, _, _ in checks if value is not None]
        assert all(0 < v < 1e4 for v in values), path.name
    assert main(["standings", *map(str, files)]) == 0


def test_a_missing_column_is_not_a_pass():
    row = {"m": 128, "n": 256, "k": 512, "deepgemm_h800_tflops": 100,
           "results": {"ours": {"tflops": 90.0}, "xla_dequant": {"error": "failed"}}}
    checks = standings.standings({"suite": "gemm", "rows": [row]})
    met = {name: ok for name, _, _, _, ok in checks}
    assert met == {"ours/torch blockwise >= 1.0": None, "ours/XLA dequant >= 1.5 (m >= 128)": None,
                   "ours/DeepGEMM H800 >= 0.8": True}
    assert standings.summary(checks)["ours/torch blockwise >= 1.0"] == (0, 0, [], ["128x256x512"])
    assert standings.summary(checks)["ours/DeepGEMM H800 >= 0.8"] == (1, 1, [], [])
    with pytest.raises(ValueError, match="not a gemm, moe or mla"):
        standings.standings({"suite": "train"})


def test_the_readme_glob_skips_files_that_are_not_results(capsys):
    """`standings benchmarks/results/gemm-*.json` also matches sweeps and A/B files: each is
    skipped with a line, the results are read."""
    files = sorted(RESULTS.glob("gemm-*.json"))
    assert any("sweep" in p.name for p in files)
    assert main(["standings", *map(str, files), str(RESULTS / "no-such-file.json")]) == 0
    out = capsys.readouterr().out
    assert "gemm-tiles-sweep-h100-2026-11-24.json: skipped" in out
    assert "no-such-file.json: skipped (FileNotFoundError" in out
    assert "gemm-nvidia-h100-80gb-hbm3-2026-12-05.json: NVIDIA H100" in out


def test_device_figures_with_a_column_not_run():
    """A column not run (torch absent: {"na": ...}) does not hide the others' device-bound
    figures: ours/XLA-dequant is judged on them."""
    row = {"m": 128, "n": 256, "k": 512, "deepgemm_h800_tflops": None, "results": {
        "ours": {"tflops": 50.0, "device_tflops": 100.0},
        "xla_dequant": {"tflops": 60.0, "device_tflops": 50.0},
        "torch_blockwise": {"na": "torch not importable"}}}
    checks = standings.standings({"suite": "gemm", "rows": [row]})
    value = {name: v for name, _, v, _, _ in checks}
    assert value["ours/XLA dequant >= 1.5 (m >= 128)"] == 2.0
    assert value["ours/torch blockwise >= 1.0"] is None
