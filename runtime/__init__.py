"""quantrt: serve quantized LLMs on any accelerator with SGLang's knobs.

`import quantrt` is cheap: it imports no vendor SDK and initialises no device. `quantrt.Engine` and
`quantrt.ServerArgs` load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from quantrt.engine.engine import Engine
    from quantrt.server_args import ServerArgs

_LAZY = {"Engine": "quantrt.engine.engine", "ServerArgs": "quantrt.server_args"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantrt' has no attribute {name!r}")


__all__ = ["Engine", "ServerArgs", "__version__"]
