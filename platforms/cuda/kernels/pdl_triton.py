"""Programmatic dependent launch (PDL) for small Triton kernels (sm_90+ CUDA; a no-op elsewhere).

A kernel launched with `launch_pdl=True` is scheduled while the kernel before it drains; `pdl_enter` at its
start lets the next PDL kernel launch at once and then waits (griddepcontrol.wait) until the kernel before
has completed and its writes are visible, so nothing it reads is stale. Kernels that follow a non-PDL
kernel (cuBLAS) or precede one lose nothing: the wait then returns when the previous grid has ended.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantrt.platforms.cuda.kernels._common import pdl_supported


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Start of a PDL-launched kernel: let the next PDL kernel launch (it waits for this one to complete
    before it reads anything this one writes), then wait for the kernel before this one. No-op with PDL off."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(TRIGGER: tl.constexpr):
    """After a weight-streaming kernel's main loop: let the next PDL kernel be scheduled (it still waits for this
    grid to complete before it reads anything). No-op without TRIGGER (`_common.pdl_trigger`)."""
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()


def pdl_launch_opts(t: torch.Tensor, on: bool = True) -> dict:
    """Launch options plus the PDL constexpr for a kernel on t's device (PDL where `on` and supported)."""
    pdl = on and pdl_supported(t)
    return {"PDL": pdl, "launch_pdl": True} if pdl else {"PDL": False}


__all__ = ["pdl_enter", "pdl_launch_opts", "pdl_release"]
