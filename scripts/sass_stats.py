"""Per-kernel SASS counts of a built library or object file: the figures NOTES-gemm and
NOTES-mla quote from `cuobjdump -sass` (instructions, R2UR moves, the spacing of WGMMAs, the
length and spills of the loops around them).

  python scripts/sass_stats.py LIB [--kernels REGEX] [--count R2UR QGMMA ...] [--gaps PREFIX]
                               [--loops PREFIX [--at-least N] [--listing]] [--same-as OTHER_LIB]

Prints a line per kernel whose mangled name matches --kernels:
- its instruction count;
- how many instructions start with each --count prefix;
- with --gaps, the distinct (instructions apart, stall fields summed) between consecutive
  instructions starting with PREFIX, e.g. HGMMA.64x64x16 for MLA's S loop;
- with --loops, each loop (a backward branch and the code up to it from its target) that holds
  PREFIX instructions: its length, how many, its LDL/STL (spills inside it) and, given --count,
  each counted prefix inside it (e.g. --count LDG LDS: where a K loop's loads come from). The
  GEMM's steady K loop is the shortest one with QGMMAs (a round of the accumulator sets' k
  blocks); a closing line counts the kernels whose shortest such loop holds LDL/STL (spills in
  the steady loop). With --at-least N the steady loop is the shortest one holding N or more
  PREFIX instructions (MLA's decode kernel: `--loops HGMMA --at-least 40` is warpgroup 0's
  per-block loop, S's 36 and P V's 4, where the shortest is warpgroup 1's P V loop);
- with --loops and --listing, the shortest such loop itself, an instruction a line with its
  scheduling fields (stall, yield, scoreboards set and waited for): two builds' loops can be
  compared with diff;
- with --same-as, whether OTHER_LIB's kernel of the same name and architecture has the same
  machine code (both instruction words of every instruction), and a closing count: which kernels
  a source change touched. With --loops too, whether the two steady loops hold the same opcodes
  in the same order (registers aside) and, where not, difflib's similarity ratio of the two
  opcode sequences: whether a change elsewhere in a kernel reached its hot loop. Names are the
  mangled ones, parameters included (a kernel whose parameter list changed is "absent" there),
  anonymous namespaces' per-build hashes left out.
cuobjdump as in scripts/ffma_yield.py ($CUOBJDUMP, PATH, CUDA's bin).
"""

from __future__ import annotations

import argparse
import difflib
import os
import pathlib
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ffma_yield  # noqa: E402  (the cuobjdump parser)

STALL_SHIFT, STALL_MASK = 41, 0xF  # stall cycles: bits 41-44 of the high word


def control(hi: int) -> dict:
    """The scheduling fields of an instruction's high word: stall cycles (bits 41-44), yield
    (45), the scoreboard it sets on write (46-48) and on read (49-51; 7 = none) and the
    scoreboards it waits for (52-57, a mask)."""
    return {"stall": (hi >> STALL_SHIFT) & STALL_MASK,
            "yield": (hi >> ffma_yield.YIELD_BIT) & 1,
            "write": (hi >> 46) & 7, "read": (hi >> 49) & 7, "wait": (hi >> 52) & 0x3F}


def listing(fn, first: int, last: int) -> list:
    """The instructions at addresses [first, last], a line each: address, stall, yield, the
    scoreboards set on write and read ("-": none) and waited for, then the text."""
    out = []
    for ins in fn.instrs:
        if first <= ins.addr <= last:
            c = control(ins.hi)
            sb = {k: "-" if c[k] == 7 else str(c[k]) for k in ("write", "read")}
            wait = "".join(str(b) for b in range(6) if c["wait"] >> b & 1) or "-"
            out.append(f"{ins.addr:6x} s{c['stall']:<2d} y{c['yield']} w{sb['write']} "
                       f"r{sb['read']} wait {wait:6s} {ins.text}")
    return out


def stats(fn, count, gaps=None) -> dict:
    """{"instructions", each prefix in `count`: its number, "gaps": sorted distinct (apart,
    stalls) between consecutive `gaps`-prefixed instructions (None without `gaps`)}."""
    texts = _opcodes(fn)
    out = {"instructions": len(fn.instrs)}
    for prefix in count:
        out[prefix] = sum(t.startswith(prefix) for t in texts)
    out["gaps"] = None
    if gaps:
        at = [k for k, t in enumerate(texts) if t.startswith(gaps)]
        out["gaps"] = sorted({(b - a, sum((fn.instrs[k].hi >> STALL_SHIFT) & STALL_MASK
                                          for k in range(a, b)))
                              for a, b in zip(at, at[1:])})
    return out


BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(?:\S+\s+)?0x([0-9a-f]+)")


def _opcodes(fn) -> list:
    """Each instruction's text without its predicate (`@P0 `)."""
    return [i.text.split(None, 1)[1] if i.text.startswith("@") else i.text for i in fn.instrs]


def loops(fn, prefix, count=()) -> list:
    """The loops whose body holds `prefix`-opcode instructions: (first, last address, length in
    instructions, those instructions, local-memory loads and stores) for each backward branch, the
    body being [its target, the branch], and with `count` a sixth item: {each prefix: how many in
    the body}. Nested loops are listed each (inner ones shorter)."""
    texts = _opcodes(fn)
    out = []
    for k, ins in enumerate(fn.instrs):
        m = BRANCH.search(ins.text)
        if not m or int(m.group(1), 16) >= ins.addr:
            continue
        body = texts[int(m.group(1), 16) // 16:k + 1]
        n = sum(t.startswith(prefix) for t in body)
        if n:
            row = (int(m.group(1), 16), ins.addr, len(body), n,
                   sum(t.startswith(("LDL", "STL")) for t in body))
            out.append(row + ({c: sum(t.startswith(c) for t in body) for c in count},)
                       if count else row)
    return out


ANON = re.compile(r"(\d+)_GLOBAL__N_")


def steady_loop(found: list, at_least: int = 1):
    """The shortest of `loops`' rows holding at least `at_least` of the prefix; None if none."""
    rows = [row for row in found if row[3] >= at_least]
    return min(rows, key=lambda row: row[2]) if rows else None


def loop_opcodes(fn, first: int, last: int) -> list:
    """The opcodes (first word of each instruction's text, predicate and registers left out) at
    addresses [first, last]."""
    return [t.split()[0] for i, t in zip(fn.instrs, _opcodes(fn)) if first <= i.addr <= last]


def same_opcodes(a: list, b: list) -> tuple:
    """(a == b, difflib's similarity ratio of the two sequences: 1.0 when equal)."""
    return a == b, difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def stable_name(name: str) -> str:
    """`name` with each anonymous namespace (`<length>_GLOBAL__N__<hash>_<file>_<hash>`, whose
    hashes change with the build's source paths) as `(anonymous)`, so that the kernels of
    anonymous namespaces (quantize, routing, MLA) match across builds."""
    out, i = [], 0
    while (m := ANON.search(name, i)) is not None:
        end = m.end(1) + int(m.group(1))
        if end > len(name):  # not a length prefix after all
            break
        out.append(name[i:m.start()] + "(anonymous)")
        i = end
    return "".join(out) + name[i:]


def _keyed(fns) -> list:
    """[((arch, stable name, n), fn)]: n counts the earlier functions of the same arch and name
    (a library holds a kernel once per translation unit that instantiates it)."""
    seen, out = {}, []
    for f in fns:
        key = (f.arch, stable_name(f.name))
        n = seen[key] = seen.get(key, -1) + 1
        out.append((key + (n,), f))
    return out


def same_code(fns, others) -> dict:
    """{(arch, name, n): True / False (same machine code or not) / None (absent from `others`)}
    for each function of `fns`, the n-th of its name matched with the n-th in `others`."""
    theirs = {k: f.code() for k, f in _keyed(others)}
    return {k: None if k not in theirs else theirs[k] == f.code() for k, f in _keyed(fns)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lib", type=pathlib.Path)
    ap.add_argument("--kernels", default=".", help="regex on the mangled kernel names")
    ap.add_argument("--count", nargs="*", default=["R2UR"], help="opcode prefixes to count")
    ap.add_argument("--gaps", help="opcode prefix whose consecutive spacing is listed")
    ap.add_argument("--loops", metavar="PREFIX",
                    help="also list the loops holding PREFIX instructions (e.g. QGMMA, HGMMA): "
                         "addresses, length, their count, LDL/STL")
    ap.add_argument("--at-least", type=int, default=1, metavar="N",
                    help="with --loops: the steady loop is the shortest holding >= N PREFIX")
    ap.add_argument("--listing", action="store_true",
                    help="with --loops: also print each kernel's shortest such loop, an "
                         "instruction a line with its stall, yield and scoreboard fields")
    ap.add_argument("--same-as", metavar="OTHER_LIB", type=pathlib.Path,
                    help="also say whether OTHER_LIB's kernel of the same name has the same code")
    args = ap.parse_args(argv)
    pattern = re.compile(args.kernels)
    fns = [fn for fn in ffma_yield.disassemble(args.lib) if pattern.search(fn.name)]
    others = [fn for fn in ffma_yield.disassemble(args.same_as)
              if pattern.search(fn.name)] if args.same_as else []
    same = same_code(fns, others) if args.same_as else {}
    theirs = dict(_keyed(others))
    steady = []  # each kernel's steady --loops loop
    for key, fn in _keyed(fns):
        s = stats(fn, args.count, args.gaps)
        cells = " ".join(f"{k}={v}" for k, v in s.items() if v is not None)
        if same:
            cells += " " + {True: "same", False: "differs", None: "absent"}[same[key]] + \
                f" as {args.same_as.name}"
        print(f"{fn.arch} {fn.name[:100]}: {cells}")
        found = loops(fn, args.loops, args.count) if args.loops else []
        for first, last, length, n, local, *counts in found:
            inside = "".join(f", {k}={v}" for k, v in counts[0].items()) if counts else ""
            print(f"  loop {first:#x}-{last:#x}: {length} instructions, {n} {args.loops}, "
                  f"{local} LDL/STL{inside}")
        row = steady_loop(found, args.at_least)
        if row is None:
            continue
        steady.append(row)
        if args.listing:
            print("\n".join("    " + line for line in listing(fn, *row[:2])))
        if same.get(key) is False:  # the kernels differ: does the difference reach this loop?
            other = steady_loop(loops(theirs[key], args.loops), args.at_least)
            if other is None:
                print(f"  steady loop: none in {args.same_as.name}")
            else:
                equal, ratio = same_opcodes(loop_opcodes(fn, *row[:2]),
                                            loop_opcodes(theirs[key], *other[:2]))
                verdict = "same opcodes" if equal else f"opcodes differ (similarity {ratio:.2f})"
                print(f"  steady loop {row[0]:#x}-{row[1]:#x} ({row[2]} instructions, {row[4]} "
                      f"LDL/STL): {verdict} against {args.same_as.name}'s ({other[2]} "
                      f"instructions, {other[4]} LDL/STL)")
    if args.loops:
        which = "the shortest one" if args.at_least <= 1 else \
            f"the shortest one with >= {args.at_least}"
        print(f"{len(steady)} kernels with {args.loops} loops; {which} holds LDL/STL in "
              f"{sum(1 for row in steady if row[4])}")
    if same:
        v = list(same.values())
        print(f"{len(v)} kernels: {v.count(True)} same as {args.same_as.name}, "
              f"{v.count(False)} differ, {v.count(None)} absent there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
