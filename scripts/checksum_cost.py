"""How much of a checkpoint save is the shard checksum: `run_ours` of `bench checkpoint` with the
checksum as shipped (CRC-32C through google-crc32c), with zlib's CRC-32 (what format /2 used)
and with no checksum at all.

    python scripts/checksum_cost.py [--size-gb 2] [--rounds 5] [--dir /disk/to/measure]

Prints each checksum's speed on one core (256 MiB in 1 MiB chunks, as the writers feed it), then
save / restore GB/s per round (the numbers in benchmarks/NOTES-checkpoint.md).
"""
import argparse
import shutil
import tempfile
import time
import zlib

import jax
import numpy as np

from jax_ds.bench import checkpoint as bench
from jax_ds.parallel.mesh import make_mesh
from jax_ds.storage import shards

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--size-gb", type=float, default=2.0)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--dir", default=None)
args = p.parse_args()

state = bench.build_state(int(args.size_gb * 1e9), make_mesh(expert=jax.device_count()))
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
# Called as f(data, running_value) once per staged chunk on save, f(shard) on restore.
checksums = {"crc32c (shipped)": shards.crc32c,
             "zlib crc32": lambda data, value=0: zlib.crc32(data, value),
             "none": lambda data, value=0: 0}
data = np.random.default_rng(0).integers(0, 256, 256 << 20, dtype=np.uint8)
for name, fn in list(checksums.items())[:2]:
    t, value = time.perf_counter(), 0
    for i in range(0, data.size, 1 << 20):
        value = fn(data[i:i + (1 << 20)], value)
    print(f"{name:17s} {data.size / (time.perf_counter() - t) / 2**30:.1f} GiB/s on one core",
          flush=True)
del data
shipped = shards.crc32c
for name, fn in checksums.items():
    shards.crc32c = fn   # the writer looks it up per save, the reader through _CHECKSUMS
    shards._CHECKSUMS[shards.FORMAT] = ("crc32c", fn)
    for _ in range(args.rounds):
        root = tempfile.mkdtemp(dir=args.dir)
        try:
            r = bench.run_ours(root, state, abstract, check=False)
        finally:
            shutil.rmtree(root)
        print(f"{name:17s} save {args.size_gb / r.save_s:.2f} GB/s, "
              f"restore {args.size_gb / r.restore_s:.2f} GB/s", flush=True)
shards.crc32c = shipped
shards._CHECKSUMS[shards.FORMAT] = ("crc32c", shipped)
