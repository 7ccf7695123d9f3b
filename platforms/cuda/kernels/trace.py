"""Per-program timestamps of the decode kernels, for a timeline of one graph-replayed step (a diagnostic:
QUANTRT_CUDA_TRACE=1; off, no kernel changes). The Triton kernels stamp with `t_stamp` / `t_marks` here, the Gluon
ones with `ring_common.g_stamp` / `g_marks` (a Gluon kernel calls only Gluon functions, and a Triton kernel only
Triton ones).

Each traced launch takes a slot of a device buffer [SLOTS, PROGS, 4] int64 when it is launched (or captured): its
programs write %globaltimer (ns, common to all SMs) at entry, when their grid dependency is met (after
griddepcontrol.wait), when their main loop is done and at exit. A graph replays the slots it captured, so after a
run the slots with the latest entry times are the last step replayed. `timeline` reads them back.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SLOTS = 4096
PROGS = 1024      # programs past this many are not recorded (a bf16 GEMV over a wide N has more)
PROGS_C = tl.constexpr(PROGS)
_BUF: dict[int, torch.Tensor] = {}
_META: list[tuple[str, dict]] = []


def trace_on() -> bool:
    return os.environ.get("QUANTRT_CUDA_TRACE", "0") == "1"


def trace_slot(t: torch.Tensor, kind: str, /, **meta) -> torch.Tensor | None:
    """This launch's slot [PROGS * 4] int64 (a view of the device buffer), or None with tracing off."""
    if not trace_on():
        return None
    i = t.device.index or 0
    if i not in _BUF:
        _BUF[i] = torch.zeros(SLOTS * PROGS * 4, dtype=torch.int64, device=t.device)
    slot = len(_META) % SLOTS
    _META.append((kind, meta))
    return _BUF[i][slot * PROGS * 4:(slot + 1) * PROGS * 4]


def timeline(device_index: int = 0) -> list[dict]:
    """The traced launches of the latest step: [{kind, meta, t [progs, 4] ns, t0}] in entry order (slots whose first
    entry is within 50 ms of the latest one; older slots belong to earlier replays). A slot reused after SLOTS
    launches holds its latest launch."""
    buf = _BUF[device_index].view(SLOTS, PROGS, 4).cpu()
    out = []
    for slot in range(min(len(_META), SLOTS)):
        t = buf[slot]
        t = t[t[:, 0] > 0]
        if len(t):
            kind, meta = _META[slot + SLOTS * ((len(_META) - 1 - slot) // SLOTS)]
            out.append({"kind": kind, "meta": meta, "t": t, "t0": int(t[:, 0].min())})
    if not out:
        return []
    latest = max(o["t0"] for o in out)
    out = [o for o in out if o["t0"] > latest - 50_000_000]
    return sorted(out, key=lambda o: o["t0"])


@triton.jit
def t_now():
    """%globaltimer (ns) in a Triton kernel."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def t_stamp(TRACE: tl.constexpr):
    """%globaltimer when tracing, else 0 (nothing emitted)."""
    if TRACE:
        return t_now()
    else:
        return 0


@triton.jit
def t_marks(tr_ptr, prog, t_entry, t_wait, t_loop, TRACE: tl.constexpr):
    """Program `prog`'s record: entry, grid dependency met, main phase done, and now (its exit)."""
    if TRACE:
        ok = prog < PROGS_C
        tl.store(tr_ptr + prog * 4 + 1, t_wait, mask=ok)
        tl.store(tr_ptr + prog * 4 + 2, t_loop, mask=ok)
        tl.store(tr_ptr + prog * 4 + 3, t_now(), mask=ok)
        tl.store(tr_ptr + prog * 4, t_entry, mask=ok)


__all__ = ["PROGS", "t_marks", "t_now", "t_stamp", "timeline", "trace_on", "trace_slot"]
