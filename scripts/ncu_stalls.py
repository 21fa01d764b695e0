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
"""
import collections
import csv
import gzip
import sys


def read(path, source):
    """{address: (samples, sass, {reason: samples}, line in `source` or None)}."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(f))
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
            reasons = {h[len("stall_"):]: int(v) for h, v in zip(header, r)
                       if h.startswith("stall_") and "Not Issued" not in h and v.isdigit()
                       and int(v)}
            old = insts.get(addr)
            insts[addr] = (samples, r[3].strip(), reasons,
                           line if current_file == source else (old[3] if old else None))
    return insts, text


def share(counter, total, n, ndigits=None):
    return [(k, round(100 * v / max(total, 1), ndigits)) for k, v in counter.most_common(n)]


def main(argv):
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
            opcodes[sass.split()[1] if sass.startswith("@") else sass.split()[0]] += s
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
