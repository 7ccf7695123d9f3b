"""AsyncEngine: the scheduler runs in its own thread; asyncio callers submit and stream.

HTTP handlers never block on the model: they put requests into an inbox and await per-request
queues that the loop thread fills after every scheduler step. All scheduler state is touched by the
loop thread only. A caller that goes away (client disconnect) aborts its requests, which frees
their KV pages.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from quantrt.engine.engine import Engine
from quantrt.engine.request import Request
from quantrt.errors import QuantrtError

log = logging.getLogger(__name__)


class QueueFullError(QuantrtError):
    """More requests are waiting than --max-queued-requests allows (HTTP 503 with Retry-After)."""


@dataclass
class _Sub:
    req: Request
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: Engine, max_queued: int = 256):
        self.engine = engine
        self.max_queued = max_queued
        self._inbox: queue.Queue = queue.Queue()
        self._subs: dict[str, _Sub] = {}
        self._stop = threading.Event()
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="quantrt-scheduler", daemon=True)
        self.error: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def num_active(self) -> int:
        return len(self._subs)

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish for up to `drain_timeout` s, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self._subs and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        for rid in list(self._subs):
            self._inbox.put(("abort", rid))
        deadline = time.monotonic() + 5
        while self._subs and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(timeout=10)

    # -- submission (any thread / event loop) ------------------------------------------------
    async def generate(self, **kwargs: Any) -> AsyncIterator[list[dict]]:
        """Submit like Engine.generate (prompt/input_ids/sampling_params/logprob args); yields, after each
        step that touched them, the list of per-request snapshots {"index", "text", "output_ids",
        "meta_info", "finished"} of the requests that changed."""
        if not self._accepting:
            raise QueueFullError("the server is shutting down")
        if self.error is not None:
            raise QuantrtError(f"the engine loop failed: {self.error}")
        reqs, _ = self.engine._make_requests(kwargs.get("prompt"), kwargs.get("sampling_params"),
                                             kwargs.get("input_ids"), kwargs.get("return_logprob", False),
                                             kwargs.get("logprob_start_len"), kwargs.get("top_logprobs_num"))
        if len(self._subs) + len(reqs) > self.max_queued:
            raise QueueFullError(f"too many requests in flight ({len(self._subs)}; the limit is {self.max_queued})")
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        index = {}
        for i, r in enumerate(reqs):
            self._subs[r.rid] = _Sub(r, loop, out)
            index[r.rid] = i
        self._inbox.put(("add", reqs))
        pending = set(index)
        try:
            while pending:
                batch = [await out.get()]
                while not out.empty():
                    batch.append(out.get_nowait())
                snaps = []
                for rid, snap in batch:
                    if isinstance(snap, BaseException):
                        raise QuantrtError(f"the engine loop failed: {snap}") from snap
                    snap["index"] = index[rid]
                    if snap["finished"]:
                        pending.discard(rid)
                    snaps.append(snap)
                yield snaps
        finally:
            for rid in pending:  # the caller went away: free the KV pages
                self._inbox.put(("abort", rid))

    # -- the loop thread ------------------------------------------------------------------------
    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                for r in payload:
                    self.engine.scheduler.add(r)
            elif kind == "abort" and payload in self._subs:
                self.engine.scheduler.abort(payload)
                self._publish(self._subs[payload].req)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _publish(self, r: Request) -> None:
        sub = self._subs.get(r.rid)
        if sub is None:
            return
        if not r.finished:
            self.engine.scheduler.stop.update_text(r)
        snap = {"text": r.text, "output_ids": list(r.output_ids), "meta_info": r.meta_info(),
                "finished": r.finished}
        if r.finished:
            del self._subs[r.rid]
        sub.loop.call_soon_threadsafe(sub.out.put_nowait, (r.rid, snap))

    def _loop(self) -> None:
        sched = self.engine.scheduler
        while not self._stop.is_set():
            self._drain_inbox(block=not sched.has_work())
            if not sched.has_work():
                continue
            try:
                updated = sched.step()
            except BaseException as e:  # report to every waiter, then stop
                log.exception("engine loop failed")
                self.error = e
                for sub in list(self._subs.values()):
                    sub.loop.call_soon_threadsafe(sub.out.put_nowait, (sub.req.rid, e))
                self._subs.clear()
                return
            for r in updated:
                self._publish(r)
            for r in [s.req for s in self._subs.values() if s.req.finished]:  # aborted inside the step
                self._publish(r)
