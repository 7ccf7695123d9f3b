"""`python -m quantrt.launch_server --model-path … [every ServerArgs flag]`: the HTTP server.

Loads the model, starts the scheduler loop (AsyncEngine), runs one warm-up request (unless
--skip-server-warmup) and serves the OpenAI-compatible and SGLang-native routes with uvicorn on
--host (127.0.0.1 by default) and --port. SIGINT/SIGTERM stop accepting connections, let in-flight
requests finish for up to QUANTRT_GRACEFUL_SHUTDOWN_TIMEOUT seconds (default 30), abort the rest
and exit 0; a second SIGINT quits at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from quantrt.errors import QuantrtError
from quantrt.server_args import ServerArgs

log = logging.getLogger("quantrt.server")
DEFAULT_MAX_QUEUED = 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quantrt.launch_server",
                                     description="Serve a model over HTTP (OpenAI-compatible API).")
    ServerArgs.add_cli_args(parser)
    return parser


def graceful_timeout() -> float:
    """Seconds in-flight requests get to finish after SIGINT/SIGTERM."""
    try:
        return max(0.0, float(os.environ.get("QUANTRT_GRACEFUL_SHUTDOWN_TIMEOUT", "30")))
    except ValueError:
        return 30.0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, load the model and serve until a signal; returns the exit status."""
    ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if ns.model_path is None:
            from quantrt.demo_model import default_model_path

            ns.model_path = default_model_path()
            log.info("no --model-path given; using the demo model %s", ns.model_path)
        args = ServerArgs.from_namespace(ns)
        app = build_app(args)
    except QuantrtError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    serve(app, args)
    return 0


def build_app(args: ServerArgs, engine: Any = None) -> Any:
    """Engine (loaded unless given) -> started AsyncEngine -> FastAPI app that owns it."""
    from quantrt.engine.async_engine import AsyncEngine
    from quantrt.server.app import create_app

    if engine is None:
        from quantrt.engine.engine import Engine

        engine = Engine(progress=False, **args.to_kwargs())
    ae = AsyncEngine(engine, max_queued=args.max_queued_requests or DEFAULT_MAX_QUEUED).start()
    return create_app(ae, warmup=not args.skip_server_warmup, drain_timeout=1.0, manage_engine=True)


def serve(app: Any, args: ServerArgs, sock: socket.socket | None = None) -> None:
    """Run uvicorn until SIGINT/SIGTERM (or `should_exit`), then drain and return."""
    import uvicorn

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=graceful_timeout(), access_log=False)
    server = GracefulServer(config)
    log.info("serving %s on http://%s:%d", args.served_model_name or args.model_path, args.host, args.port)
    server.run(sockets=[sock] if sock is not None else None)


class GracefulServer:
    """uvicorn.Server whose signal handling ends with a normal return (exit 0), not a re-raised signal."""

    def __new__(cls, config: Any) -> Any:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                sigs = (signal.SIGINT, signal.SIGTERM)
                original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
                try:
                    yield
                finally:
                    for sig, handler in original.items():
                        signal.signal(sig, handler)

        return _Server(config)


if __name__ == "__main__":
    sys.exit(main())
