"""Intel XPU platform, and the CPU fallback (cpu_platform.py). Probes are cheap."""

from __future__ import annotations

from typing import Any

CLASS_PATH = "quantrt.platforms.xpu.platform:XpuPlatform"
CPU_CLASS_PATH = "quantrt.platforms.xpu.cpu_platform:CpuPlatform"


def probe(torch_mod: Any = None) -> str | None:
    """torch built with XPU support and a visible device. `torch_mod` lets tests fake torch."""
    if torch_mod is None:
        import torch as torch_mod
    xpu = getattr(torch_mod, "xpu", None)
    return CLASS_PATH if xpu is not None and xpu.is_available() else None


def probe_cpu() -> str:
    """CPU is always available (the lowest-priority fallback)."""
    return CPU_CLASS_PATH
