"""Huawei Ascend NPU platform. `probe()` is cheap and never crashes a machine without torch_npu.

torch_npu is imported only inside the probe (or the Platform), and only after setting
TORCH_DEVICE_BACKEND_AUTOLOAD=0, because torch_npu's autoload hook breaks a plain `import torch`
on machines where it is installed but unusable.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CLASS_PATH = "quantrt.platforms.ascend.platform:AscendPlatform"


def import_torch_npu(import_module: Callable[[str], Any] = importlib.import_module) -> Any:
    """Import torch_npu safely and return `torch` (which then has `torch.npu`)."""
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    torch = import_module("torch")
    import_module("torch_npu")
    return torch


def probe(
    find_spec: Callable[[str], Any] = importlib.util.find_spec,
    import_module: Callable[[str], Any] = importlib.import_module,
) -> str | None:
    """torch_npu installed, importable and reporting an NPU. Tests inject `find_spec`/`import_module`."""
    if find_spec("torch_npu") is None:
        return None
    try:
        torch = import_torch_npu(import_module)
        available = bool(torch.npu.is_available())
    except Exception as exc:  # a broken vendor install must not crash a CPU user
        log.debug("torch_npu is installed but unusable (%s: %s); skipping Ascend", type(exc).__name__, exc)
        return None
    return CLASS_PATH if available else None
