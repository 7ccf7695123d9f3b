"""Row argmax of decode logits in one launch: the greedy tokens of a decode step (`graphs.launch_greedy`).

torch.argmax over [B, 128256] took 27-28 us a step on the H100 at batch 1 (one reduction kernel over a long row
with few blocks). Here grid (B, S): program (b, s) reduces a chunk of row b to (key, index), and the last program
of the row to arrive (an acq_rel counter, the `split_k_triton` protocol: it resets the counter) reduces the S
partials. Same result as torch.argmax, bit for bit: the first index of the maximum, and NaN counts as larger
than everything (the first NaN wins). Keys: the float's bits made monotone as signed int32 (negative floats get
their magnitude bits flipped), NaN -> INT32_MAX, masked tail -> INT32_MIN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import cdiv, num_sms, split_counters

_BIG = tl.constexpr(2**31 - 1)
_LOW = tl.constexpr(-(2**31))


@triton.jit
def _best(key, idx):
    """(max key, its first index) of [N] candidates."""
    k = tl.max(key, axis=0)
    return k, tl.min(tl.where(key == k, idx, _BIG), axis=0)


@triton.jit
def _argmax_kernel(x_ptr, pk_ptr, pi_ptr, cnt_ptr, out_ptr, V, stride_x, CHUNK: tl.constexpr,
                   S: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    best_k = tl.full([BLOCK], _LOW, tl.int32)
    best_i = tl.full([BLOCK], _BIG, tl.int32)
    for k0 in range(0, CHUNK, BLOCK):
        idx = sp * CHUNK + k0 + offs
        mask = idx < V
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + idx, mask=mask, other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = tl.where(x == 0.0, 0, key)        # -0.0 == +0.0
        key = tl.where(x != x, _BIG, key)
        key = tl.where(mask, key, _LOW)
        take = key > best_k                      # strictly: a lane keeps its earlier index on ties
        best_k = tl.where(take, key, best_k)
        best_i = tl.where(take, idx, best_i)
    k, i = _best(best_k, best_i)
    if S == 1:
        tl.store(out_ptr + row, i.to(tl.int64))
    else:
        tl.store(pk_ptr + row * S + sp, k)
        tl.store(pi_ptr + row * S + sp, i)
        tl.debug_barrier()
        cnt = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu")
        if cnt == S - 1:
            offs_s = tl.arange(0, SP)
            ms = offs_s < S
            ks = tl.load(pk_ptr + row * S + offs_s, mask=ms, other=_LOW, cache_modifier=".cg")
            ids = tl.load(pi_ptr + row * S + offs_s, mask=ms, other=_BIG, cache_modifier=".cg")
            _, i = _best(ks, ids)
            tl.store(out_ptr + row, i.to(tl.int64))
            tl.atomic_xchg(cnt_ptr + row, 0)


def row_argmax(x: torch.Tensor, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """x [B, V] fp16/bf16/fp32 (V < 2**31) -> [B] int64, torch.argmax(x, -1)'s result (into `out` if given)."""
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"row_argmax takes logits [B, V] with V > 0, got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    b, v = x.shape
    out = torch.empty(b, dtype=torch.int64, device=x.device) if out is None else out
    if b == 0:
        return out
    block = min(block, triton.next_power_of_2(v))
    s = max(1, min(cdiv(2 * num_sms(x.device.index or 0), b), cdiv(v, block), 64))
    chunk = cdiv(cdiv(v, s), block) * block
    s = cdiv(v, chunk)
    pk = torch.empty((b, s), dtype=torch.int32, device=x.device)
    pi = torch.empty_like(pk)
    _argmax_kernel[(b, s)](x, pk, pi, split_counters(x.device, b), out, v, x.stride(0), CHUNK=chunk, S=s,
                           SP=triton.next_power_of_2(s), BLOCK=block, num_warps=4)
    return out
