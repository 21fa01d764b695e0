"""Where a kernel's warps wait, by source line: reads Nsight Compute's per-instruction source page.

    ncu --target-processes all --kernel-name regex:DecodeKernel --launch-skip 1 --launch-count 1 \
        --section WarpStateStats --section SourceCounters -o mla \
        python scripts/check_mla.py --profile 128 4096 128 1
    ncu --import mla.ncu-rep --page source --print-source sass,cuda --csv | gzip > mla.csv.gz
    python scripts/ncu_stalls.py mla.csv.gz mla_decode.cu wg0:426-600 wg1:601-662

(build with CMAKE_CUDA_FLAGS=-lineinfo for the source lines). The page lists every SASS
instruction once per source file it is attributed to (inlined helpers appear under the header and
under the caller); here each instruction counts once, under the line of `source` (the file name)
it belongs to. Prints the stall reasons over all sampled instructions, the opcodes of the samples
no line of that file holds (code of inlined headers), then per named line range
[lo, hi] of that file its share of the samples, its reasons and its busiest lines, then the
busiest lines of the file. Samples are per warp: a warpgroup idle at a barrier shows as much as
one that works.

    python scripts/ncu_stalls.py --sass PAGE.csv.gz [MIN_EXECUTED]

reads the page by SASS instruction alone (a kernel without line information, such as cuBLAS's,
exported with `--print-source sass`, or any page): the shares of executed instructions and of
samples by opcode, the stall reasons, and, with MIN_EXECUTED, every instruction executed at
least that many times (a kernel's hot loops), in address order with its executions, samples and
two main reasons.
"""
import collections
import csv
import gzip
import sys


def rows_of(path):
    """The page's CSV rows (gzipped or not)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return list(csv.reader(f))


def reasons_of(header, row):
    """{reason: samples} of an instruction row: the header's stall_* columns (all samples, not
    the "(Not Issued)" copies) that hold a count."""
    return {h[len("stall_"):]: int(v) for h, v in zip(header, row)
            if h.startswith("stall_") and "Not Issued" not in h and v.isdigit() and int(v)}


def opcode(sass, modifiers=True):
    """The opcode without its predicate: '@!P0 BRA.U 0x10' -> 'BRA.U' ('BRA' without modifiers)."""
    words = sass.split()
    op = words[1] if words[0].startswith("@") else words[0]
    return op if modifiers else op.split(".")[0]


def read(path, source):
    """{address: (samples, sass, {reason: samples}, line in `source` or None)}."""
    rows = rows_of(path)
    header, current_file, line, insts, text = None, None, None, {}, {}
    for r in rows:
        if not r:
            continue
        if r[0] == "File Path":
            current_file = r[1].rsplit("/", 1)[-1]
        elif r[0] == "Line No":
            header = r
        elif header is None or r[0] == "Function Name":
            continue
        elif r[0]:  # a source line; the SASS rows under it belong to it
            line = int(r[0])
            if current_file == source:
                text[line] = r[1].strip()
        else:
            addr = r[2]
            samples = int(r[4]) if r[4].isdigit() else 0
            reasons = reasons_of(header, r)
            old = insts.get(addr)
            insts[addr] = (samples, r[3].strip(), reasons,
                           line if current_file == source else (old[3] if old else None))
    return insts, text


def read_sass(path):
    """{address: (executed, samples, sass, {reason: samples})}, each address once, from a source
    page with or without source lines (the columns found by name in its header rows)."""
    header, col, insts = None, None, {}
    for r in rows_of(path):
        if "Address" in r and "Instructions Executed" in r:
            header, a = r, r.index("Address")
            col = {"addr": a, "sass": a + 1, "samples": r.index("Warp Stall Sampling (All Samples)"),
                   "executed": r.index("Instructions Executed")}
            continue
        if col is None or len(r) <= col["addr"] or not r[col["addr"]].startswith("0x"):
            continue
        addr = int(r[col["addr"]], 16)
        if addr not in insts:
            executed, samples = (int(r[col[k]]) if r[col[k]].isdigit() else 0
                                 for k in ("executed", "samples"))
            insts[addr] = (executed, samples, r[col["sass"]].strip(), reasons_of(header, r))
    return insts


def main_sass(path, min_executed=None):
    insts = read_sass(path)
    executed = sum(v[0] for v in insts.values())
    samples = sum(v[1] for v in insts.values())
    print(f"{len(insts)} instructions, {executed} executed (warp level), {samples} samples")
    by_exec, by_samples, reasons = (collections.Counter() for _ in range(3))
    for e, n, sass, r in insts.values():
        by_exec[opcode(sass, False)] += e
        by_samples[opcode(sass, False)] += n
        reasons.update(r)
    print("executed, by opcode (%):", share(by_exec, executed, 12, 1))
    print("samples, by opcode (%):", share(by_samples, samples, 12, 1))
    print("reasons (% of samples):", share(reasons, samples, 10, 1))
    if min_executed is None:
        return
    base = min(insts)
    for addr in sorted(insts):
        e, n, sass, r = insts[addr]
        if e >= min_executed:
            top = ", ".join(f"{k} {v}" for k, v in collections.Counter(r).most_common(2))
            print(f"  {addr - base:6x} {e:10d} {n:6d}  {sass[:60]:60s} {top}")


def share(counter, total, n, ndigits=None):
    return [(k, round(100 * v / max(total, 1), ndigits)) for k, v in counter.most_common(n)]


def main(argv):
    if argv and argv[0] == "--sass":
        return main_sass(argv[1], int(argv[2]) if len(argv) > 2 else None)
    path, source, *ranges = argv
    insts, text = read(path, source)
    total = sum(s for s, *_ in insts.values())
    reasons = collections.Counter()
    for s, _, r, _ in insts.values():
        reasons.update(r)
    unmapped = sum(s for s, _, _, line in insts.values() if line is None)
    print(f"{total} samples over {len(insts)} instructions; {100 * unmapped / total:.0f}% not "
          f"attributed to a line of {source}")
    print("reasons (% of samples):", share(reasons, total, 8))
    opcodes = collections.Counter()   # what the unattributed part is (inlined headers' code)
    for s, sass, _, line in insts.values():
        if line is None:
            opcodes[opcode(sass)] += s
    print("not attributed, by opcode (% of samples):", share(opcodes, total, 8, 1))
    by_line = collections.Counter()
    for s, _, _, line in insts.values():
        if line is not None:
            by_line[line] += s
    for spec in ranges:
        name, span = spec.split(":")
        lo, hi = map(int, span.split("-"))
        sel = [v for v in insts.values() if v[3] is not None and lo <= v[3] <= hi]
        n = sum(v[0] for v in sel)
        rs, lines = collections.Counter(), collections.Counter()
        for s, _, r, line in sel:
            rs.update(r)
            lines[line] += s
        print(f"{name} (lines {lo}-{hi}): {100 * n / total:.1f}% of samples; reasons "
              f"{share(rs, n, 5)}; lines {share(lines, n, 8)}")
    print("busiest lines:")
    for line, s in by_line.most_common(15):
        print(f"  {line:5d} {100 * s / total:5.1f}%  {text.get(line, '')[:80]}")


if __name__ == "__main__":
    main(sys.argv[1:])
