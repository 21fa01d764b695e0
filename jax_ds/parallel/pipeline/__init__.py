"""Pipeline parallelism: schedules as data, an event simulator, and an SPMD executor.

  schedules  `one_f_one_b`, `zb1p`, `dualpipe`, `dualpipev` -> `Schedule` (per-rank op lists)
  simulator  `simulate(schedule, costs)` -> makespan, bubble, peak live activations per rank
  split      `StageSplit`: a stage's backward cut into B (input grads) and W (weight grads)
  tables     a schedule compiled into static per-tick tables
  executor   `run(schedule, stage_fn, params, batch, loss_fn, mesh)` -> (loss, grads): one
             jitted shard_map program over the `pipe` axis
"""

from jax_ds.parallel.pipeline.executor import PipelineOutput, execute, run
from jax_ds.parallel.pipeline.schedules import (SCHEDULES, Chunk, Op, Schedule, dualpipe, dualpipev,
                                                make_schedule, one_f_one_b, zb1p)
from jax_ds.parallel.pipeline.simulator import (Costs, SimResult, readme_bubble, simulate,
                                                timeline)
from jax_ds.parallel.pipeline.split import StageSplit
from jax_ds.parallel.pipeline.tables import Tables, compile_tables

__all__ = [
    "SCHEDULES", "Chunk", "Costs", "Op", "PipelineOutput", "Schedule", "SimResult", "StageSplit",
    "Tables", "compile_tables", "dualpipe", "dualpipev", "execute", "make_schedule",
    "one_f_one_b", "readme_bubble", "run", "simulate", "timeline", "zb1p",
]
