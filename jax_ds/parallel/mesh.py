"""Device meshes: the four axis names, one constructor, and placement of a model's parameters.

Axes (DeepSeek-V3 training layout):
  data    data parallel: different sequences, parameters replicated (gradients all-reduced).
  expert  expert parallel: routed experts split across it; attention and dense layers see it as
          more data parallelism (each EP rank holds different tokens, as in DeepSeek's DP+EP).
  pipe    pipeline stages (`parallel/pipeline`).
  tensor  tensor parallel (reserved; the models here do not shard over it yet).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ds.ops._checks import is_int

DATA = "data"
EXPERT = "expert"
PIPE = "pipe"
TENSOR = "tensor"
AXES = (DATA, EXPERT, PIPE, TENSOR)

# Axes a token batch is split over: every rank of `expert` also holds its own tokens.
BATCH_AXES = (DATA, EXPERT)


def request_cpu_devices(count: int) -> None:
    """Asks XLA:CPU for `count` virtual devices (meshes on one host: examples, benchmarks).

    XLA reads XLA_FLAGS when a backend starts, so this must run before the first device use
    (`jax.devices()`, any array op), not before `import jax`. An explicit
    --xla_force_host_platform_device_count in XLA_FLAGS wins; GPU backends ignore the flag.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def make_mesh(*, data: int | None = None, expert: int = 1, pipe: int = 1, tensor: int = 1,
              devices=None) -> Mesh:
    """A mesh with axes (data, expert, pipe, tensor), in that order (`tensor` varies fastest).

    Every axis is present, sizes of 1 included, so specs may always name any of them. Axes are
    `Auto` (compiler-propagated shardings); `shard_map` makes them manual where the code says so.

    Args:
      data, expert, pipe, tensor: axis sizes; their product must equal the number of devices.
        `data` left out (None) takes the devices the others leave: make_mesh(expert=4) on 8
        devices is data=2 x expert=4, make_mesh() puts every device on `data`.
      devices: the devices to use (default: all of `jax.devices()`).

    Returns:
      jax.sharding.Mesh.
    """
    sizes = {DATA: data, EXPERT: expert, PIPE: pipe, TENSOR: tensor}
    for name, size in sizes.items():
        if (size is not None or name != DATA) and (not is_int(size) or size < 1):
            raise ValueError(f"make_mesh: {name}={size!r} must be a positive int")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: devices is empty")
    if data is None:
        # The devices the other axes leave; 1 where they need more than there are (the count
        # check below then says how many, with the CPU hint).
        others = int(expert) * int(pipe) * int(tensor)
        if others < len(devices) and len(devices) % others:
            raise ValueError(f"make_mesh: {len(devices)} devices ({devices[0].platform}) do not "
                             f"divide by expert x pipe x tensor = {others}; give data too (and "
                             f"devices=jax.devices()[:N] to use part of them)")
        sizes[DATA] = max(1, len(devices) // others)
    sizes = {name: int(size) for name, size in sizes.items()}
    need = math.prod(sizes.values())
    if need != len(devices):
        shape = " x ".join(f"{k}={v}" for k, v in sizes.items())
        if need < len(devices):
            hint = (f"; to use part of them pass devices=jax.devices()[:{need}] (mesh_from_spec "
                    f"does), or give one axis the size -1 in parse_mesh")
        elif devices[0].platform == "cpu":
            hint = ("; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax "
                    "is imported")
        else:
            hint = ""
        raise ValueError(f"make_mesh: {shape} needs {need} devices, have {len(devices)} "
                         f"({devices[0].platform}){hint}")
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """'data=2,expert=4' -> {'data': 2, 'expert': 4}; one axis may be '-1' (the rest of devices)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in AXES or not value.lstrip("-").isdigit():
            raise ValueError(f"mesh spec {spec!r}: expected comma-separated axis=size with axes "
                             f"in {AXES}, got {part!r}")
        sizes[name] = int(value)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1")
    if free:
        known = math.prod(v for v in sizes.values() if v != -1)
        if num_devices % known:
            raise ValueError(f"mesh spec {spec!r}: {num_devices} devices do not divide by {known}")
        sizes[free[0]] = num_devices // known
    return sizes


def mesh_from_spec(spec: str, devices=None) -> Mesh:
    """`make_mesh` of an 'axis=size,...' spec (`parse_mesh`, -1 = the rest) over the first
    devices it needs: expert=4 on a host of 8 takes 4 of them (a restore onto fewer devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return make_mesh(**sizes, devices=devices[:math.prod(sizes.values())])


def batch_spec(mesh: Mesh, ndim: int = 2) -> P:
    """PartitionSpec of a [B, ...] batch: B split over the mesh's batch axes, the rest whole."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return P(axes, *([None] * (ndim - 1)))


def batch_size_multiple(mesh: Mesh) -> int:
    """The batch size must be a multiple of this (the product of the batch axes' sizes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def shard_batch(batch, mesh: Mesh):
    """Places a host batch (numpy or jax arrays, [B, ...]) split over the batch axes."""
    multiple = batch_size_multiple(mesh)

    def put(x):
        if x.shape[0] % multiple:
            raise ValueError(f"shard_batch: batch size {x.shape[0]} is not a multiple of "
                             f"data x expert = {multiple}; pass the batch unplaced "
                             f"(jnp.asarray) instead: the MoE layers split any token count "
                             f"over the mesh themselves")
        return jax.device_put(np.asarray(x), NamedSharding(mesh, batch_spec(mesh, x.ndim)))

    return jax.tree.map(put, batch)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Places every variable of `model` by its `sharding_names` metadata (replicated if none).

    The models annotate only what is split (routed experts over `expert`); the rest is
    replicated, and XLA all-reduces its gradients over the batch axes.
    """
    state = nnx.state(model)
    specs = nnx.get_partition_spec(state)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    nnx.update(model, jax.device_put(state, shardings))
    return model
