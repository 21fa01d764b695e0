"""scripts/ffma_yield.py: which FFMAs it changes, that it changes only their reuse and yield
bits, in every copy of a selected kernel's code and in no other kernel; and, where nvcc and
cuobjdump are both installed, the same on a compiled kernel, checked by disassembling it.
Also scripts/sass_stats.py's counts and spacing on the same synthetic listing."""

import pathlib
import shutil
import subprocess

import pytest

from jax_ds.testing import load_script

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "ffma_yield.py"
fy = load_script(SCRIPT)

YIELD = 1 << fy.YIELD_BIT
REUSE_B = 1 << 59
STALL_1 = 1 << 41


def _ffma(i, reused):
    """An FFMA as ptxas alternates them: reused operand + no yield, or yield allowed."""
    lo = 0x0000000000007223 | (i << 16)
    hi = 0x000fe20000000000 | STALL_1 | ((REUSE_B | YIELD) if reused else 0)
    return f"FFMA R{i}, R{i + 40}, R9{'.reuse' if reused else ''}, R{i}", lo, hi


def _other(i, text="IADD3 R1, R1, 0x1, RZ"):
    return text, 0x0000000000017810 | (i << 20), 0x000fc80007ffe0ff | YIELD


def _function(name, body):
    """cuobjdump -sass text of one function from [(text, lo, hi)]."""
    lines = [f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM90"']
    for i, (text, lo, hi) in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {text} ;"
                     f"                  /* {lo:#018x} */")
        lines.append(f"{'':96s}/* {hi:#018x} */")
    return "\n".join(lines)


def _listing(functions):
    return ("\nFatbin elf code:\n================\narch = sm_90a\n\n\tcode for sm_90a\n"
            + "\n\n".join(_function(n, b) for n, b in functions) + "\n")


GEMM = "_ZN6jax_ds4gemm20sm90_fp8_gemm_kernelILi128E"
GEMM_BODY = ([_other(0), _other(1)] + [_ffma(i, reused=i % 2 == 0) for i in range(10)]
             + [_other(2), ("@P0 FFMA R3, R4, R5, R3", 0x7223, 0x000fe20000000000 | REUSE_B | YIELD)]
             + [_ffma(20 + i, reused=True) for i in range(4)] + [_other(3, "EXIT")])
OTHER = "_Z5otherv"
OTHER_BODY = [_ffma(i, reused=i % 2 == 0) for i in range(12)] + [_other(4, "EXIT")]


def _parsed():
    return fy.parse_sass(_listing([(GEMM, GEMM_BODY), (OTHER, OTHER_BODY)]))


def _binary(functions):
    gemm, other = functions
    return bytearray(b"\x7fELF" + bytes(100) + gemm.code() + bytes(52) + other.code()
                     + bytes(16) + gemm.code() + bytes(8))


def _read_back(data, fn, offset):
    """fn as it now lies at `offset` of data (texts kept: only the words are compared)."""
    instrs = [fy.Instr(x.addr, x.text, int.from_bytes(data[offset + 16 * i:offset + 16 * i + 8],
                                                      "little"),
                       int.from_bytes(data[offset + 16 * i + 8:offset + 16 * i + 16], "little"))
              for i, x in enumerate(fn.instrs)]
    return fy.Function(fn.arch, fn.name, instrs)


def test_parse_reads_both_words_in_order():
    gemm, other = _parsed()
    assert (gemm.arch, gemm.name, other.name) == ("sm_90a", GEMM, OTHER)
    assert [(x.lo, x.hi) for x in gemm.instrs] == [(lo, hi) for _, lo, hi in GEMM_BODY]
    assert gemm.instrs[2].opcode == "FFMA" and gemm.instrs[13].opcode == ""  # predicated
    assert [x.addr for x in other.instrs] == [16 * i for i in range(len(OTHER_BODY))]


def test_runs_are_unpredicated_ffmas_of_min_length():
    gemm, other = _parsed()
    assert fy.ffma_runs(gemm, 8) == [(2, 12)]
    assert fy.ffma_runs(gemm, 4) == [(2, 12), (14, 18)]
    assert fy.ffma_runs(other, 8) == [(0, 12)]


@pytest.mark.parametrize("fraction, changed", [(0.0, []), (0.5, [2, 4, 6]),
                                               (1.0, [2, 4, 6, 8, 10])])
def test_plan_takes_the_reused_ffmas_of_each_runs_head(fraction, changed):
    gemm, _ = _parsed()
    plan = fy.plan(gemm, fraction, 8)
    assert sorted(plan) == changed
    for i, hi in plan.items():
        old = gemm.instrs[i].hi
        assert hi & fy.REUSE_MASK == 0 and hi & YIELD == 0
        assert hi | REUSE_B | YIELD == old  # nothing else moved: stall count, barriers
    with pytest.raises(ValueError, match="fraction"):
        fy.plan(gemm, 1.5, 8)


def test_plan_every_also_takes_the_no_yield_ffmas_without_reuse():
    gemm, _ = _parsed()
    for i in (3, 5):  # no reuse flag, but the no-yield flag
        gemm.instrs[i].hi |= YIELD
    assert sorted(fy.plan(gemm, 0.5, 8)) == [2, 4, 6]
    plan = fy.plan(gemm, 0.5, 8, every=True)
    assert sorted(plan) == [2, 3, 4, 5, 6]
    assert plan[3] == gemm.instrs[3].hi & ~YIELD


def test_patch_changes_every_copy_of_selected_kernels_only():
    functions = _parsed()
    gemm, other = functions
    data = _binary(functions)
    before = bytes(data)
    report = fy.patch(data, functions, fraction=0.5, min_run=8)
    assert report == [("sm_90a", GEMM, 1, 10, 3, 2)]
    offsets = fy.locate(before, gemm)
    assert len(offsets) == 2
    for at in offsets:
        assert fy.verify([gemm], [_read_back(data, gemm, at)], fraction=0.5) == []
    # the other kernel and the bytes around the code are untouched
    at_other = fy.locate(before, other)[0]
    assert data[at_other:at_other + len(other.code())] == other.code()
    changed = [i for i in range(len(data)) if data[i] != before[i]]
    assert all(any(at <= i < at + len(gemm.code()) for at in offsets) for i in changed)
    # a second pass finds nothing left to change
    again = fy.patch(data, [_read_back(data, gemm, offsets[0]), other], fraction=0.5)
    assert again[0][4] == 0


def test_verify_flags_any_other_difference():
    functions = _parsed()
    gemm = functions[0]
    data = _binary(functions)
    fy.patch(data, functions, fraction=0.5)
    at = fy.locate(bytes(_binary(functions)), gemm)[0]
    after = _read_back(data, gemm, at)
    after.instrs[3].hi ^= STALL_1  # a stall count that moved
    after.instrs[0].lo ^= 1  # an operand that moved
    problems = fy.verify([gemm], [after], fraction=0.5)
    assert len(problems) == 2 and "control" in problems[0] + problems[1]
    assert fy.verify([gemm], [gemm], fraction=0.5)  # the planned change missing is a problem
    assert fy.verify([gemm], [], fraction=0.5) == ["the function lists differ"]


def test_code_not_in_the_file_is_an_error():
    functions = _parsed()
    with pytest.raises(ValueError, match="not found"):
        fy.patch(bytearray(b"\0" * 4096), functions)


KERNEL = r"""
__global__ void promote(const float* acc, const float* s, float* out, int n) {
  float a[32], r[32];
  const float sc = s[0] * s[blockIdx.x + 1];
  for (int i = 0; i < 32; ++i) { a[i] = acc[threadIdx.x + i * 128]; r[i] = out[threadIdx.x + i * 128]; }
  for (int k = 0; k < n; ++k) {
    const float t = sc * s[k + 2];
#pragma unroll
    for (int i = 0; i < 32; ++i) r[i] = fmaf(a[i], t, r[i]);
  }
  for (int i = 0; i < 32; ++i) out[threadIdx.x + i * 128] = r[i];
}
"""


def _tools():
    try:
        return shutil.which("nvcc"), fy.cuobjdump()
    except FileNotFoundError:
        return None, None


@pytest.mark.skipif(not all(_tools()), reason="needs nvcc and cuobjdump")
def test_compiled_kernel_round_trip(tmp_path):
    nvcc, _ = _tools()
    src = tmp_path / "k.cu"
    src.write_text(KERNEL)
    obj = tmp_path / "k.o"
    subprocess.run([nvcc, "-O3", "--generate-code=arch=compute_90a,code=[sm_90a]", "-c",
                    str(src), "-o", str(obj)], check=True)
    before = fy.disassemble(obj)
    assert fy.main([str(obj), "--out", str(tmp_path / "y.o"), "--kernels", "promote",
                    "--check"]) == 0
    after = fy.disassemble(tmp_path / "y.o")
    planned = fy.plan(before[0], 0.5, 8)
    assert planned, "ptxas gave this kernel no reused FFMAs: the test needs another kernel"
    assert fy.verify(before, after, kernels="promote") == []
    assert sum(".reuse" in x.text for x in after[0].instrs) < \
        sum(".reuse" in x.text for x in before[0].instrs)


STATS = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "sass_stats.py"
ss = load_script(STATS)


def test_sass_stats_counts_and_spacing():
    gemm, _ = _parsed()
    s = ss.stats(gemm, ["FFMA", "IADD3", "EXIT"], gaps="IADD3")
    # 14 unpredicated FFMAs and the predicated one (its predicate is not the opcode)
    assert (s["instructions"], s["FFMA"], s["IADD3"], s["EXIT"]) == (len(GEMM_BODY), 15, 3, 1)
    # IADD3 at 0, 1 and 12 (stall field 4 each); the FFMAs between have stall field 1: one
    # apart (4 cycles), then 11 apart (4 + 10 x 1)
    assert s["gaps"] == [(1, 4), (11, 14)]
    assert ss.stats(gemm, [])["gaps"] is None


def test_sass_stats_loops():
    """--loops: a backward branch and the code from its target up to it, when it holds the
    prefix; forward branches and loops without it are not listed."""
    body = [_other(0), ("QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24", 0x7, 0x0),
            ("LDL R5, [R1+0x4]", 0x7, 0x0), ("@P1 BRA 0x60", 0x7, 0x0), _other(1),
            ("@!P0 BRA 0x10", 0x7, 0x0), _other(2), ("BRA 0x60", 0x7, 0x0), _other(3, "EXIT")]
    fn, = fy.parse_sass(_listing([(GEMM, body)]))
    assert ss.loops(fn, "QGMMA") == [(0x10, 0x50, 5, 1, 1)]
    assert ss.loops(fn, "HGMMA") == []
    assert ss.loops(fn, "IADD3") == [(0x10, 0x50, 5, 1, 1), (0x60, 0x70, 2, 1, 0)]
    # --count inside each loop: where its loads come from
    assert ss.loops(fn, "QGMMA", ["LDL", "LDG"]) == [(0x10, 0x50, 5, 1, 1, {"LDL": 1, "LDG": 0})]


def test_sass_stats_listing_decodes_the_scheduling_fields():
    """--listing: each instruction's stall, yield, write / read scoreboards and wait mask from
    the high word, for the instructions of the given address range only."""
    hi = 3 << 41 | YIELD | 2 << 46 | 7 << 49 | 0b100110 << 52
    body = [_other(0), ("SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3", 0x7, hi),
            ("@!P0 BRA 0x10", 0x7, 0xB << 41 | 7 << 46 | 7 << 49 | 0b10 << 52), _other(1, "EXIT")]
    fn, = fy.parse_sass(_listing([(GEMM, body)]))
    assert ss.control(hi) == {"stall": 3, "yield": 1, "write": 2, "read": 7, "wait": 0b100110}
    lines = ss.listing(fn, 0x10, 0x20)
    assert len(lines) == 2
    assert lines[0].split()[:6] == ["10", "s3", "y1", "w2", "r-", "wait"]
    assert lines[0].split()[6] == "125"  # scoreboards 1, 2 and 5
    assert lines[0].endswith("TRYWAIT P0, [UR4], R3")
    assert lines[1].split()[:7] == ["20", "s11", "y0", "w-", "r-", "wait", "1"]
    # the synthetic IADD3 (stall 4, yield, no scoreboards): a dash for each, nothing waited for
    assert ss.listing(fn, 0, 0)[0].split()[:7] == ["0", "s4", "y1", "w-", "r-", "wait", "-"]


def test_sass_stats_same_code():
    """--same-as: same code when every instruction's two words match, whatever the listing's
    other text; a changed word or instruction differs; a kernel the other build lacks is absent."""
    mine = _parsed()
    same = fy.parse_sass(_listing([(GEMM, GEMM_BODY), (OTHER, OTHER_BODY)]))
    g, o = ("sm_90a", GEMM, 0), ("sm_90a", OTHER, 0)
    assert ss.same_code(mine, same) == {g: True, o: True}
    # one control word changed (a stall count) in the GEMM; the other kernel gone
    text, lo, hi = GEMM_BODY[5]
    changed = GEMM_BODY[:5] + [(text, lo, hi ^ (1 << 41))] + GEMM_BODY[6:]
    theirs = fy.parse_sass(_listing([(GEMM, changed)]))
    assert ss.same_code(mine, theirs) == {g: False, o: None}
    shorter = fy.parse_sass(_listing([(GEMM, GEMM_BODY[:-2] + GEMM_BODY[-1:])]))
    assert ss.same_code(mine, shorter)[g] is False
    # a name held twice (two translation units): the n-th against the n-th
    twice = fy.parse_sass(_listing([(GEMM, GEMM_BODY), (GEMM, changed)]))
    assert ss.same_code(twice, twice) == {g: True, ("sm_90a", GEMM, 1): True}
    swapped = fy.parse_sass(_listing([(GEMM, changed), (GEMM, GEMM_BODY)]))
    assert ss.same_code(twice, swapped) == {g: False, ("sm_90a", GEMM, 1): False}
    # a kernel of an anonymous namespace: its name's hashes differ from build to build
    anon = "_ZN6jax_ds3moe43_GLOBAL__N__bfa78985_10_routing_cu_bb350ef812count_kernelEPKiliPi"
    other_build = anon.replace("bfa78985", "0123abcd").replace("bb350ef8", "4567cdef")
    assert ss.stable_name(anon) == ss.stable_name(other_build) == \
        "_ZN6jax_ds3moe(anonymous)12count_kernelEPKiliPi"
    here = fy.parse_sass(_listing([(anon, OTHER_BODY)]))
    there = fy.parse_sass(_listing([(other_build, OTHER_BODY)]))
    assert ss.same_code(here, there) == {("sm_90a", ss.stable_name(anon), 0): True}
    assert ss.stable_name(GEMM) == GEMM  # no anonymous namespace: unchanged


def test_sass_stats_closing_lines(monkeypatch, capsys):
    """main's closing lines: the kernels whose shortest --loops loop spills, and the --same-as
    count (a kernel whose mangled name, parameters included, is not in the other build is
    absent)."""
    spills = [_other(0), ("QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24", 0x7, 0x0),
              ("LDL R5, [R1+0x4]", 0x7, 0x0), ("@P1 BRA 0x10", 0x7, 0x0), _other(1, "EXIT")]
    clean = [_other(0), ("QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24", 0x7, 0x0),
             ("@P1 BRA 0x10", 0x7, 0x0), _other(1, "EXIT")]
    libs = {"a.so": [(GEMM + "a", spills), (GEMM + "b", clean), (OTHER, OTHER_BODY)],
            "b.so": [(GEMM + "a", spills), (GEMM + "b", spills)]}
    monkeypatch.setattr(ss.ffma_yield, "disassemble",
                        lambda path: fy.parse_sass(_listing(libs[pathlib.Path(path).name])))
    assert ss.main(["a.so", "--loops", "QGMMA", "--same-as", "b.so"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "2 kernels with QGMMA loops; the shortest one holds LDL/STL in 1"
    assert out[-1] == "3 kernels: 1 same as b.so, 1 differ, 1 absent there"


def test_sass_stats_steady_loop_at_least_and_its_opcodes(monkeypatch, capsys):
    """--at-least N: the steady loop is the shortest holding N or more of the prefix (MLA's
    warpgroup 0 loop, not warpgroup 1's shorter one); with --same-as, whether two builds' steady
    loops hold the same opcodes in order (registers aside) and how similar they are."""
    hg = ("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24", 0x7, 0x0)
    # a short loop with one HGMMA (0x10-0x30), then a longer one with two (0x40-0x80)
    body = [_other(0), hg, _other(1), ("@P1 BRA 0x10", 0x7, 0x0),
            hg, ("FMUL R2, R2, R3", 0x7, 0x0), hg, ("LDL R5, [R1+0x4]", 0x7, 0x0),
            ("@P2 BRA 0x40", 0x7, 0x0), _other(2, "EXIT")]
    fn, = fy.parse_sass(_listing([(GEMM, body)]))
    found = ss.loops(fn, "HGMMA")
    assert ss.steady_loop(found) == (0x10, 0x30, 3, 1, 0)
    assert ss.steady_loop(found, 2) == (0x40, 0x80, 5, 2, 1)
    assert ss.steady_loop(found, 3) is None
    assert ss.loop_opcodes(fn, 0x40, 0x80) == ["HGMMA.64x64x16.F32.BF16", "FMUL",
                                                "HGMMA.64x64x16.F32.BF16", "LDL", "BRA"]
    assert ss.same_opcodes(["A", "B"], ["A", "B"]) == (True, 1.0)
    assert ss.same_opcodes(["A", "B", "C", "D"], ["A", "B", "X", "D"]) == (False, 0.75)
    # the other build: the FMUL's registers changed (same opcodes), then the FMUL gone
    regs = body[:5] + [("FMUL R7, R7, R3", 0x8, 0x0)] + body[6:]
    gone = body[:5] + body[6:]
    libs = {"a.so": [(GEMM, body)], "b.so": [(GEMM, regs)], "c.so": [(GEMM, gone)],
            "d.so": [(GEMM, [_other(0), _other(1, "EXIT")])]}
    monkeypatch.setattr(ss.ffma_yield, "disassemble",
                        lambda path: fy.parse_sass(_listing(libs[pathlib.Path(path).name])))

    def run(other):
        assert ss.main(["a.so", "--loops", "HGMMA", "--at-least", "2", "--same-as", other]) == 0
        return capsys.readouterr().out.splitlines()

    out = run("b.so")
    assert out[-3] == ("  steady loop 0x40-0x80 (5 instructions, 1 LDL/STL): same opcodes "
                       "against b.so's (5 instructions, 1 LDL/STL)")
    assert out[-2] == "1 kernels with HGMMA loops; the shortest one with >= 2 holds LDL/STL in 1"
    assert "opcodes differ (similarity 0.89) against c.so's (4 instructions" in run("c.so")[-3]
    assert run("d.so")[-3] == "  steady loop: none in d.so"
    assert ss.main(["a.so", "--loops", "HGMMA", "--at-least", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "0 kernels with HGMMA loops; the shortest one with >= 3 holds LDL/STL in 0"
    # the same code: no steady-loop line
    assert not any("steady loop" in line for line in run("a.so"))
