"""The decode timeline's per-program timestamps (`platforms/cuda/kernels/trace.py`, QUANTRT_CUDA_TRACE=1): no slot
and no timer read with tracing off; slots per launch; the latest step read back in entry order; the W4A16 ring
compiled for sm_90 reads %globaltimer at entry, after its grid dependency, after its main loop and at exit."""

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
    return T


def test_no_slot_with_tracing_off(trace, monkeypatch):
    monkeypatch.delenv("QUANTRT_CUDA_TRACE", raising=False)
    assert trace.trace_slot(torch.zeros(1), "ring") is None
    assert trace._META == []


def test_slots_and_the_latest_step_in_entry_order(trace, monkeypatch):
    monkeypatch.setenv("QUANTRT_CUDA_TRACE", "1")
    x = torch.zeros(1)
    slots = [trace.trace_slot(x, kind, n=i) for i, kind in enumerate(["ring", "attn", "ring", "ring"])]
    assert all(s.numel() == trace.PROGS * 4 for s in slots)
    assert len({s.data_ptr() for s in slots}) == 4                      # one slot a launch
    base = 10**12
    # launch 0: a stale replay (100 ms older); launches 1-3 of the latest step, written out of entry order
    for s, t0, progs in ((slots[0], base - 100_000_000, 2), (slots[1], base + 3_000, 1), (slots[2], base, 3),
                         (slots[3], base + 9_000, 2)):
        for p in range(progs):
            s[p * 4:p * 4 + 4] = torch.tensor([t0 + p, t0 + 500, t0 + 1500, t0 + 2000 + p])
    tl = trace.timeline(0)
    assert [o["meta"]["n"] for o in tl] == [2, 1, 3]
    assert [len(o["t"]) for o in tl] == [3, 1, 2]
    assert tl[0]["t0"] == base and int(tl[0]["t"][:, 3].max()) == base + 2002


def test_a_reused_slot_reports_its_latest_launch(trace, monkeypatch):
    monkeypatch.setenv("QUANTRT_CUDA_TRACE", "1")
    monkeypatch.setattr(trace, "SLOTS", 3)
    x = torch.zeros(1)
    slots = [trace.trace_slot(x, "ring", n=i) for i in range(5)]             # launches 3, 4 reuse slots 0, 1
    assert slots[3].data_ptr() == slots[0].data_ptr() and slots[4].data_ptr() == slots[1].data_ptr()
    for i, s in ((3, slots[3]), (4, slots[4]), (2, slots[2])):
        s[:4] = torch.tensor([1000 + i, 1001 + i, 1002 + i, 1003 + i])
    assert [o["meta"]["n"] for o in trace.timeline(0)] == [2, 3, 4]


@pytest.mark.gluon_compile
def test_traced_ring_reads_the_timer_four_times():
    from tests.test_cuda_ring_wna16 import _compile_sm90

    plain = _compile_sm90(128, 8, torch.bfloat16, False, split=9, tagged=True, pdl=True)
    traced = _compile_sm90(128, 8, torch.bfloat16, False, split=9, tagged=True, pdl=True, trace=True)
    assert "globaltimer" not in plain
    at = [i for i in range(len(traced)) if traced.startswith("%globaltimer", i)]
    assert len(at) == 4 and at[0] < traced.index("griddepcontrol.wait") < at[1]   # entry, then after the wait
