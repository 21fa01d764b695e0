"""How much of a checkpoint save is the shard checksum: `run_ours` of `bench checkpoint` with the
CRC as shipped (zlib), with google-crc32c (if installed) and with no checksum at all.

    python scripts/checksum_cost.py [--size-gb 2] [--rounds 5] [--dir /disk/to/measure]

Prints save / restore GB/s per round (the numbers in benchmarks/NOTES-checkpoint.md).
"""
import argparse
import shutil
import tempfile

import jax

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
checksums = {"zlib crc32": shards.zlib.crc32, "none": lambda data: 0}
try:
    import google_crc32c

    checksums["google-crc32c"] = google_crc32c.value
except ImportError:
    print("google-crc32c not installed: that row is skipped")
zlib_module = shards.zlib
for name, fn in checksums.items():
    shards.zlib = type("Checksum", (), {"crc32": staticmethod(fn)})
    for _ in range(args.rounds):
        root = tempfile.mkdtemp(dir=args.dir)
        try:
            r = bench.run_ours(root, state, abstract, check=False)
        finally:
            shutil.rmtree(root)
        print(f"{name:14s} save {args.size_gb / r.save_s:.2f} GB/s, "
              f"restore {args.size_gb / r.restore_s:.2f} GB/s", flush=True)
shards.zlib = zlib_module
