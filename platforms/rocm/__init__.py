"""AMD ROCm platform. `probe()` is cheap; the Platform class lives in `.platform`."""

from __future__ import annotations

from typing import Any

CLASS_PATH = "quantrt.platforms.rocm.platform:RocmPlatform"


def probe(torch_mod: Any = None) -> str | None:
    """ROCm (HIP) build of torch with a visible GPU. `torch_mod` lets tests fake torch."""
    if torch_mod is None:
        import torch as torch_mod
    if not getattr(torch_mod.version, "hip", None):
        return None
    return CLASS_PATH if torch_mod.cuda.is_available() else None
