"""NVIDIA CUDA platform. `probe()` is cheap; the Platform class lives in `.platform`."""

from __future__ import annotations

from typing import Any

CLASS_PATH = "quantrt.platforms.cuda.platform:CudaPlatform"


def probe(torch_mod: Any = None) -> str | None:
    """CUDA build with a visible GPU (ROCm builds also report cuda, so exclude torch.version.hip).

    `torch.cuda.is_available()` does not create a CUDA context. `torch_mod` lets tests fake torch.
    """
    if torch_mod is None:
        import torch as torch_mod
    if getattr(torch_mod.version, "hip", None):
        return None
    return CLASS_PATH if torch_mod.cuda.is_available() else None
