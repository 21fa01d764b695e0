"""Inside shard_map jax types an ffi_call's results as varying over no mesh axis (jax 0.11.2 and
0.12). Every kernel call (`_ffi.kernel_call`) casts them to vary like its inputs: otherwise the
custom_vjp around a kernel fails on its cotangents' types, as the model's training step did on one
GPU (moe_unpermute). Checked here on the traced program: nothing runs, no kernel is needed."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ds import _ffi
from jax_ds.ops import moe


def _mesh():
    return jax.make_mesh((2, 2), ("data", "expert"), devices=jax.devices("cpu")[:4])


def _vma(x):
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def test_ffi_results_vary_like_their_inputs():
    mesh = _mesh()
    seen = {}

    def body(x, w):
        call = jax.ffi.ffi_call("jax_ds_never_registered", jax.ShapeDtypeStruct(x.shape, x.dtype),
                                vmap_method="sequential")
        seen["raw"] = _vma(call(x, w))
        seen["cast"] = _vma(_ffi.kernel_call("jax_ds_never_registered",
                                             jax.ShapeDtypeStruct(x.shape, x.dtype), x, w))
        return x

    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P(("data", "expert"))))
    w = jax.device_put(jnp.ones((4, 4)), NamedSharding(mesh, P("expert")))
    jax.make_jaxpr(jax.shard_map(body, mesh=mesh, in_specs=(P(("data", "expert")), P("expert")),
                                 out_specs=P(("data", "expert"))))(x, w)
    assert seen["raw"] == frozenset()  # jax's typing; if it ever changes, the cast is a no-op
    assert seen["cast"] == {"data", "expert"}


def test_kernel_unpermute_gradient_types_inside_shard_map(monkeypatch):
    """The kernel path of moe_permute / moe_unpermute (the ffi calls, only traced) differentiates
    inside shard_map with gate weights that vary over fewer axes than the rows."""
    monkeypatch.setattr(moe, "_use_kernel", lambda *args, **kwargs: True)
    mesh = _mesh()
    n, k, d, e = 8, 2, 16, 4

    def body(x, idx, w):
        def loss(x, w):
            y, _, perm = moe.moe_permute(x, idx, e)
            return jnp.sum(moe.moe_unpermute(y * 2, perm, w).astype(jnp.float32))
        return jax.lax.psum(sum(jnp.sum(g) for g in jax.grad(loss, (0, 1))(x, w)),
                            ("data", "expert"))

    spec = P(("data", "expert"))
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in (
        (jnp.ones((4 * n, d), jnp.bfloat16), spec),
        (jnp.asarray(np.arange(4 * n * k).reshape(4 * n, k) % e, jnp.int32), spec),
        (jnp.ones((2 * n, k), jnp.float32), P("expert")))]
    jax.make_jaxpr(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, P("expert")),
                                 out_specs=P()))(*args)
