"""What the Gluon kernels (`ring_wna16`, `ring_fp8`, `frag_w8`) share: cached TMA descriptors, the split-K
epilogue and the PDL grid-dependency instructions (imported lazily: Gluon needs triton >= 3.5)."""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from quantrt.platforms.cuda.kernels._common import cdiv, num_sms, split_counters

_DESC_CACHE: dict[tuple, TensorDescriptor] = {}


def split_k_plan(x: torch.Tensor, n: int, bn: int, bk: int, split_k: int, waves: int
                 ) -> tuple[int, int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(column tiles, splits, K rows per split, y [M, N], fp32 workspace [split, M, N], arrival counters) for a
    ring launch over x [M, K]: `split_k` splits, or K split so that about `waves` programs run per SM. With one
    split the workspace and counters are y itself (never read)."""
    m, k = x.shape
    n_tiles = cdiv(n, bn)
    k_steps = k // bk
    split = split_k or max(1, min(k_steps, cdiv(waves * num_sms(x.device.index or 0), n_tiles)))
    k_per_split = cdiv(k_steps, split) * bk
    split = cdiv(k, k_per_split)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if split == 1:
        return n_tiles, 1, k_per_split, y, y, y
    ws = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    return n_tiles, split, k_per_split, y, ws, split_counters(x.device, n_tiles)


def tma_desc(t: torch.Tensor, shape: list[int], strides: list[int], block: list[int], swizzle: int = 0
             ) -> TensorDescriptor:
    """TMA descriptor of a view (shape, strides in elements) of `t` with an NVMMA shared layout of `swizzle`
    bytes, cached by pointer, view and block (a CUDA graph replays the descriptor it captured)."""
    key = (t.data_ptr(), t.dtype, tuple(shape), tuple(strides), tuple(block), swizzle)
    d = _DESC_CACHE.get(key)
    if d is None:
        layout = gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=t.element_size() * 8,
                                      rank=len(shape))
        d = TensorDescriptor(t, shape, strides, block, layout)
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


__all__ = ["gdc_launch_dependents", "gdc_wait", "gsum", "split_k_plan", "store_split_k", "tma_desc"]
