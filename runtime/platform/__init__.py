"""quantrt.platform: the Platform interface, its resolution, and the method x platform checks."""

from __future__ import annotations

from quantrt.errors import PlatformError
from quantrt.platform.interface import DeviceCapability, Platform
from quantrt.platform.resolve import available_platforms, current_platform, resolve_platform

__all__ = [
    "DeviceCapability",
    "Platform",
    "PlatformError",
    "available_platforms",
    "current_platform",
    "resolve_platform",
]
