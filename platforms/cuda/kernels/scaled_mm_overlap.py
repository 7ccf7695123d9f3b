"""FP8 W8A8 per-token x per-channel at large M: per-token quantization of row chunk i+1 (memory-bound, a
second CUDA stream) overlapped with cuBLASLt `torch._scaled_mm` of chunk i (compute-bound, the caller's
stream). Imported lazily.

x [M, K] -> codes [M, K] fp8 + scales [M, 1] (`act_quant_triton.quant_rows`, bit-exact vs
`quantize_act_per_token`) -> y [M, N] written chunk by chunk through `_scaled_mm(out=...)`, so the result
equals the single-launch path row for row. Stream safety: every buffer is allocated on the caller's stream
before the fork, and the caller's stream waits for the side stream's last event before returning, so no
buffer (x included) can be freed and reused while the side stream still reads or writes it. Eager only:
the caller does not take this path while a CUDA graph is being captured.
"""

from __future__ import annotations

import torch

from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows

_SIDE: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    s = _SIDE.get(idx)
    if s is None:
        s = torch.cuda.Stream(device=idx)
        _SIDE[idx] = s
    return s


def chunk_rows(m: int, chunks: int, align: int = 128) -> list[tuple[int, int]]:
    """[(start, end)] splitting M rows into about `chunks` pieces of a multiple of `align` rows (the last ragged)."""
    step = max(align, -(-m // max(chunks, 1) // align) * align)
    return [(r, min(r + step, m)) for r in range(0, m, step)]


def scaled_mm_overlapped(x: torch.Tensor, w: torch.Tensor, w_scale_row: torch.Tensor, qmax: float,
                         out_dtype: torch.dtype, chunks: int) -> torch.Tensor:
    """x [M, K] fp16/bf16; w [N, K] fp8 (K contiguous); w_scale_row [1, N] fp32 -> [M, N] out_dtype."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("scaled_mm_overlapped forks a second stream: not for use under CUDA-graph capture")
    m, k = x.shape
    n = w.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), device=x.device, dtype=w.dtype)                   # codes [M, K]
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)             # per-token scales
    y = torch.empty((m, n), device=x.device, dtype=out_dtype)
    parts = chunk_rows(m, chunks)
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    r0, r1 = parts[0]
    quant_rows(x[r0:r1], w.dtype, qmax, out=(q[r0:r1], s[r0:r1]))
    side.wait_stream(main)                                                   # x written, buffers allocated
    ready = []
    with torch.cuda.stream(side):
        for r0, r1 in parts[1:]:
            quant_rows(x[r0:r1], w.dtype, qmax, out=(q[r0:r1], s[r0:r1]))
            ev = torch.cuda.Event()
            ev.record(side)
            ready.append(ev)
    for i, (r0, r1) in enumerate(parts):
        if i > 0:
            main.wait_event(ready[i - 1])
        torch._scaled_mm(q[r0:r1], w.t(), scale_a=s[r0:r1], scale_b=w_scale_row, out_dtype=out_dtype,
                         out=y[r0:r1])
    main.wait_stream(side)
    return y


__all__ = ["chunk_rows", "scaled_mm_overlapped"]
