"""EPLB planner, property tests (hypothesis): any loads, ties and zeros included, give a valid
plan, the one the plain-loop reference gives."""

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("hypothesis")  # a test extra; the example-based tests run without it
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jax_ds.parallel.eplb import rebalance_experts, rebalance_experts_reference  # noqa: E402
from test_eplb import CONFIGS, check_plan  # noqa: E402  (tests/ is on sys.path)


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), config=st.sampled_from(CONFIGS[:5]), integer=st.booleans())
def test_property_same_plan_as_reference(data, config, integer):
    """Any loads >= 0, ties and zeros included: the reference's plan, and a valid one."""
    layers, e, r, groups, nodes, gpus = config
    if integer:
        values = st.integers(0, 5)
    else:  # no subnormals: XLA:CPU flushes them to zero, numpy does not
        values = st.one_of(st.just(0.0), st.floats(float(np.float32(1e-3)), 1e6, width=32))
    w = np.array(data.draw(st.lists(values, min_size=layers * e, max_size=layers * e)),
                 np.float32).reshape(layers, e)  # float32 either way: compiled once per config
    plan = rebalance_experts(jnp.asarray(w), r, groups, nodes, gpus)
    check_plan(plan, w, r)
    for ours, ref in zip(plan, rebalance_experts_reference(w, r, groups, nodes, gpus)):
        np.testing.assert_array_equal(ours, ref)
