"""More yield points in the FP8 GEMM kernels' promotion: a SASS post-pass on a built library.

DeepGEMM's README describes the lever ("FFMA SASS interleaving"): in a long run of promotion
FFMAs, a warp that may not yield keeps its SM sub-partition's issue slot, and the other
consumer warpgroup's WGMMA issue waits behind it; letting more of those FFMAs yield gave its
fine-grained-scaling FP8 GEMMs up to 10%+. This script is our own pass for our kernels:

- sm_90 instructions are 128 bits; the high 64-bit word holds the control bits (as documented
  by the public microbenchmark dissections of Volta and later): stall count in bits 41-44, the
  yield flag in bit 45, the operand reuse flags in bits 58-61. In ptxas's output (nvcc 13.0) a
  run of promotion FFMAs alternates the flag: every other FFMA may yield (flag 0); the others
  carry operand reuse flags and the flag 1 (a reused operand lives in a cache the warp loses when
  it yields).
- The pass takes each run of at least `min_run` consecutive unpredicated FFMAs and, in its first
  `fraction` of instructions, clears the reuse flags of the FFMAs that carry any and lets them
  yield (flag 0). Nothing else changes: the opcode and operand bits, and every other
  instruction, stay as they are. Both flags are hints: a cleared reuse flag makes the next
  instruction read its operand from the register file, a yield lets the scheduler switch warps.
- The library's cubins sit uncompressed in its fatbins, so a function's code is found by its
  bytes (all of them, as cuobjdump prints them) and patched in place of a copy.

Usage:
  python scripts/ffma_yield.py LIB --out PATCHED [--kernels REGEX] [--fraction 0.5]
         [--min-run 8] [--every] [--check]
  --check disassembles PATCHED again and verifies that only the planned bits changed.
cuobjdump is taken from $CUOBJDUMP, PATH, $CUDA_HOME/bin or /usr/local/cuda/bin.
Measured: not yet (benchmarks/NOTES-gemm.md says when it is).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys

YIELD_BIT = 45
REUSE_MASK = 0xF << 58
KERNELS = r"sm90_fp8_gemm_kernel"
SEARCH_PREFIX = 64  # instructions of a function searched for first, then the whole is compared

_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*/\*\s*(0x[0-9a-f]{16})\s*\*/\s*$")
_CONTROL = re.compile(r"^\s+/\*\s*(0x[0-9a-f]{16})\s*\*/\s*$")


@dataclasses.dataclass
class Instr:
    addr: int
    text: str
    lo: int
    hi: int

    @property
    def opcode(self) -> str:
        """The opcode's first part ("FFMA" of "FFMA.FTZ"); "" for a predicated instruction."""
        words = self.text.split()
        if not words or words[0].startswith("@"):
            return ""
        return words[0].split(".")[0]

    def encoded(self, hi=None) -> bytes:
        return self.lo.to_bytes(8, "little") + (self.hi if hi is None else hi).to_bytes(8, "little")


@dataclasses.dataclass
class Function:
    arch: str
    name: str
    instrs: list

    def code(self) -> bytes:
        return b"".join(i.encoded() for i in self.instrs)


def parse_sass(text: str) -> list:
    """cuobjdump -sass output -> [Function], instructions in order with both 64-bit words."""
    functions, arch, current, pending = [], "", None, None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("code for "):
            arch = stripped[len("code for "):].strip()
        elif stripped.startswith("Function : "):
            current = Function(arch, stripped[len("Function : "):].strip(), [])
            functions.append(current)
            pending = None
        elif current is not None:
            m = _INSTR.match(line)
            if m:
                pending = (int(m.group(1), 16), m.group(2).strip(), int(m.group(3), 16))
                continue
            c = _CONTROL.match(line)
            if c and pending is not None:
                addr, txt, lo = pending
                if addr != 16 * len(current.instrs):
                    raise ValueError(f"{current.name}: instruction at {addr:#x} out of order")
                current.instrs.append(Instr(addr, txt, lo, int(c.group(1), 16)))
                pending = None
    return functions


def ffma_runs(fn: Function, min_run: int) -> list:
    """[(first, last + 1)] of the runs of >= min_run consecutive unpredicated FFMAs."""
    runs, start = [], None
    for i, ins in enumerate(fn.instrs + [None]):
        if ins is not None and ins.opcode == "FFMA":
            start = i if start is None else start
            continue
        if start is not None and i - start >= min_run:
            runs.append((start, i))
        start = None
    return runs


def plan(fn: Function, fraction: float, min_run: int, every: bool = False) -> dict:
    """{instruction index: new high word} for one function (see the module docstring); with
    `every`, all FFMAs of a run's head become yield points, also those that hold no reuse flag
    but the no-yield flag (ptxas leaves some runs so)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    touched = REUSE_MASK | (1 << YIELD_BIT) if every else REUSE_MASK
    changes = {}
    for first, end in ffma_runs(fn, min_run):
        head = first + int(round(fraction * (end - first)))
        for i in range(first, head):
            hi = fn.instrs[i].hi
            if hi & touched:
                changes[i] = hi & ~REUSE_MASK & ~(1 << YIELD_BIT)
    return changes


def locate(data: bytes, fn: Function) -> list:
    """Offsets in `data` at which the whole of fn's code lies."""
    code = fn.code()
    prefix = code[:16 * SEARCH_PREFIX]
    found, at = [], data.find(prefix)
    while at != -1:
        if data[at:at + len(code)] == code:
            found.append(at)
        at = data.find(prefix, at + 1)
    return found


def patch(data: bytearray, functions, kernels=KERNELS, fraction=0.5, min_run=8,
          every=False) -> list:
    """Patch `data` in place; returns a report row per selected function:
    (arch, name, runs, FFMAs in runs, instructions changed, copies of the code patched)."""
    pattern = re.compile(kernels)
    original = bytes(data)  # searched, not patched: identical copies of a kernel take one patch
    report = []
    for fn in functions:
        if not pattern.search(fn.name):
            continue
        runs = ffma_runs(fn, min_run)
        changes = plan(fn, fraction, min_run, every)
        offsets = locate(original, fn)
        if changes and not offsets:
            raise ValueError(f"{fn.name} ({fn.arch}): its code was not found in the file (a "
                             f"compressed fatbin? build without fatbin compression)")
        for base in offsets:
            for i, hi in changes.items():
                at = base + 16 * i + 8
                data[at:at + 8] = hi.to_bytes(8, "little")
        report.append((fn.arch, fn.name, len(runs), sum(e - f for f, e in runs), len(changes),
                       len(offsets)))
    return report


def verify(before, after, kernels=KERNELS, fraction=0.5, min_run=8, every=False) -> list:
    """Problems (empty when none) between two disassemblies: the same functions and
    instructions, low words equal, high words equal except the planned FFMAs, and those differ
    only in the yield and reuse bits, now clear."""
    problems = []
    pattern = re.compile(kernels)
    if [(f.arch, f.name) for f in before] != [(f.arch, f.name) for f in after]:
        return ["the function lists differ"]
    for fb, fa in zip(before, after):
        if len(fb.instrs) != len(fa.instrs):
            problems.append(f"{fb.name}: instruction count {len(fb.instrs)} -> {len(fa.instrs)}")
            continue
        planned = plan(fb, fraction, min_run, every) if pattern.search(fb.name) else {}
        for i, (x, y) in enumerate(zip(fb.instrs, fa.instrs)):
            if x.lo != y.lo or x.text.replace(".reuse", "") != y.text.replace(".reuse", ""):
                problems.append(f"{fb.name}+{x.addr:#x}: {x.text!r} -> {y.text!r}")
            elif y.hi != planned.get(i, x.hi):
                problems.append(f"{fb.name}+{x.addr:#x}: control {x.hi:#018x} -> {y.hi:#018x}")
    return problems


def cuobjdump() -> str:
    for candidate in (os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                   "cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("cuobjdump not found: set CUOBJDUMP, or put CUDA's bin on PATH (the "
                            "wheel nvidia-cuda-cuobjdump holds one: nvidia/cu13/bin/cuobjdump)")


def disassemble(path) -> list:
    out = subprocess.run([cuobjdump(), "-sass", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return parse_sass(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lib", type=pathlib.Path, help="the built library (or object file)")
    ap.add_argument("--out", type=pathlib.Path, required=True,
                    help="where the patched copy goes (may be LIB itself)")
    ap.add_argument("--kernels", default=KERNELS, help="regex on the mangled kernel names")
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="leading share of each FFMA run whose reused FFMAs become yields")
    ap.add_argument("--min-run", type=int, default=8, help="shortest FFMA run touched")
    ap.add_argument("--every", action="store_true",
                    help="every FFMA of a run's head yields, not only those with reuse flags")
    ap.add_argument("--check", action="store_true",
                    help="disassemble the result and verify only the planned bits changed")
    args = ap.parse_args(argv)

    functions = disassemble(args.lib)
    data = bytearray(args.lib.read_bytes())
    report = patch(data, functions, args.kernels, args.fraction, args.min_run, args.every)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, args.out)
    changed = sum(r[4] for r in report)
    for arch, name, runs, ffmas, n, copies in report:
        print(f"{arch} {name[:90]}: {runs} runs, {ffmas} FFMAs, {n} changed, {copies} copies")
    print(f"{len(report)} kernels, {changed} FFMAs changed -> {args.out}")
    if args.check:
        problems = verify(functions, disassemble(args.out), args.kernels, args.fraction,
                          args.min_run, args.every)
        for p in problems[:20]:
            print("CHECK:", p, file=sys.stderr)
        if problems:
            print(f"CHECK FAILED: {len(problems)} problems", file=sys.stderr)
            return 1
        print("check: only the planned yield/reuse bits changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
