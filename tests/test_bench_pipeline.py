"""`python -m jax_ds.bench pipeline`: a CPU smoke run."""
import json

from jax_ds.bench.__main__ import main


def test_bench_pipeline_runs(tmp_path):
    assert main(["pipeline", "--tiny", "--schedules", "1f1b", "--budget", "0.01",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("pipeline-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["schedule"] == "1f1b" and row["pipe"] == 2 and row["step_ms"] > 0
    assert all(row["costs_ms"][k] >= 0 for k in "FBW") and row["costs_ms"]["F"] > 0
    assert row["lockstep_ms"] >= row["simulated_ms"] - 1e-9
