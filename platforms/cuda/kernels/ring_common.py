"""What the Gluon kernels (`ring_wna16`, `ring_w8`, `frag_w8`) share: cached TMA descriptors, the split-K
epilogues (the last arriver's sum; tagged partials at 1-2 rows) and the PDL grid-dependency instructions (imported
lazily: Gluon needs triton >= 3.5)."""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from quantrt.platforms.cuda.kernels._common import cdiv, num_sms, split_counters
from quantrt.platforms.cuda.kernels.trace import WIDTH
from quantrt.quant.formats.packing import unpack_lsb

_DESC_CACHE: dict[tuple, TensorDescriptor] = {}
TAG = gl.constexpr(1 << 32)      # high word of a landed partial (`store_split_k_row`)
TRACE_WIDTH = gl.constexpr(WIDTH)   # `trace`'s record, in int64
TAGGED_MAX_M = 2                 # rows up to which split K ends in `store_split_k_row` (one round trip a row)
_PARTIALS: dict[tuple[str, int], list[torch.Tensor]] = {}


def split_k_plan(x: torch.Tensor, n: int, bn: int, bk: int, split_k: int, waves: int, tagged_rows: int = 0,
                 dtype: torch.dtype | None = None) -> tuple[int, int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(column tiles, splits, K rows per split, y [M, N] in `dtype` (x's by default), workspace, counters) for a
    ring launch over x [M, K]:
    `split_k` splits, or K split so that about `waves` programs run per SM. Workspace and counters: fp32 partials
    [split, M, N] and arrival counters (`store_split_k`), or with M <= `tagged_rows` the tagged partial words
    (`store_split_k_row`) as both; with one split y itself (never read)."""
    m, k = x.shape
    n_tiles = cdiv(n, bn)
    split, k_per_split = split_count(k, n_tiles, bk, split_k, waves, x.device.index or 0)
    y = torch.empty((m, n), device=x.device, dtype=dtype or x.dtype)
    if split == 1:
        return n_tiles, 1, k_per_split, y, y, y
    if m <= tagged_rows:
        words = tagged_partials(x.device, (split - 1) * m * n)
        return n_tiles, split, k_per_split, y, words, words
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    return n_tiles, split, k_per_split, y, ws, split_counters(x.device, n_tiles)


def split_count(k: int, n_tiles: int, bk: int, split_k: int, waves: int, device_index: int) -> tuple[int, int]:
    """(splits, K rows per split) of a ring launch: `split_k`, or about `waves` programs per SM."""
    k_steps = k // bk
    split = split_k or max(1, min(k_steps, cdiv(waves * num_sms(device_index), n_tiles)))
    k_per_split = cdiv(k_steps, split) * bk
    return cdiv(k, k_per_split), k_per_split


def tagged_partials(device: torch.device, numel: int) -> torch.Tensor:
    """Per-device int64 words for `store_split_k_row`'s tagged partials, zero between launches (the last split
    zeroes what it read). Shared by every such launch (stream-ordered); grown outside CUDA-graph capture only (the
    graph runner's warm-up runs first), and a grown buffer keeps the old ones alive for the graphs holding them."""
    key = (device.type, device.index or 0)
    bufs = _PARTIALS.setdefault(key, [])
    if not bufs or bufs[-1].numel() < numel:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the split-K partial words must grow to {numel} during CUDA-graph capture; "
                               "run the step once eagerly first (the decode graph runner's warm-up does)")
        bufs.append(torch.zeros(max(numel, 1 << 18, 2 * bufs[-1].numel() if bufs else 0), dtype=torch.int64,
                                device=device))
    return bufs[-1]


def tma_desc(t: torch.Tensor, shape: list[int], strides: list[int], block: list[int], swizzle: int = 0,
             cache: bool = True) -> TensorDescriptor:
    """TMA descriptor of a view (shape, strides in elements) of `t` with an NVMMA shared layout of `swizzle`
    bytes, cached by pointer, view and block (a CUDA graph replays the descriptor it captured). `cache` False for
    a tensor made anew each call (activations): a cached descriptor keeps its tensor alive."""
    key = (t.data_ptr(), t.dtype, tuple(shape), tuple(strides), tuple(block), swizzle)
    d = _DESC_CACHE.get(key) if cache else None
    if d is None:
        layout = gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=t.element_size() * 8,
                                      rank=len(shape))
        d = TensorDescriptor(t, shape, strides, block, layout)
        if not cache:
            return d
        if len(_DESC_CACHE) > 4096:
            _DESC_CACHE.clear()
        _DESC_CACHE[key] = d
    return d


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def gsum(t, axis: gl.constexpr):
    """Sum of t along `axis`. `gl.sum`'s combine function is a triton.jit one, which the CPU tests'
    TRITON_INTERPRET turns into an interpreter object that Gluon cannot compile."""
    return gl.reduce(t, axis, _add)


@gluon.jit
def gdc_wait():
    """griddepcontrol.wait: until the grid before (a PDL launch) has completed and its writes are visible."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def gdc_launch_dependents():
    """griddepcontrol.launch_dependents: the next PDL-launched grid may be scheduled (it waits for this one)."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def g_now():
    """%globaltimer (ns) in a Gluon kernel."""
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def g_rec(tr_ptr, prog, TRACE: gl.constexpr):
    """Program `prog`'s record (`trace.WIDTH` int64: entry, grid dependency met, main loop done, exit, launch id),
    0 with tracing off."""
    if TRACE:
        return tr_ptr + prog.to(gl.int64) * TRACE_WIDTH
    else:
        return 0


@gluon.jit
def g_stamp(rec, slot: gl.constexpr, TRACE: gl.constexpr):
    """%globaltimer stored now at rec[slot]; nothing emitted with tracing off."""
    if TRACE:
        gl.store(rec + slot, g_now())


@gluon.jit
def g_done(rec, tr_id, TRACE: gl.constexpr):
    """The record's exit time and launch id."""
    if TRACE:
        gl.store(rec + 3, g_now())
        gl.store(rec + 4, tr_id)


@gluon.jit
def store_split_k(acc, y_ptr, ws_ptr, cnt_ptr, ym, ymask, pid_n, pid_k, M, N, SPLIT: gl.constexpr):
    """acc [BN, BM] fp32 -> y (SPLIT 1), or this split's partial into ws [SPLIT, M, N]; the last program of the
    column tile (an acq_rel arrival counter) sums the partials into y and resets its counter."""
    dt: gl.constexpr = y_ptr.dtype.element_ty
    if SPLIT == 1:
        gl.store(y_ptr + ym, acc.to(dt), mask=ymask)
    else:
        gl.store(ws_ptr + pid_k * M * N + ym, acc, mask=ymask)
        gl.thread_barrier()
        cnt = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if cnt == SPLIT - 1:
            tot = gl.zeros_like(acc)
            for sp in range(SPLIT):
                tot += gl.load(ws_ptr + sp * M * N + ym, mask=ymask, other=0.0, cache_modifier=".cg")
            gl.store(y_ptr + ym, tot.to(dt), mask=ymask)
            gl.atomic_xchg(cnt_ptr + pid_n, 0)


@gluon.jit
def _min(a, b):
    return gl.minimum(a, b)


@gluon.jit
def _gather(ptrs, mask):
    """(the sum over the BM axis of the tagged words at ptrs [BN, BM], [BN] by column; 1 if every word carried its
    tag, else 0): all requested at once (one L2 round trip)."""
    w = gl.load(ptrs, mask=mask, other=TAG, volatile=True)                     # [BN, BM] int64
    part = gsum((w & 0xFFFFFFFF).to(gl.int32).to(gl.float32, bitcast=True), 1)
    landed = gl.reduce(gl.reduce((w >> 32).to(gl.int32), 1, _min), 0, _min)
    return part, landed


@gluon.jit
def residual_out(tot, r, mask, part_ptr):
    """The residual epilogue of one row's columns: tot [BN] fp32 (this tile's y), r [BN] the residual's values
    (requested by the caller before it gathers the partials: they do not depend on them) -> s = r + y in r's dtype,
    rounded as torch's r + y.to(dtype) (the add of the next add + RMSNorm), and sum(s^2) over these columns stored at
    part_ptr (fp32), the next norm's partial: `ring_prologue`'s PRO_NORM_PARTS reads it instead of the whole row."""
    dt: gl.constexpr = r.dtype
    s = (r.to(gl.float32) + tot.to(dt).to(gl.float32)).to(dt)
    sf = gl.where(mask, s.to(gl.float32), 0.0)
    gl.store(part_ptr, gsum(sf * sf, 0))
    return s


@gluon.jit
def store_split_k_row(acc, y_ptr, ws_ptr, offs_n, offs_m, pid_k, M, N, SPLIT: gl.constexpr, RES: gl.constexpr = False,
                      res_ptr=None, parts_ptr=None, n_tiles=1, pid_n=0):
    """A few rows (M <= TAGGED_MAX_M): acc [BN, BM] fp32 with column offs_m == m row m, offs_n [BN] its output
    columns -> y [M, N]. Splits 0..SPLIT-2 store their partial as tagged words (fp32 bits | TAG, one 64-bit store:
    value and tag land together) in ws [SPLIT - 1, M, N] (`tagged_partials`, zero between launches) and exit; the
    last split requests each row's partials at once (up to BM splits per round trip, laid on the tile's BM axis),
    again until every tag is there, adds its own partial, stores y and zeroes the words. No fence and no arrival
    counter: at one row it waits one L2 round trip past the last partial to land instead of three (release,
    arrival, reload), for 1.0-1.5 µs less per launch (H100); a round trip per row after that. The sum is in a fixed
    order (deterministic), not split order. The last split waits only on programs of lower launch index, which
    the block scheduler dispatches first, so a waiting program never holds a slot that a program it waits on
    needs. RES: y is r + y, the residual stream with this layer's output added (`residual_out`; r at res_ptr [M, N],
    each column tile's sum of squares of it in parts_ptr [M, n_tiles])."""
    nmask = offs_n < N
    if pid_k < SPLIT - 1:
        word = (acc.to(gl.int32, bitcast=True).to(gl.int64) & 0xFFFFFFFF) | TAG
        gl.store(ws_ptr + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None], word,
                 mask=nmask[:, None] & (offs_m < M)[None, :])
    else:
        for m in range(M):
            if RES:     # the residual row, in flight while the partials are gathered (H100 e2e int4 batch 1: the
                r = gl.load(res_ptr + m * N + offs_n, mask=nmask, other=0.0)  # down ring's tail 1.8 -> 1.3 us)
            tot = gl.zeros_like(offs_n.to(gl.float32))
            for c0 in range(0, SPLIT - 1, acc.shape[1]):   # splits c0 + j (j < BM) on the BM axis
                sp = c0 + offs_m
                ptrs = ws_ptr + (sp[None, :] * M + m) * N + offs_n[:, None]
                pmask = nmask[:, None] & (sp < SPLIT - 1)[None, :]
                part, landed = _gather(ptrs, pmask)
                while landed == 0:   # ask again at once (H100: a 256 ns sleep between polls cost 0.3-0.9 us)
                    part, landed = _gather(ptrs, pmask)
                tot += part
                gl.store(ptrs, gl.zeros_like(acc).to(gl.int64), mask=pmask)
            tot += gsum(gl.where((offs_m == m)[None, :], acc, 0.0), 1)
            if RES:     # y is the new residual stream r + y, with this tile's sum of squares (`residual_out`)
                gl.store(y_ptr + m * N + offs_n, residual_out(tot, r, nmask, parts_ptr + m * n_tiles + pid_n),
                         mask=nmask)
            else:
                gl.store(y_ptr + m * N + offs_n, tot.to(y_ptr.dtype.element_ty), mask=nmask)


def ring_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   group: int, zero_const: float = 8.0, offset: bool = False) -> torch.Tensor:
    """What the kernel computes, in float64 with torch ops: sum over k of (q - z) * x (both exact in the kernel:
    q - z in bf16, products in the MMA), times the group scale per step; with `offset` (zero holds o, z = 0) plus
    o times the step's sum of x. -> [M, N] fp64."""
    q = unpack_lsb(packed, 4, 0).to(torch.float64)                                      # [K, N]
    rows = torch.arange(q.shape[0], device=packed.device) // group
    if offset:
        return x.double() @ (q * scale.double()[rows] + zero.double()[rows])
    if zero is None:
        z = torch.full(scale.shape, zero_const, dtype=torch.float64, device=scale.device)
    else:
        z = zero.double() if zero.dtype == torch.uint8 else zero.double() - 2.0 ** 23
    return x.double() @ ((q - z[rows]) * scale.double()[rows])


__all__ = ["TAGGED_MAX_M", "g_done", "g_now", "g_rec", "g_stamp", "gdc_launch_dependents", "gdc_wait",
           "gsum", "residual_out", "ring_reference", "split_count", "split_k_plan", "store_split_k",
           "store_split_k_row", "tagged_partials", "tma_desc"]
