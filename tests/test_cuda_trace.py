"""The decode timeline's per-program records (`platforms/cuda/kernels/trace.py`, QUANTRT_CUDA_TRACE=1): nothing taken
and no timer read with tracing off; records per launch, taken in turn and again from the start when the buffer is
full; the latest step read back in entry order, each launch told apart by the id its programs write; the W4A16
ring compiled for sm_90 reads %globaltimer at entry, after its grid dependency, after its main loop and at exit."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.experimental.gluon") is None,
    reason="triton with Gluon (>= 3.5) is not installed")


@pytest.fixture
def trace(monkeypatch):
    from quantrt.platforms.cuda.kernels import trace as T

    monkeypatch.setattr(T, "_BUF", {})
    monkeypatch.setattr(T, "_META", [])
    monkeypatch.setattr(T, "_NEXT", [0])
    monkeypatch.setattr(T, "ROWS", 16)
    monkeypatch.setenv("QUANTRT_CUDA_TRACE", "1")
    return T


def _write(rec: torch.Tensor, lid: int, t0: int, progs: int) -> None:
    """What the programs of launch `lid` write: entry, wait, loop end, exit, the id."""
    for p in range(progs):
        rec[p * 8:p * 8 + 5] = torch.tensor([t0 + p, t0 + 500, t0 + 1500, t0 + 2000 + p, lid])


def test_nothing_taken_with_tracing_off(trace, monkeypatch):
    monkeypatch.delenv("QUANTRT_CUDA_TRACE")
    assert trace.trace_slot(torch.zeros(1), "ring", 4) == (None, 0)
    assert trace._META == [] and trace._BUF == {}


def test_records_and_the_latest_step_in_entry_order(trace):
    x = torch.zeros(1)
    got = [trace.trace_slot(x, kind, progs, n=i) for i, (kind, progs) in enumerate([("ring", 2), ("attn", 1),
                                                                                     ("ring", 3), ("ring", 2)])]
    assert [r.numel() for r, _ in got] == [16, 8, 24, 16] and [lid for _, lid in got] == [1, 2, 3, 4]
    starts = [r.data_ptr() for r, _ in got]
    assert starts == sorted(set(starts))                                   # one run of records a launch
    base = 10**12
    # launch 1: a stale replay (100 ms older); launches 2-4 of the latest step, written out of entry order
    for (rec, lid), t0, progs in zip(got, (base - 100_000_000, base + 3_000, base, base + 9_000), (2, 1, 3, 2)):
        _write(rec, lid, t0, progs)
    _write(trace._BUF[0][-8:], 99, base + 5_000, 1)                       # an id this process never gave out
    tl = trace.timeline(0)
    assert [o["meta"]["n"] for o in tl] == [2, 1, 3]
    assert [len(o["t"]) for o in tl] == [3, 1, 2]
    assert tl[0]["t0"] == base and int(tl[0]["t"][:, 3].max()) == base + 2002


def test_a_full_buffer_starts_again_and_launches_stay_apart(trace):
    x = torch.zeros(1)
    a = trace.trace_slot(x, "ring", 10, n=0)
    b = trace.trace_slot(x, "ring", 10, n=1)                               # does not fit after a: from the start
    assert b[0].data_ptr() == a[0].data_ptr()
    _write(a[0], a[1], 1000, 10)
    _write(b[0], b[1], 5000, 4)                                            # b's first 4 programs ran
    tl = trace.timeline(0)
    assert [(o["meta"]["n"], len(o["t"])) for o in tl] == [(0, 6), (1, 4)]  # a keeps the records b did not take
    with pytest.raises(ValueError, match="17 programs does not fit the 16-record trace buffer"):
        trace.trace_slot(x, "ring", 17)


@pytest.mark.gluon_compile
def test_traced_ring_reads_the_timer_four_times():
    from tests.test_cuda_ring_wna16 import _compile_sm90

    plain = _compile_sm90(128, 8, torch.bfloat16, False, split=9, tagged=True, pdl=True)
    traced = _compile_sm90(128, 8, torch.bfloat16, False, split=9, tagged=True, pdl=True, trace=True)
    assert "globaltimer" not in plain
    at = [i for i in range(len(traced)) if traced.startswith("%globaltimer", i)]
    assert len(at) == 4 and at[0] < traced.index("griddepcontrol.wait") < at[1]   # entry, then after the wait
