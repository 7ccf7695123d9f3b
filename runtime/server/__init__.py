"""The HTTP server: OpenAI-compatible and SGLang-native routes over the AsyncEngine.

`create_app(async_engine)` builds the FastAPI app; `quantrt.launch_server` runs it with uvicorn.
"""

from __future__ import annotations

from quantrt.server.app import create_app

__all__ = ["create_app"]
