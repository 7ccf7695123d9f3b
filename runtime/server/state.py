"""What every route shares: the engine, limits, request submission and error translation."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from quantrt.engine.async_engine import AsyncEngine, QueueFullError
from quantrt.errors import QuantrtError
from quantrt.server.openai_protocol import ApiError, from_validation_error

B = TypeVar("B", bound=BaseModel)
DEFAULT_MAX_QUEUED = 256
MAX_BODY_BYTES = 16 * 2**20


class ServerState:
    """The AsyncEngine plus the model facts routes need (name, limits, tokenizer)."""

    def __init__(self, ae: AsyncEngine) -> None:
        self.ae = ae
        self.engine = ae.engine
        args = self.engine.server_args
        self.model_name: str = args.served_model_name or args.model_path
        self.created = int(time.time())
        self.context_len = int(self.engine.context_len)
        # a request's prompt + completion must fit both the context and the whole KV pool
        self.token_limit = min(self.context_len, int(self.engine.max_total_tokens))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def check_model(self, name: str) -> None:
        """404 for a model name this server does not serve."""
        if name != self.model_name:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def max_new_tokens(self, prompt_len: int, asked: int | None) -> int:
        """The completion budget: `asked`, or all that is left of the context; 400 when it cannot fit."""
        limit = self.token_limit
        if prompt_len >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your "
                                f"prompt has {prompt_len} tokens.", param="messages",
                           code="context_length_exceeded")
        if asked is None:
            return limit - prompt_len
        if prompt_len + asked > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                f"requested {prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} "
                                f"in the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return asked

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def check_ids(self, ids: list[int]) -> None:
        vocab = int(self.engine.config.vocab_size)
        if any(t >= vocab for t in ids):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt", code="invalid_value")

    def submit(self, **kwargs: Any) -> AsyncIterator[list[dict]]:
        """`AsyncEngine.generate(**kwargs)`; errors surface on the first `__anext__`."""
        return self.ae.generate(**kwargs)


async def parse_body(request: Request, model: type[B]) -> B:
    """Read and validate a JSON body; every problem is a 400 (413 when it is too large)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise from_validation_error(e) from None


def engine_error(e: BaseException) -> ApiError:
    """Translate what AsyncEngine.generate raises into an HTTP error."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(503, f"the server is busy: {e}; retry later", type="server_error",
                        code="server_overloaded", headers={"Retry-After": "1"})
    if isinstance(e, QuantrtError) and "engine loop failed" in str(e):
        return ApiError(500, str(e), type="server_error", code="internal_error")
    if isinstance(e, QuantrtError):
        return ApiError(400, str(e), code="invalid_value")
    return ApiError(500, f"internal error: {type(e).__name__}", type="server_error", code="internal_error")


async def first_snapshot(agen: AsyncIterator[list[dict]]) -> list[dict] | None:
    """Start the request: submission errors become ApiErrors before any response byte is sent."""
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return None
    except (TypeError, ValueError) as e:  # a value the engine's validation could not handle
        if isinstance(e, QuantrtError):
            raise engine_error(e) from e
        raise ApiError(400, f"invalid request: {e}", code="invalid_value") from e
    except Exception as e:
        raise engine_error(e) from e


T = TypeVar("T")


async def until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work()`; if the client disconnects first, cancel it (its requests are aborted)."""
    task = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ApiError(499, "the client closed the connection", code="client_closed")
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def collect(agen: AsyncIterator[list[dict]], first: list[dict] | None) -> dict[int, dict]:
    """Drive a request to the end; the last snapshot of each index."""
    last: dict[int, dict] = {}
    try:
        batch = first
        while batch is not None:
            for snap in batch:
                last[snap["index"]] = snap
            batch = await agen.__anext__()
    except StopAsyncIteration:
        pass
    except Exception as e:
        raise engine_error(e) from e
    finally:
        await agen.aclose()  # type: ignore[attr-defined]
    return last


def sse(data: Any) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(meta: dict) -> str | None:
    """OpenAI's finish_reason from SGLang's meta_info."""
    fr = meta.get("finish_reason")
    if not fr:
        return None
    return {"stop": "stop", "length": "length"}.get(fr.get("type"), "abort")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
