"""quantrt.platforms: one subpackage per device family (CPU lives in xpu/).

Importing this package is cheap: it imports no torch, no vendor SDK and runs no probe. The tables below
name the built-in probes in resolution order; `quantrt.platform.resolve` loads them lazily.
"""

from __future__ import annotations

# Platform name -> "module:function" of its probe. Order is resolution order (CPU is the fallback).
BUILTIN_PROBES: dict[str, str] = {
    "cuda": "quantrt.platforms.cuda:probe",
    "rocm": "quantrt.platforms.rocm:probe",
    "npu": "quantrt.platforms.ascend:probe",
    "xpu": "quantrt.platforms.xpu:probe",
}

# The always-available fallback.
CPU_PLATFORM = "quantrt.platforms.xpu.cpu_platform:CpuPlatform"

# Other spellings accepted by --device / QUANTRT_PLATFORM.
ALIASES: dict[str, str] = {"ascend": "npu"}

__all__ = ["ALIASES", "BUILTIN_PROBES", "CPU_PLATFORM"]
