"""What the CUDA kernel tests (tests/test_cuda_*.py) share: where tensors live, the platform the kernels are
prepared for, and the skip when Triton is missing.

Without a GPU the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set here too (tests/conftest.py
sets it before any test module loads; this keeps it set for a module imported on its own), before triton is
imported anywhere below.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quantrt.platform.interface import DeviceCapability  # noqa: E402
from quantrt.platforms.cuda.platform import CudaPlatform  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PLATFORM = CudaPlatform(capability=DeviceCapability(9, 0), device_name="test")  # an H100 (sm_90)
NEEDS_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install triton)")


def compile_gluon_sm90(fn, vals: list, num_warps: int = 4, div16: bool = False) -> str:
    """PTX of a Gluon kernel compiled for sm_90 on this machine (no GPU needed: the triton wheel's ptxas), with
    `vals` the kernel's arguments in order (tensors, TMA descriptors, ints, floats, constexprs; trailing parameters
    with defaults may be left out). `div16`: tensor
    pointers and ints that are multiples of 16 carry `tt.divisibility` 16, as a real launch specializes them
    (what lets loads vectorize)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    sig, consts, attrs = {}, {}, {}
    vals = list(vals) + [p.default for p in fn.params[len(vals):]]   # trailing parameters: their defaults
    for i, (p, v) in enumerate(zip(fn.params, vals, strict=True)):
        sig[p.name] = "constexpr" if p.is_constexpr else mangle_type(v)
        if p.is_constexpr:
            consts[(i,)] = v
        elif div16 and (isinstance(v, torch.Tensor) or (type(v) is int and v % 16 == 0)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    ck = triton.compile(GluonASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": num_warps})
    return ck.asm["ptx"]
