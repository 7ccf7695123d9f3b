"""Per-program timestamps of the decode kernels, for a timeline of one graph-replayed step (a diagnostic:
QUANTRT_CUDA_TRACE=1; off, no kernel changes). The Triton kernels stamp with `t_rec` / `t_stamp` / `t_done` here,
the Gluon ones with `ring_common.g_rec` / `g_stamp` / `g_done` (a Gluon kernel calls only Gluon functions, and a
Triton kernel only Triton ones).

Each traced launch takes one record per program in a device buffer when it is launched (or captured): its programs
write %globaltimer (ns, common to all SMs) at entry, when their grid dependency is met (after
griddepcontrol.wait), when their main loop is done and at exit, and the launch's id; each time is stored as it is
read (`t_stamp`), so tracing holds no registers across the kernel. A graph replays into the
records it captured, so after a run the launches with the latest entry times are the last step replayed.
`timeline` reads them back.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ROWS = 1 << 21    # program records in the device buffer (128 MB), reused from the start when full
WIDTH = 8         # int64 a record: entry, wait, loop end, exit, launch id, (3 unused: 64-byte records)
WIDTH_C = tl.constexpr(WIDTH)
_BUF: dict[int, torch.Tensor] = {}
_NEXT = [0]
_META: list[tuple[str, dict]] = []


def trace_on() -> bool:
    return os.environ.get("QUANTRT_CUDA_TRACE", "0") == "1"


def trace_slot(t: torch.Tensor, kind: str, progs: int, /, **meta) -> tuple[torch.Tensor | None, int]:
    """(this launch's records [progs * WIDTH] int64, a view of the device buffer, and its launch id) or (None, 0)
    with tracing off. The records are taken in turn from the buffer, from its start again when it is full; each
    program writes the launch id into its record, so `timeline` tells launches apart after the buffer wrapped."""
    if not trace_on():
        return None, 0
    i = t.device.index or 0
    if i not in _BUF:
        _BUF[i] = torch.zeros(ROWS * WIDTH, dtype=torch.int64, device=t.device)
    if progs > ROWS:
        raise ValueError(f"a traced launch of {progs} programs does not fit the {ROWS}-record trace buffer")
    if _NEXT[0] + progs > ROWS:
        _NEXT[0] = 0
    start = _NEXT[0]
    _NEXT[0] += progs
    _META.append((kind, meta))
    return _BUF[i][start * WIDTH:(start + progs) * WIDTH], len(_META)


def timeline(device_index: int = 0) -> list[dict]:
    """The traced launches of the latest step: [{kind, meta, t [progs, 4] ns, t0}] in entry order (launches whose
    first entry is within 50 ms of the latest one; older ones belong to earlier replays). A launch whose records were
    partly taken by a later one keeps the rest."""
    rec = _BUF[device_index].view(ROWS, WIDTH).cpu()
    rec = rec[(rec[:, 0] > 0) & (rec[:, 4] > 0) & (rec[:, 4] <= len(_META))]
    if not len(rec):
        return []
    rec = rec[torch.argsort(rec[:, 4], stable=True)]
    ids, counts = torch.unique_consecutive(rec[:, 4], return_counts=True)
    out = []
    for lid, t in zip(ids.tolist(), torch.split(rec[:, :4], counts.tolist())):
        kind, meta = _META[lid - 1]
        out.append({"kind": kind, "meta": meta, "t": t, "t0": int(t[:, 0].min())})
    latest = max(o["t0"] for o in out)
    out = [o for o in out if o["t0"] > latest - 50_000_000]
    return sorted(out, key=lambda o: o["t0"])


@triton.jit
def t_now():
    """%globaltimer (ns) in a Triton kernel."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def t_rec(tr_ptr, prog, TRACE: tl.constexpr):
    """Program `prog`'s record in this launch's records (0 with tracing off)."""
    if TRACE:
        return tr_ptr + prog.to(tl.int64) * WIDTH_C
    else:
        return 0


@triton.jit
def t_stamp(rec, slot: tl.constexpr, TRACE: tl.constexpr, ALSO: tl.constexpr = None):
    """%globaltimer stored now at rec[slot] (0 entry, 1 grid dependency met, 2 main phase done), and at rec[ALSO]
    (a kernel without a main loop: its wait is its loop end): nothing is held in registers across the kernel.
    Nothing emitted with tracing off."""
    if TRACE:
        now = t_now()
        tl.store(rec + slot, now)
        if ALSO is not None:
            tl.store(rec + ALSO, now)


@triton.jit
def t_done(rec, tr_id, TRACE: tl.constexpr):
    """The record's exit time and launch id."""
    if TRACE:
        tl.store(rec + 3, t_now())
        tl.store(rec + 4, tr_id)


__all__ = ["ROWS", "WIDTH", "t_done", "t_now", "t_rec", "t_stamp", "timeline", "trace_on", "trace_slot"]
