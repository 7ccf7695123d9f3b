"""Per-token activation scales found inside a linear's own launch (imported lazily): no separate scale launch.

Protocol (one launch; safe under CUDA graphs and whatever the number of resident programs): every program
takes a ticket from an atomic counter (arrival order). The first S tickets ("writers") each read one
KW-wide K slice of the x rows, atomically max their partial |x| into `amax` [BM] and count themselves
done; every program then waits until done == S and reads the per-row amax. A program waits only on
programs that took earlier tickets, which are already running, so it cannot deadlock however the
hardware schedules the grid (S must not exceed the grid size: `writer_split` guarantees it). The last
program to finish zeroes `amax` and the counters for the next launch (launches are stream-ordered).
Scale = max(amax, 1e-12) / QMAX, exactly `quantize_act_per_token`'s. Under the interpreter programs run
one after another, so S must be 1 there (a second writer would never arrive while the first waits).

Buffers per device (`sync_buffers`): int32 [4] (ticket, done, finished, unused) and fp32 amax [MAX_ROWS].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, interpret_mode

MAX_ROWS = 256
_BUFFERS: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def sync_buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(counters int32 [4], amax fp32 [MAX_ROWS]) for `device`, zeroed once and left zeroed by every launch."""
    key = (device.type, device.index or 0)
    b = _BUFFERS.get(key)
    if b is None:
        b = (torch.zeros(4, dtype=torch.int32, device=device), torch.zeros(MAX_ROWS, dtype=torch.float32, device=device))
        _BUFFERS[key] = b
    return b


def writer_split(k: int, programs: int, kw: int, bka: int) -> tuple[int, int]:
    """(S writers, KW columns each) covering K with S <= programs (1 under the interpreter); KW % bka == 0."""
    if interpret_mode():
        return 1, cdiv(k, bka) * bka
    kw = max(kw, cdiv(k, max(programs, 1)))
    kw = cdiv(kw, bka) * bka
    return cdiv(k, kw), kw


@triton.jit
def take_ticket(sync_ptr):
    return tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")


@triton.jit
def shared_row_scales(x_ptr, stride_xm, M, K, sync_ptr, amax_ptr, ticket, S: tl.constexpr, KW: tl.constexpr,
                      BKA: tl.constexpr, BM: tl.constexpr, QMAX: tl.constexpr):
    """[BM] per-token scales of x rows 0..M-1 (M <= BM), found by the first S tickets together."""
    offs_m = tl.arange(0, BM)
    mask_m = offs_m < M
    if ticket < S:
        offs_k = tl.arange(0, BKA)
        part = tl.zeros([BM], dtype=tl.float32)
        for c in range(0, KW, BKA):
            kk = ticket * KW + c + offs_k
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                        mask=mask_m[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)   # [BM, BKA]
            part = tl.maximum(part, tl.max(tl.abs(a), axis=1))
        tl.atomic_max(amax_ptr + offs_m, part, mask=mask_m, sem="relaxed", scope="gpu")
        tl.debug_barrier()                                      # every thread's max is in before "done"
        tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    done = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    while done < S:
        done = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    amax = tl.load(amax_ptr + offs_m, mask=mask_m, other=0.0, volatile=True)
    return tl.maximum(amax, 1e-12) / QMAX


@triton.jit
def release_row_scales(sync_ptr, amax_ptr, total, BM: tl.constexpr):
    """Called once per program after its last read of the scales; the last one resets the buffers."""
    tl.debug_barrier()
    f = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel", scope="gpu")
    if f == total - 1:
        tl.store(amax_ptr + tl.arange(0, BM), tl.zeros([BM], dtype=tl.float32))
        tl.atomic_xchg(sync_ptr, 0)
        tl.atomic_xchg(sync_ptr + 1, 0)
        tl.atomic_xchg(sync_ptr + 2, 0)


__all__ = ["MAX_ROWS", "release_row_scales", "shared_row_scales", "sync_buffers", "take_ticket", "writer_split"]
