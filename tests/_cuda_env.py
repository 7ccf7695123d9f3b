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
    """PTX of a Gluon kernel compiled for sm_90 on this machine (`tests._sm90.compile_sm90`)."""
    from tests._sm90 import compile_sm90

    return compile_sm90(fn, vals, num_warps, div16)
