"""scripts/mla_trace.py's reading of a decode-kernel trace (synthetic slots; the trace itself needs
a tracing build on a GPU)."""
import pathlib

import numpy as np
import pytest

from jax_ds.testing import load_script

mla_trace = m = load_script(pathlib.Path(__file__).resolve().parents[1] / "scripts" /
                            "mla_trace.py")


def _cta(start, segments, blocks_per_segment=10, block_ns=2000, epilogue_ns=4000):
    """One CTA's slots: plan 3 us, then per segment Q 1 us, first KV 0.5 us later, the blocks,
    the epilogue; warpgroup 1 ends 100 ns after warpgroup 0."""
    s = np.zeros(m.SLOTS, np.int64)
    s[m.ENTRY] = start
    t = s[m.PLANNED] = start + 3000
    for k in range(segments):
        if k >= m.SEGS:  # the kernel stamps the first SEGS segments only
            break
        s[m.Q_ISSUE + k] = t
        s[m.Q_FULL + k] = t + 1000
        s[m.FIRST_KV + k] = t + 1500
        s[m.WG1_FIRST_P + k] = t + 3000
        body_end = t + 1000 + blocks_per_segment * block_ns
        s[m.LAST_S + k] = body_end - 1000
        s[m.EPI_START + k] = body_end
        s[m.EPI_END + k] = body_end + epilogue_ns
        s[m.WG1_SEG_END + k] = body_end + epilogue_ns - 500
        t = body_end + epilogue_ns
    t += max(segments - m.SEGS, 0) * (1000 + blocks_per_segment * block_ns + epilogue_ns)
    s[m.WG0_END] = t
    s[m.WG1_END] = t + 100
    s[m.NSEG] = segments
    s[m.NBLK] = segments * blocks_per_segment
    return s


def test_summary_of_a_synthetic_trace():
    slots = np.stack([_cta(1000, 3), _cta(1200, 3), _cta(1000, 2), _cta(1000, 0)])
    slots[:, m.SPLITS] = [0b101, 0b001, 0b000, 0]  # segments that wrote partials
    ends = [s[m.WG1_END] for s in slots[:3]]
    combine = np.array([500, max(ends) + 800, max(ends) + 900, max(ends) + 20000])
    out = m.summarize(slots, combine)
    assert out["ctas"] == 3 and out["idle ctas"] == 1  # the CTA without a segment is left out
    assert out["segments per CTA"] == pytest.approx(8 / 3)
    assert out["split segments per CTA"] == pytest.approx(1.0)
    assert out["plan"] == pytest.approx(3.0)
    assert out["entry spread"] == pytest.approx(200 / 3 / 1e3)
    assert out["Q issue -> Q full (per segment)"] == pytest.approx(1.0)
    assert out["Q full -> first KV (per segment)"] == pytest.approx(0.5)
    assert out["WG0 epilogue (per segment)"] == pytest.approx(4.0)
    assert out["WG1 first P after Q full (per segment)"] == pytest.approx(2.0)
    assert out["WG1 end after WG0's (per segment)"] == pytest.approx(-0.5)
    # the body runs from Q full to the epilogue: 10 blocks of 2 us a segment
    assert out["body per KV block"] == pytest.approx(2.0)
    assert out["epilogues per CTA"] == pytest.approx(4.0 * 8 / 3)
    assert out["between segments per CTA"] == pytest.approx(1.0 * 5 / 3)  # the next Q's 1 us
    assert out["entry -> first Q full"] == pytest.approx(4.0)
    assert out["last epilogue -> CTA end"] == pytest.approx(0.1)
    assert out["tail (last end - mean end)"] == pytest.approx(
        (max(ends) - np.mean(ends)) / 1e3)
    assert out["combine first after wait - decode end"] == pytest.approx(0.8)
    assert out["combine last after wait - decode end"] == pytest.approx(0.9)
    assert out["combine last end - decode end"] == pytest.approx(20.0)


def test_summary_without_the_combine_or_past_the_traced_segments():
    slots = np.stack([_cta(0, 2), _cta(0, m.SEGS + 1)])
    out = m.summarize(slots, m.NO_COMBINE)  # not launched, or back-to-back calls
    assert not any(k.startswith("combine") for k in out)
    assert "body per KV block" not in out  # a CTA ran segments the trace has no slots for
    assert out["WG0 epilogue (per segment)"] == pytest.approx(4.0)


def test_summarize_saved_traces(tmp_path, capsys):
    slots = np.stack([_cta(0, 2), _cta(100, 3)])
    path = tmp_path / "t.npz"
    np.savez(path, **{"b2 s_k64 h16 sq1 isolated 0": slots,
                      "b2 s_k64 h16 sq1 isolated 0 combine": m.NO_COMBINE,
                      "b2 s_k64 h16 sq1 back-to-back 0": slots})
    mla_trace.summarize_files([str(path)])
    text = capsys.readouterr().out
    assert "b2 s_k64 h16 sq1 isolated (1 calls, us)" in text
    assert "b2 s_k64 h16 sq1 back-to-back (1 calls, us)" in text
    assert "WG0 epilogue (per segment)" in text


def test_read_checks_the_library_trace_size():
    """read(): the library's g_trace as [CTAs, slots] (the first `ctas` rows) and the combine
    kernel's four values; a trace of another size (the kernel's slots changed, the script's
    constants not) is refused instead of misread."""
    class TracingBuild:  # stands in for jax_ds._C built with -DJAX_DS_MLA_TRACE
        def __init__(self, n):
            self.raw = np.arange(n, dtype=np.uint64)

        def mla_trace_read(self):
            return self.raw.tobytes()

    slots, combine = m.read(TracingBuild(m.CTAS * m.SLOTS + 4), 3)
    assert slots.shape == (3, m.SLOTS) and slots[1, 0] == m.SLOTS
    assert combine.tolist() == [m.CTAS * m.SLOTS + i for i in range(4)]
    with pytest.raises(SystemExit, match="its slots"):
        m.read(TracingBuild(m.CTAS * m.SLOTS * 2 + 4), 3)


def test_slot_constants_match_the_kernel():
    """The script's slot numbers are the kernel's TraceSlot enum and trace sizes, read from
    ffi/mla/mla_decode.cu (a slot moved there and not here would misread every trace)."""
    import re
    root = pathlib.Path(__file__).resolve().parents[1]
    src = (root / "ffi" / "mla" / "mla_decode.cu").read_text()
    sizes = re.search(r"kTraceCtas = (\d+), kTraceSlots = (\d+), kTraceSegs = (\d+);", src)
    assert sizes, "ffi/mla/mla_decode.cu: the trace sizes' line moved"
    assert tuple(int(x) for x in sizes.groups()) == (m.CTAS, m.SLOTS, m.SEGS)
    body = re.search(r"enum TraceSlot \{(.*?)\};", src, re.S)
    assert body, "ffi/mla/mla_decode.cu: no TraceSlot enum"
    slots = {name: int(v) for name, v in re.findall(r"(kTr\w+) = (\d+)", body.group(1))}
    ours = dict(kTrEntry=m.ENTRY, kTrPlanned=m.PLANNED, kTrProducerDone=m.PRODUCER_DONE,
                kTrWg0End=m.WG0_END, kTrWg1End=m.WG1_END, kTrSegments=m.NSEG, kTrBlocks=m.NBLK,
                kTrSplitMask=m.SPLITS, kTrQIssue=m.Q_ISSUE, kTrQFull=m.Q_FULL,
                kTrFirstKv=m.FIRST_KV, kTrLastS=m.LAST_S, kTrEpiStart=m.EPI_START,
                kTrEpiEnd=m.EPI_END, kTrWg1FirstP=m.WG1_FIRST_P, kTrWg1SegEnd=m.WG1_SEG_END)
    assert slots == ours
    per_segment = sorted(v for k, v in slots.items() if v >= m.Q_ISSUE)
    assert all(b - a == m.SEGS for a, b in zip(per_segment, per_segment[1:]))  # no overlap
    assert per_segment[-1] + m.SEGS <= m.SLOTS
