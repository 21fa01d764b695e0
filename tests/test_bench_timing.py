"""The benchmark harness's device-bound timing: repeated calls in one executable stay separate
calls (nothing merged by XLA), and the timing reports them per call."""
import json

import jax
import jax.numpy as jnp
import pytest

from jax_ds.bench import _timing


def _dots(fn, sets) -> int:
    return _timing.kernel_ops(jax.jit(fn).lower(sets).compile())


def test_repeated_calls_are_not_merged():
    sets = tuple((jax.random.normal(jax.random.key(i), (64, 64)),) for i in range(2))
    mul = lambda x: x @ x.T
    many = _timing.repeated_calls(mul, 3)
    # Without the barrier XLA merges the repeats.
    assert _dots(lambda s: [[mul(*a) for a in s] for _ in range(3)], sets) == 2
    dots = _dots(many, sets)
    # With it, 6 (jax >= 0.11); jax 0.10.2's XLA:CPU drops the barrier before CSE: 2, and
    # time_jax_launch must notice it (below).
    assert dots in (6, 2)
    outs = jax.jit(many)(sets)
    assert len(outs) == 3 and all(len(o) == 2 for o in outs)
    for o in outs:
        for (x,), y in zip(sets, o):
            assert jnp.allclose(y, x @ x.T)
    if dots == 2:
        with pytest.warns(RuntimeWarning, match="XLA merged repeated calls"):
            t = _timing.time_jax_launch(mul, list(sets), budget_s=0.01, repeats=1)
        assert t.calls % len(sets) == 0 and t.calls // len(sets) >= 1


def test_time_jax_launch_stops_when_repeats_merge(monkeypatch):
    """An executable whose repeats XLA merged (fewer dots than repeats x one) ends the doubling
    with a warning, and the timing of the last honest executable comes back."""
    seen = []

    def fake_time_jax(fn, arg_sets, **kwargs):
        seen.append(len(fn(*arg_sets[0])))
        return _timing.Timing(1.0, 1.0, 1, 1)

    monkeypatch.setattr(_timing, "time_jax", fake_time_jax)
    monkeypatch.setattr(_timing, "kernel_ops", lambda compiled: 2)  # never more than one repeat's
    sets = [(jnp.full((4, 4), float(i)),) for i in range(2)]
    with pytest.warns(RuntimeWarning, match="XLA merged repeated calls"):
        t = _timing.time_jax_launch(lambda x: x @ x, sets, max_reps=16)
    assert seen == [1, 2] and t.median_s == 1.0 / len(sets)


def test_kernel_ops_counts_dots():
    sets = tuple((jnp.ones((8, 8)) * i,) for i in range(3))
    compiled = jax.jit(lambda s: [x @ x for (x,) in s]).lower(sets).compile()
    assert _timing.kernel_ops(compiled) == 3


def test_time_jax_launch_per_call():
    sets = [(jnp.full((8,), float(i)),) for i in range(4)]
    t = _timing.time_jax_launch(lambda x: x * 2 + 1, sets, budget_s=0.02, repeats=2, max_reps=8)
    assert t.median_s > 0 and t.min_s <= t.median_s
    assert t.calls % len(sets) == 0 and t.repeats == 2


@pytest.mark.parametrize("host_s,want_reps", [(1.0, 16), (1e-3, 2), (0.0, 1)])
def test_time_jax_launch_doubles_repeats_while_dispatch_shows(monkeypatch, host_s, want_reps):
    """With an executable costing host_s + (calls in it) x 10 ms, the repeats double while the
    time per call falls by more than 10%, and the time per call of the repeats chosen comes
    back."""
    device_s, seen = 0.01, []

    def fake_time_jax(fn, arg_sets, **kwargs):
        reps = len(fn(*arg_sets[0]))   # the executable returns one list per repeat
        seen.append(reps)
        total = host_s + reps * len(sets) * device_s
        return _timing.Timing(total, total, 1, 1)

    monkeypatch.setattr(_timing, "time_jax", fake_time_jax)
    sets = [(jnp.full((4,), float(i)),) for i in range(2)]
    t = _timing.time_jax_launch(lambda x: x + 1, sets, max_reps=16)
    assert seen == [1, 2, 4, 8, 16][:len(seen)] and max(seen) <= 16
    assert t.median_s == (host_s + want_reps * len(sets) * device_s) / (want_reps * len(sets))


@pytest.mark.gpu
def test_span_jax_launch_is_the_devices_time():
    """The GPU span per call of the device-bound executable: positive, at most its wall time per
    call (which adds the host's work), and at least the kernels' own time (which leaves out the
    gaps between them)."""
    from jax_ds.bench import _profile

    sets = [(jnp.full((1024, 1024), float(i + 1), jnp.float32),) for i in range(4)]
    fn = jax.jit(lambda x: x @ x)
    span = _timing.span_jax_launch(fn, sets, reps=4)
    wall = _timing.time_jax_launch(fn, sets, budget_s=0.05, repeats=3, max_reps=4)
    kernels = _profile.device_time_jax(fn, sets, calls=16)
    assert 0 < 0.9 * kernels <= span <= 1.1 * wall.median_s


def test_aliased_outputs_counts_donated_outputs():
    x = jnp.ones((8, 8))
    plain = jax.jit(lambda a, b: (a @ a, a + 1)).lower(x, x).compile()
    assert _timing.aliased_outputs(plain) == 0
    donated = jax.jit(lambda a, b: (a @ a, a + 1), donate_argnums=1,
                      keep_unused=True).lower(x, x).compile()
    assert _timing.aliased_outputs(donated) == 1  # one donated [8, 8] buffer for two outputs


def test_in_place_launch_writes_into_the_same_buffers():
    """The in-place executable aliases every output to a donated buffer (no copies added: as
    many as the same executable with fresh outputs has, none from jax 0.11 on; jax 0.10.2's
    XLA:CPU copies the second repeat's outputs in both), and call after call returns the right
    values in buffers it was handed."""
    sets = tuple((jax.random.normal(jax.random.key(i), (32, 32)),) for i in range(3))
    fn = lambda x: (x @ x.T, jnp.sum(x, axis=0))
    call, compiled, placed = _timing._compile_launch(fn, sets, 2, True)
    assert placed and _timing.aliased_outputs(compiled) == 2 * 3 * 2
    fresh = jax.jit(_timing.repeated_calls(fn, 2)).lower(sets).compile()
    assert compiled.as_text().count(" copy(") == fresh.as_text().count(" copy(")
    if jax.__version_info__ >= (0, 11):
        assert compiled.as_text().count(" copy(") == 0
    first = call.outs
    for _ in range(3):
        handed = call.outs
        outs = call(sets)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(handed))
        for rep in outs:
            for (x,), (y, s) in zip(sets, rep):
                assert jnp.allclose(y, x @ x.T, atol=1e-5) and jnp.allclose(s, x.sum(0))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(first))


def test_in_place_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(_timing, "aliased_outputs", lambda compiled, text=None: 0)
    sets = tuple((jnp.full((4, 4), float(i)),) for i in range(2))
    _timing.reset_fell_back()

    def double(x):
        return x * 2

    with pytest.warns(RuntimeWarning, match="aliased 0 of 2 outputs"):
        call, _, placed = _timing._compile_launch(double, sets, 1, True)
    assert not placed and jnp.allclose(call(sets)[0][1], 2.0)
    assert _timing.fell_back() == ["double"]


def test_result_file_lists_fresh_fallbacks(tmp_path):
    """A suite's result file names the functions timed with fresh outputs after in place failed;
    environment() (a suite's start) forgets the last suite's."""
    from jax_ds.bench import environment, write_json

    env = environment()
    path = write_json(tmp_path, "t", env, {})
    assert "bench_outputs_fell_back" not in json.loads(path.read_text())
    _timing._FELL_BACK.append("double")
    assert json.loads(write_json(tmp_path, "t", env, {}).read_text())[
        "bench_outputs_fell_back"] == ["double"]
    environment()
    assert _timing.fell_back() == []


@pytest.mark.parametrize("env,want", [(None, True), ("in-place", True), ("fresh", False)])
def test_time_jax_launch_outputs_env(monkeypatch, env, want):
    if env is None:
        monkeypatch.delenv(_timing.OUTPUTS_ENV, raising=False)
    else:
        monkeypatch.setenv(_timing.OUTPUTS_ENV, env)
    sets = [(jnp.full((8,), float(i)),) for i in range(2)]
    t = _timing.time_jax_launch(lambda x: x * 2 + 1, sets, budget_s=0.01, repeats=1, max_reps=2)
    assert t.in_place is want


def test_outputs_env_rejects_other_values(monkeypatch):
    monkeypatch.setenv(_timing.OUTPUTS_ENV, "inplace")
    with pytest.raises(ValueError, match="JAX_DS_BENCH_OUTPUTS"):
        _timing.outputs_in_place()


def test_in_place_launch_on_a_mesh():
    """Sharded inputs: the donated buffers are laid out as the outputs are, so they alias."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.make_mesh((2,), ("expert",), devices=jax.devices()[:2])
    f = jax.shard_map(lambda a: a * 2, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))
    sets = tuple((jax.device_put(jnp.full((4, 3), float(i)), NamedSharding(mesh, P("expert"))),)
                 for i in range(2))
    call, compiled, placed = _timing._compile_launch(f, sets, 2, True)
    assert placed and _timing.aliased_outputs(compiled) == 4
    assert jnp.allclose(call(sets)[1][1], 2.0)


def test_outputs_copied_into_donated_buffers_fall_back(monkeypatch):
    """Copies under the ROOT that fresh outputs do not need (an input returned as it is is copied
    either way) would add GPU work per call: then the launch warns and takes fresh outputs."""
    sets = tuple((jnp.full((16, 16), float(i)),) for i in range(2))
    _, compiled, placed = _timing._compile_launch(lambda x: x, sets, 1, True)
    assert placed and _timing.root_copies(compiled) == 2  # as many as with fresh outputs
    _, compiled, placed = _timing._compile_launch(lambda x: (x @ x, x.T * 2), sets, 1, True)
    assert placed and _timing.root_copies(compiled) == 0  # the transpose is the function's own
    counts = iter([2, 0])  # in place, then fresh
    monkeypatch.setattr(_timing, "root_copies", lambda compiled, text=None: next(counts))
    with pytest.warns(RuntimeWarning, match="copying 2 more into them than into fresh ones"):
        call, _, placed = _timing._compile_launch(lambda x: x @ x, sets, 1, True)
    assert not placed and jnp.allclose(call(sets)[0][1], 16.0)
