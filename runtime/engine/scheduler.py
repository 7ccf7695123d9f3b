"""Continuous batching with chunked prefill.

Each step either prefills (new requests and the next chunk of partly prefilled ones, up to
`chunk_size` tokens) or decodes one token for every running request. When the KV pool runs out
during decode, the newest request is preempted and recomputed later (its prefix pages stay cached).

Overlap schedule (SGLang's default; `--disable-overlap-schedule` turns it off): when every running
request samples greedily without penalties or logprobs and the platform can queue a decode step
(`ModelRunner.launch_greedy`: CUDA graphs), decode step N+1 is queued before step N's tokens are read,
its input tokens taken on the device from step N's argmax. The host then appends step N's tokens,
checks stops and builds step N+2's inputs while the device computes N+1, so a decode step costs
max(host, device) instead of their sum. A request that stops at step N (EOS, a stop string) has
one row of step N+1 computed and dropped; one whose length limit ends it at N is left out of N+1.
The schedule drains (the next step runs synchronously) when a waiting request can start, when pages
run short, or when a step cannot be queued.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from quantrt.engine.model_runner import ModelRunner, Work
from quantrt.engine.page_allocator import PageAllocator
from quantrt.engine.request import Request
from quantrt.engine.sampler import sample, token_logprobs
from quantrt.engine.stop import StopChecker


@dataclass
class _Queued:
    """A decode step queued on the device whose tokens the host has not read yet."""

    works: list[Work]
    handle: Any          # ModelRunner.launch_greedy's handle


class Scheduler:
    def __init__(self, runner: ModelRunner, allocator: PageAllocator, stop: StopChecker,
                 max_running: int, chunk_size: int, context_len: int, overlap: bool = False):
        self.runner, self.alloc, self.stop = runner, allocator, stop
        self.max_running, self.chunk_size, self.context_len = max_running, chunk_size, context_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.ps = allocator.page_size
        self.overlap = overlap              # the overlap schedule (module docstring)
        self._queued: _Queued | None = None

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, rid: str) -> None:
        for q in (self.waiting, self.running):
            for r in list(q):
                if r.rid == rid:
                    q.remove(r)
                    self._release(r)
                    self._finish(r, {"type": "abort", "message": "aborted by the client"})

    # -- scheduling ----------------------------------------------------------------------
    def _ensure_pages(self, req: Request, upto: int) -> bool:
        need = -(-upto // self.ps) - len(req.pages)
        if need <= 0:
            return True
        got = self.alloc.alloc(need)
        if got is None:
            return False
        req.pages.extend(got)
        return True

    def _first_schedule(self, req: Request) -> None:
        limit = len(req.all_ids) - 1                  # at least one token must run to get logits
        if req.logprob.enabled and req.logprob.start_len >= 0 and not req.output_ids:
            limit = min(limit, req.logprob.start_len)  # logprobs need the logits of those positions
        req.pages = self.alloc.match_prefix(req.all_ids, limit)
        req.num_computed = len(req.pages) * self.ps
        if not req.output_ids:
            req.cached_tokens = req.num_computed

    def _logit_rows(self, req: Request, start: int, n: int) -> list[int]:
        rows = []
        plen = len(req.prompt_ids)
        if req.logprob.enabled and req.logprob.start_len >= 0 and not req.output_ids:
            first = max(req.logprob.start_len, 1) - 1
            rows = [p for p in range(max(start, first), min(start + n, plen - 1))]
        if start + n == len(req.all_ids):
            rows.append(start + n - 1)
        return rows

    def _schedule_prefill(self) -> list[Work]:
        works, budget = [], self.chunk_size
        while self.waiting and budget > 0 and len(self.running) + len(works) < self.max_running:
            req = self.waiting[0]
            if not req.pages:
                self._first_schedule(req)
            n = min(len(req.all_ids) - req.num_computed, budget)
            if not self._ensure_pages(req, req.num_computed + n):
                if works or self.running:
                    break  # pages come back as running requests finish
                if not self._reclaim_waiting_pages() or not self._ensure_pages(req, req.num_computed + n):
                    self.waiting.popleft()
                    self._release(req)
                    self._finish(req, {"type": "abort", "message": "the request does not fit in the KV cache "
                                       f"({self.alloc.num_pages * self.ps} tokens)"})
                    continue
            works.append(Work(req, req.num_computed, n, self._logit_rows(req, req.num_computed, n)))
            budget -= n
            if req.num_computed + n == len(req.all_ids):
                self.waiting.popleft()
            else:
                break  # a partly prefilled request stays at the head; its next chunk runs next step
        return works

    def _reclaim_waiting_pages(self) -> bool:
        """Nothing runs and the head cannot get pages: take them back from queued requests."""
        freed = False
        for other in list(self.waiting)[1:]:
            if other.pages:
                self._release(other)
                other.num_computed = 0
                freed = True
        return freed

    def _schedule_decode(self) -> list[Work]:
        preempted: set[int] = set()
        for req in list(self.running):
            if id(req) in preempted:
                continue
            while not self._ensure_pages(req, req.num_computed + 1):
                victim = self.running[-1]                # the newest request gives its pages back
                self._preempt(victim)
                preempted.add(id(victim))
                if victim is req:
                    break
        return [Work(r, r.num_computed, 1, [r.num_computed]) for r in self.running]

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed = 0
        self.waiting.appendleft(req)

    # -- stepping ------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one forward; return the requests that gained a token or finished. Under the overlap
        schedule the returned tokens are those of the step queued before; the next one is in flight."""
        if self._queued is None:
            works = self._schedule_prefill()
            decode = not works
            if decode:
                works = self._schedule_decode()
            if not works:
                return []
            handle = None
            if decode and self.overlap and all(w.req.plain_greedy for w in works):
                handle = self.runner.launch_greedy(works)
            if handle is None:
                return self._run(works, decode)
            self._queued = _Queued(works, handle)
        prev = self._queued
        self._queued = self._queue_next(prev)
        return self._land(prev)

    def _queue_next(self, prev: _Queued) -> _Queued | None:
        """Queue the decode step after `prev` before its tokens are read, or None to drain."""
        if self.waiting and len(self.running) < self.max_running:
            return None                                  # a waiting request can start: prefill next
        works, chain = [], []
        for i, w in enumerate(prev.works):
            req = w.req
            if req.finished:                             # aborted while queued
                continue
            if len(req.output_ids) + 1 >= req.params.max_new_tokens or req.num_tokens + 1 >= self.context_len:
                continue                                 # prev's token ends it by length
            s = w.start + 1                              # prev's token goes in at position s
            if not self._ensure_pages(req, s + 1):
                return None                              # preemption is the synchronous path's job
            works.append(Work(req, s, 1, [s]))
            chain.append(i)
        if not works:
            return None
        handle = self.runner.launch_greedy(works, chain)
        return None if handle is None else _Queued(works, handle)

    def _land(self, q: _Queued) -> list[Request]:
        """Read a queued step's tokens and append them (waits for that step only)."""
        updated = []
        for w, tok in zip(q.works, self.runner.greedy_tokens(q.handle)):
            req = w.req
            if req.finished:                             # stopped at the step before, or aborted
                continue
            req.num_computed = w.start + 1
            self._append(req, None, tok)
            updated.append(req)
        return updated

    def _run(self, works: list[Work], decode: bool) -> list[Request]:
        """One synchronous forward of `works`, its tokens sampled on the host."""
        logits, counts = self.runner.run_batch(works)                  # [sum counts, V]
        greedy = self._greedy_tokens(works, logits, counts)
        updated = []
        end = 0
        for i, w in enumerate(works):
            first, end = end, end + counts[i]                            # this work's logit rows
            req = w.req
            req.num_computed = w.start + w.n
            if req.logprob.enabled and not req.output_ids:
                self._input_logprobs(req, w, logits[first:end])
            if req.num_computed < req.num_tokens:
                continue  # chunk of a longer prompt
            if not decode and req not in self.running:                   # decode works are all running
                self.running.append(req)
            if req.params.max_new_tokens == 0:
                self._complete(req, {"type": "length", "length": 0})
            else:
                self._append(req, logits[end - 1:end] if greedy is None else None, greedy[i] if greedy else None)
            updated.append(req)
        return updated

    @staticmethod
    def _greedy_tokens(works: list[Work], logits: torch.Tensor, counts: list[int]) -> list[int] | None:
        """One argmax and one host sync for a step whose requests all sample greedily without
        penalties or logprobs (a decode step of B requests would otherwise sync B times)."""
        # a plain-greedy work wants one row (its last token's; more rows only come with logprobs)
        if len(works) < 2 or not all(c == 1 and w.req.plain_greedy for w, c in zip(works, counts)):
            return None
        return logits.argmax(-1).tolist()                                # logits: [B, V], one row per work

    def _input_logprobs(self, req: Request, w: Work, lg) -> None:
        rows = [r for r in w.rows if r < len(req.prompt_ids) - 1]
        if req.logprob.start_len == 0 and w.start == 0 and not req.input_logprobs:
            req.input_logprobs.append((None, req.prompt_ids[0], None))
            if req.logprob.top_n:
                req.input_top_logprobs.append(None)
        if rows:
            chosen, tops = token_logprobs(lg[: len(rows)], [req.prompt_ids[r + 1] for r in rows],
                                          req.logprob.top_n)
            req.input_logprobs.extend(chosen)
            req.input_top_logprobs.extend(tops)

    def _append(self, req: Request, lg, tok: int | None = None) -> None:
        """Add the next token: `tok` when the batched argmax made it, else sampled from `lg` [1, V]."""
        tok = sample(lg, [req])[0] if tok is None else tok
        if req.logprob.enabled:
            chosen, tops = token_logprobs(lg, [tok], req.logprob.top_n)
            req.output_logprobs.extend(chosen)
            req.output_top_logprobs.extend(tops)
        req.output_ids.append(tok)
        reason = self.stop.check(req)
        if reason is None and req.num_tokens >= self.context_len:
            reason = {"type": "length", "length": len(req.output_ids)}
        if reason is not None:
            self._complete(req, reason)

    def _complete(self, req: Request, reason: dict) -> None:
        self.running.remove(req)
        self._release(req)
        self._finish(req, reason)

    def _release(self, req: Request) -> None:
        if req.pages:
            self.alloc.release(req.pages, req.all_ids, req.num_computed)
            req.pages = []

    def _finish(self, req: Request, reason: dict) -> None:
        req.finish_reason = reason
        self.stop.finalize_text(req)
