"""Programmatic dependent launch (PDL) for small Triton kernels (sm_90+ CUDA; a no-op elsewhere).

A kernel launched with `launch_pdl=True` is scheduled while the kernel before it drains; `pdl_enter` at its
start lets the next PDL kernel launch at once and then waits (griddepcontrol.wait) until the kernel before
has completed and its writes are visible, so nothing it reads is stale. Kernels that follow a non-PDL
kernel (cuBLAS) or precede one lose nothing: the wait then returns when the previous grid has ended.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import pdl_supported


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """The second half of `pdl_enter`, for kernels that first request what no kernel writes (a norm's weight):
    `pdl_release(PDL)`, those loads, then this."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(TRIGGER: tl.constexpr):
    """Let the next PDL kernel be scheduled (it still waits for this grid to complete before it reads anything):
    after a weight-streaming kernel's main loop (TRIGGER: `_common.pdl_trigger`), or at a small op's start (its
    PDL flag, then `pdl_wait`). No-op when false."""
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Start of a PDL-launched kernel: let the next PDL kernel launch (it waits for this one to complete
    before it reads anything this one writes), then wait for the kernel before this one. No-op with PDL off."""
    pdl_release(PDL)
    pdl_wait(PDL)


def pdl_launch_opts(t: torch.Tensor, on: bool = True) -> dict:
    """Launch options plus the PDL constexpr for a kernel on t's device (PDL where `on` and supported)."""
    pdl = on and pdl_supported(t)
    return {"PDL": pdl, "launch_pdl": True} if pdl else {"PDL": False}


PDL_MIN_ROWS = 1  # H100 e2e (PERFORMANCE.md): batch 64 7.34 -> 6.93 ms/step with PDL; at batch 1 it pays since the
                  # GEMVs are PDL-launched themselves and release their dependents only after the weight stream
                  # (twelfth session; with the early release it was 5.75 vs 5.53 ms for bf16)


def pdl_row_opts(t: torch.Tensor, rows: int) -> dict:
    """`pdl_launch_opts` for a small per-layer op (norm, rotary, activation, attention) over `rows` rows: PDL
    from PDL_MIN_ROWS rows (QUANTRT_CUDA_PDL_MIN_ROWS overrides it, read at each launch: for A/B runs)."""
    return pdl_launch_opts(t, rows >= int(os.environ.get("QUANTRT_CUDA_PDL_MIN_ROWS", PDL_MIN_ROWS)))


__all__ = ["PDL_MIN_ROWS", "pdl_enter", "pdl_launch_opts", "pdl_release", "pdl_row_opts", "pdl_wait"]
