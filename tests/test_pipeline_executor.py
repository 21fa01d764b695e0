"""The SPMD pipeline executor against a single-device micro-batch loop (DualPipe's test recipe).

Every schedule, on 2, 4 and 8 pipe ranks of the 8 virtual CPU devices (the rest of the devices on
`data` or `expert`, splitting each micro-batch; one test on a 4-device mesh): the loss and every gradient equal jax.grad of the
sequential model -- in float64 to 1e-12 on an MLP stack, in float32 to 1e-5 on the tiny
DeepSeek-MoE blocks. Also: B really leaves the weight gradients to W (HLO cost analysis), the
buffers' peak equals the simulator's, and compile time does not grow with micro-batches.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ds.models import DeepSeekConfig, DeepSeekMoE, RMSNorm
from jax_ds.parallel.mesh import DATA, EXPERT, make_mesh
from jax_ds.parallel.pipeline import StageSplit, execute, make_schedule, run, simulate
from jax_ds.parallel.pipeline import executor
from jax_ds.testing import calc_diff

D, H, MB = 8, 16, 4


def mlp_stage(p, x):
    return x + jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def mse(y, target):
    return jnp.mean((y - target) ** 2)


def head_mse(head, y, target):
    return jnp.mean((y @ head["w"] - target) ** 2)


def normal(rng, shape, dtype, scale=1.0):
    # numpy draws: no per-shape XLA compile, as jax.random would cost in eager mode.
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def mlp_problem(num_stages, m, dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w1": normal(rng, (num_stages, D, H), dtype, 1 / 3),
              "b1": normal(rng, (num_stages, H), dtype),
              "w2": normal(rng, (num_stages, H, D), dtype, 1 / 4)}
    batch = (normal(rng, (m, MB, D), dtype), normal(rng, (m, MB, D), dtype))
    head = {"w": normal(rng, (D, D), dtype)}
    return params, batch, head


def reference(stage_fn, loss_fn, params, inputs, targets, loss_params=None):
    """The oracle, DualPipe's recipe: a single-device loop over micro-batches, every micro-batch
    through every stage, mean of the losses. Returns (loss, d/d params, d/d loss_params,
    d/d inputs). One jitted micro-batch step (a scan over the stages) serves all micro-batches."""
    m = jax.tree.leaves(inputs)[0].shape[0]

    def one(params, loss_params, x, t):
        x, _ = jax.lax.scan(lambda x, p: (stage_fn(p, x), None), x, params)
        return (loss_fn(x, t) if loss_params is None else loss_fn(loss_params, x, t)) / m

    step = jax.jit(jax.value_and_grad(one, argnums=(0, 1, 2)))
    total, grads, loss_grads, input_grads = 0.0, None, None, []
    for i in range(m):
        loss, (g, lg, dx) = step(params, loss_params, *(jax.tree.map(lambda a: a[i], b)
                                                        for b in (inputs, targets)))
        total += loss
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        loss_grads = lg if loss_grads is None else jax.tree.map(jnp.add, loss_grads, lg)
        input_grads.append(dx)
    return total, grads, loss_grads, jax.tree.map(lambda *a: jnp.stack(a), *input_grads)


def split_batch(batch, mesh, axis):
    """Micro-batch rows split over `axis` (data or expert), replicated over pipe."""
    return jax.device_put(batch, NamedSharding(mesh, P(None, axis)))


def assert_close(got, want, tol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert calc_diff(a, b) < tol, (jax.tree_util.keystr(path), calc_diff(a, b))


CASES = [(name, pp, m) for name, sizes in (
    ("1f1b", ((2, 3), (4, 6), (8, 8))), ("zb1p", ((2, 3), (4, 6), (8, 8))),
    ("dualpipe", ((2, 4), (4, 8), (8, 16))), ("dualpipev", ((2, 4), (4, 8), (8, 16))))
    for pp, m in sizes]


@pytest.mark.parametrize("name, pp, m", CASES)
def test_exact_float64(name, pp, m):
    """pipe x data: loss and gradients to 1e-12, and the peak of live chunks."""
    with jax.enable_x64(True):
        schedule = make_schedule(name, pp, m)
        mesh = make_mesh(pipe=pp, data=8 // pp)
        params, batch, _ = mlp_problem(schedule.num_stages, m, jnp.float64)
        out = execute(schedule, mlp_stage, params, split_batch(batch, mesh, DATA), mse, mesh)
        ref_loss, ref_grads, _, _ = reference(mlp_stage, mse, params, *batch)
        assert out.loss.dtype == jnp.float64
        assert abs(float(out.loss) - float(ref_loss)) < 1e-12
        assert_close(out.grads, ref_grads, 1e-12)
        assert list(np.asarray(out.peak_chunks)) == simulate(schedule).peak_activations


def test_loss_params_and_input_grads():
    """An output head's gradients and d loss / d inputs (an embedding outside the pipeline), on a
    4-device mesh."""
    with jax.enable_x64(True):
        schedule = make_schedule("dualpipe", 4, 8)
        mesh = make_mesh(pipe=4, devices=jax.devices()[:4])
        params, batch, head = mlp_problem(4, 8, jnp.float64, seed=1)
        out = execute(schedule, mlp_stage, params, batch, head_mse, mesh, loss_params=head,
                      input_grads=True)
        ref_loss, g_params, g_head, g_inputs = reference(mlp_stage, head_mse, params, *batch,
                                                         loss_params=head)
        assert abs(float(out.loss) - float(ref_loss)) < 1e-12
        assert_close(out.grads, g_params, 1e-12)
        assert_close(out.loss_grads, g_head, 1e-12)
        assert calc_diff(out.input_grads, g_inputs) < 1e-12


def test_bfloat16_everywhere():
    """A bf16 model, head and loss on pipe x data: the loss, the head's and the inputs'
    gradients (the sums over the pipe axis; XLA:CPU aborted compiling them in bf16) come back
    in bf16 and match the float32 run."""
    schedule = make_schedule("1f1b", 2, 4)
    mesh = make_mesh(pipe=2, data=4)
    params, batch, head = mlp_problem(2, 4, jnp.bfloat16, seed=2)
    out = execute(schedule, mlp_stage, params, split_batch(batch, mesh, DATA), head_mse, mesh,
                  loss_params=head, input_grads=True)
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, batch, head))
    ref = execute(schedule, mlp_stage, f32[0], split_batch(f32[1], mesh, DATA), head_mse, mesh,
                  loss_params=f32[2], input_grads=True)
    for got, want in ((out.loss, ref.loss), (out.grads, ref.grads),
                      (out.loss_grads, ref.loss_grads), (out.input_grads, ref.input_grads)):
        assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(got))
        assert_close(jax.tree.map(lambda a: a.astype(jnp.float32), got), want, 1e-3)


def test_integer_loss_parameters():
    """loss_params may hold integer leaves (which output columns the loss reads, say): zero
    gradients of their own dtype, the float leaves their exact ones."""
    def head_columns(head, y, target):
        return jnp.mean(((y @ head["w"])[:, head["cols"]] - target[:, head["cols"]]) ** 2)

    with jax.enable_x64(True):
        schedule = make_schedule("zb1p", 4, 6)
        mesh = make_mesh(pipe=4, devices=jax.devices()[:4])
        params, batch, head = mlp_problem(4, 6, jnp.float64, seed=3)
        cols = jnp.asarray([5, 0, 3], jnp.int32)
        out = execute(schedule, mlp_stage, params, batch, head_columns, mesh,
                      loss_params={**head, "cols": cols})
        ref_loss, g_params, g_head, _ = reference(
            mlp_stage, lambda h, y, t: head_columns({**h, "cols": cols}, y, t), params, *batch,
            loss_params=head)
        assert abs(float(out.loss) - float(ref_loss)) < 1e-12
        assert_close(out.grads, g_params, 1e-12)
        loss_grads = dict(out.loss_grads)
        g_cols = loss_grads.pop("cols")
        assert g_cols.dtype == jnp.int32 and not np.asarray(g_cols).any()
        assert_close(loss_grads, g_head, 1e-12)


@pytest.mark.parametrize("name", ["zb1p", "dualpipe"])
def test_integer_stage_parameters(name):
    """Stage parameters may hold integer leaves (RedundantMoE's expert placement, say): they get
    zero gradients of their own dtype, the float leaves their exact ones (a lax.switch over
    branches of float0 and int32 gradients failed to trace before)."""
    def permuted_stage(p, x):  # the hidden units in the order p["perm"] says
        return mlp_stage({**p, "w2": p["w2"][p["perm"]]}, x)

    with jax.enable_x64(True):
        schedule = make_schedule(name, 4, 8)
        mesh = make_mesh(pipe=4, data=2)
        params, batch, _ = mlp_problem(schedule.num_stages, 8, jnp.float64, seed=2)
        rng = np.random.default_rng(2)
        perm = jnp.asarray(np.stack([rng.permutation(H) for _ in range(schedule.num_stages)]),
                           jnp.int32)
        out = execute(schedule, permuted_stage, {**params, "perm": perm},
                      split_batch(batch, mesh, DATA), mse, mesh)
        ref_loss, ref_grads, _, _ = reference(  # jax.grad takes no integer leaves: cast
            lambda p, x: permuted_stage({**p[0], "perm": p[1].astype(jnp.int32)}, x), mse,
            (params, perm.astype(jnp.float64)), *batch)
        assert abs(float(out.loss) - float(ref_loss)) < 1e-12
        grads = dict(out.grads)
        assert grads.pop("perm").dtype == jnp.int32
        assert_close(grads, ref_grads[0], 1e-12)


class MoEBlock(nnx.Module):
    """A DeepSeek-MoE block: x + DeepSeekMoE(RMSNorm(x)) -- 8 routed experts (top-2 of 4 groups,
    sigmoid router with the balancing bias) and a shared expert. (The full `Block` adds MLA; it
    passes the same checks but takes ~4x longer to compile on XLA:CPU than CI allows.)"""

    def __init__(self, cfg, *, rngs, mesh=None):
        self.norm = RMSNorm(cfg.d_model, cfg)
        self.moe = DeepSeekMoE(cfg, rngs=rngs, mesh=mesh)

    def __call__(self, x_BTD):
        return x_BTD + self.moe(self.norm(x_BTD))[0]


def moe_blocks(num_stages, mesh=None):
    """`num_stages` tiny MoE blocks stacked into [num_stages, ...] parameters, and the stage
    function applying one. Weights are drawn with numpy (N(0, 0.1^2); norm scales 1, router
    biases 0), skipping the eager per-shape compiles of nnx initialisation."""
    cfg = DeepSeekConfig.tiny(d_model=32, expert_hidden=16, num_layers=num_stages,
                              num_dense_layers=0)
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: MoEBlock(cfg, rngs=nnx.Rngs(0),
                                                                 mesh=mesh)))
    rng = np.random.default_rng(3)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = (num_stages, *leaf.shape)
        if "scale" in name or "bias" in name:
            return jnp.full(shape, 1.0 if "scale" in name else 0.0, leaf.dtype)
        return normal(rng, shape, leaf.dtype, 0.1)

    params = jax.tree_util.tree_map_with_path(init, shapes)

    def stage(p, x_BTD):
        return nnx.merge(graphdef, p)(x_BTD)

    return params, stage, cfg


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts-replicated", "ep"])
def test_moe_blocks_dualpipe(expert_parallel):
    """DualPipe over pipe=4 x expert=2, float32, four DeepSeek-MoE blocks; with `ep`, each
    block's routed experts are split over `expert` (all-to-all dispatch inside the stage)."""
    mesh = make_mesh(pipe=4, expert=2)
    params, stage, cfg = moe_blocks(4, mesh if expert_parallel else None)
    m, T = 8, 8
    rng = np.random.default_rng(2)
    batch = (normal(rng, (m, 2, T, cfg.d_model), jnp.float32),
             normal(rng, (m, 2, T, cfg.d_model), jnp.float32))
    schedule = make_schedule("dualpipe", 4, m)
    loss, grads = run(schedule, stage, params, split_batch(batch, mesh, EXPERT), mse, mesh)
    ref_loss, ref_grads, _, _ = reference(stage, mse, params, *batch)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert_close(grads, ref_grads, 1e-10)  # calc_diff ~ e^2 / 2: 1e-10 is ~1e-5 relative


def test_backward_split_is_genuine():
    """Compiled B holds no weight-gradient matmul; B + W cost exactly one full backward."""
    d, h, mb = 64, 256, 8
    p = {"w1": jnp.ones((d, h)), "b1": jnp.ones(h), "w2": jnp.ones((h, d))}
    x = jnp.ones((mb, d))
    split = StageSplit(mlp_stage, p, x)
    y, res = split.forward(p, x)
    dx, wres = split.backward_input(p, res, x)

    def compiled(f, *args):
        return jax.jit(f).lower(*args).compile()

    b = compiled(split.backward_input, p, res, x)
    w = compiled(split.backward_weight, p, res, wres)
    full = compiled(split.backward, p, res, x)
    flops = {k: c.cost_analysis()["flops"] for k, c in (("B", b), ("W", w), ("BW", full))}
    matmul = 2 * mb * d * h                     # one [mb, d] x [d, h] product
    assert 2 * matmul <= flops["B"] < 2.1 * matmul   # dx through w2 and w1, plus elementwise
    assert 2 * matmul <= flops["W"] < 2.1 * matmul   # dw2 and dw1 (+ db1)
    assert flops["B"] + flops["W"] == pytest.approx(flops["BW"], rel=1e-3)
    # No dot in B makes a weight-shaped [d, h] / [h, d] result; W makes both.
    assert "f32[64,256]{1,0} dot(" not in b.as_text() and "f32[256,64]{1,0} dot(" not in b.as_text()
    assert "dot(" in w.as_text()


def test_compile_time_flat_in_microbatches():
    """The scan over ticks keeps the program the same size for 8 or 32 micro-batches: the
    compiled program's instruction count (deterministic; 1579 / 1573 here), and its compile time
    loosely (a timing on a shared 2-core machine once read 2.1x: unrolling would be >= 4x)."""
    mesh = make_mesh(pipe=4, data=2)

    def compile_stats(m):
        schedule = make_schedule("dualpipe", 4, m)
        params, batch, _ = mlp_problem(4, m, jnp.float32)
        program, _ = executor._program(schedule, mlp_stage, executor._WithoutParams(mse), mesh,
                                       "pipe", False)
        lowered = program.lower(params, (), *batch)
        start = time.perf_counter()
        compiled = lowered.compile()
        seconds = time.perf_counter() - start
        return seconds, sum(" = " in line for line in compiled.as_text().splitlines())

    (t8, n8), (t32, n32) = compile_stats(8), compile_stats(32)
    assert n32 <= 1.1 * n8, (n8, n32)
    assert t32 < 4 * t8, (t8, t32)


def test_run_errors():
    schedule = make_schedule("dualpipe", 4, 8)
    params, batch, _ = mlp_problem(4, 8, jnp.float32)
    with pytest.raises(ValueError, match="4 ranks but the mesh's 'pipe' axis has size 2"):
        run(schedule, mlp_stage, params, batch, mse, make_mesh(pipe=2, data=4))
    mesh = make_mesh(pipe=4, data=2)
    with pytest.raises(ValueError, match="stacked over the 4 stages"):
        run(schedule, mlp_stage, jax.tree.map(lambda a: a[:3], params), batch, mse, mesh)
    with pytest.raises(ValueError, match="the 8 micro-batches on axis 0"):
        run(schedule, mlp_stage, params, jax.tree.map(lambda a: a[:4], batch), mse, mesh)
    with pytest.raises(ValueError, match="stage_fn must map an activation"):
        run(schedule, lambda p, x: x[:, :4], params, batch, mse, mesh)


def test_pipeline_stages_compute_the_model():
    """PipelineStages' stages over the stacked blocks, then its loss, are the Transformer's
    forward and cross-entropy; blocks of two structures are refused."""
    import optax

    from jax_ds.models import PipelineStages, Transformer
    cfg = DeepSeekConfig.tiny(num_layers=3, num_dense_layers=0)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    parts = PipelineStages(model)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    x = model.embed[...][tokens]
    for s in range(cfg.num_layers):
        x = parts.stage(jax.tree.map(lambda a, s=s: a[s], parts.blocks), x)
    logits, _ = model.forward(tokens)
    want = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    got = parts.loss(parts.head, x[:, :-1], tokens[:, 1:])
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    with pytest.raises(ValueError, match="num_dense_layers=1"):
        PipelineStages(Transformer(cfg.replace(num_dense_layers=1), rngs=nnx.Rngs(0)))


def test_explicit_mesh():
    """A mesh of Explicit axes (jax.make_mesh's default), with inputs unplaced or placed on it:
    the same loss and gradients as the oracle."""
    schedule = make_schedule("1f1b", 4, 4)
    mesh = jax.make_mesh((4, 2), ("pipe", DATA), devices=jax.devices()[:8])
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}
    params, batch, _ = mlp_problem(schedule.num_stages, 4, jnp.float32)
    ref_loss, ref_grads, _, _ = reference(mlp_stage, mse, params, *batch)
    placed = (jax.device_put(params, NamedSharding(mesh, P("pipe"))),
              jax.device_put(batch, NamedSharding(mesh, P(None, DATA))))
    for p, b in ((params, batch), placed):
        loss, grads = run(schedule, mlp_stage, p, b, mse, mesh)
        assert abs(float(loss) - float(ref_loss)) < 1e-6
        assert_close(grads, ref_grads, 1e-6)
    # the results are on the caller's mesh: an update with the placed parameters works
    new = jax.tree.map(lambda a, g: a - 0.1 * g, placed[0], grads)
    assert new["w1"].sharding.mesh == mesh
    with jax.set_mesh(mesh):  # under the caller's mesh as context too
        loss2, _ = run(schedule, mlp_stage, *placed, mse, mesh)
    assert float(loss2) == float(loss)
    with pytest.raises(ValueError, match="inside jax.jit the mesh must have Auto axes"):
        jax.jit(lambda p, b: run(schedule, mlp_stage, p, b, mse, mesh))(*placed)
