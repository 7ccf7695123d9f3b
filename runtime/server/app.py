"""The FastAPI application: routes, API-key auth, OpenAI-style errors, warm-up and drain."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from quantrt.engine.async_engine import AsyncEngine
from quantrt.server import routes_native, routes_openai
from quantrt.server.openai_protocol import ApiError
from quantrt.server.state import ServerState, collect

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/health"})


def create_app(ae: AsyncEngine, *, warmup: bool = False, drain_timeout: float = 30.0,
               manage_engine: bool = False, api_key: str | None = "") -> FastAPI:
    """The HTTP app over a started AsyncEngine.

    warmup: run one short generation at start-up (lifespan). manage_engine: shut the AsyncEngine
    down (drain for `drain_timeout` s, then abort) when the app stops. api_key: "" = the engine's
    --api-key; None = no key; else this key.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if warmup:
            await _warmup(app.state.server)
        yield
        if manage_engine:
            log.info("draining in-flight requests (up to %.0f s)", drain_timeout)
            ae.shutdown(drain_timeout=drain_timeout)

    app = FastAPI(title="quantrt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState(ae)
    app.include_router(routes_openai.router)
    app.include_router(routes_native.router)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    key = ae.engine.server_args.api_key if api_key == "" else api_key
    app.add_middleware(GuardMiddleware, api_key=key)
    return app


async def _warmup(state: ServerState) -> None:
    """One short greedy generation so the first real request does not pay for lazy set-up."""
    ids = state.encode("The capital of France is") or [0]
    agen = state.submit(input_ids=ids, sampling_params={"max_new_tokens": 4, "temperature": 0})
    await collect(agen, None)
    log.info("warm-up request done")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return error_response(ApiError(e.status_code, str(e.detail), code=code, headers=dict(e.headers or {})))


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first: dict[str, Any] = (e.errors() or [{}])[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    return error_response(ApiError(400, f"invalid value for '{loc}': {first.get('msg')}", param=loc or None,
                                   code="invalid_value"))


class GuardMiddleware:
    """Bearer API key on every route but /health; any unhandled error becomes a JSON 500."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key and scope.get("path") not in OPEN_PATHS and not self._authorized(scope):
            err = ApiError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error_response(err)(scope, receive, send)
            return
        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as e:  # never let a request take the server down
            log.exception("unhandled error in %s", scope.get("path"))
            if not started:
                err = ApiError(500, f"internal server error: {type(e).__name__}", type="server_error",
                               code="internal_error")
                await error_response(err)(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(token.strip(), self.api_key or "")
        return False
