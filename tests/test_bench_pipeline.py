"""`python -m jax_ds.bench pipeline`: its lockstep prediction, and a CPU smoke run."""
import json

import pytest

from jax_ds.bench import pipeline as bench_pipeline
from jax_ds.bench.__main__ import main
from jax_ds.parallel.pipeline import Costs, compile_tables, make_schedule, simulate


@pytest.mark.parametrize("name,pp,m", [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8),
                                       ("dualpipev", 4, 8), ("1f1b", 3, 5)])
def test_lockstep_is_the_tick_clock_and_never_beats_the_simulator(name, pp, m):
    schedule = make_schedule(name, pp, m)
    # Equal op costs: every tick costs one op, so the lockstep clock is the tick count.
    if name == "1f1b":   # its ops are F and full backwards only
        assert bench_pipeline.lockstep_makespan(schedule, Costs(F=1, B=1, W=0)) == \
            compile_tables(schedule).num_ticks
    # Any costs: the lockstep run is one feasible execution of the same per-rank order, and the
    # event-driven simulation starts every op as early as possible.
    for costs in (Costs(F=1, B=2, W=1), Costs(F=1.3, B=2.9, W=0.7), Costs(F=2, B=2, W=0.1)):
        lock = bench_pipeline.lockstep_makespan(schedule, costs)
        assert lock >= simulate(schedule, costs).makespan - 1e-9


def test_bench_pipeline_runs(tmp_path):
    assert main(["pipeline", "--tiny", "--schedules", "1f1b", "--budget", "0.01",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("pipeline-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["schedule"] == "1f1b" and row["pipe"] == 2 and row["step_ms"] > 0
    assert all(row["costs_ms"][k] >= 0 for k in "FBW") and row["costs_ms"]["F"] > 0
    assert row["lockstep_ms"] >= row["simulated_ms"] - 1e-9
