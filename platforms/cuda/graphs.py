"""Decode CUDA graphs: capture a decode step once per (padded batch, KV-length bucket), then replay it.

The runtime (quantrt.engine.model_runner) hands `DecodeGraphRunner` a `forward` callable that maps
static device tensors to logits; this module owns the static buffers, the padding, the capture and
the replay, so nothing under runtime/ touches torch.cuda.

Static inputs of one graph live in one int64 buffer `buf: [bs, 4 + Lb]` whose columns are
  0 input ids, 1 positions, 2 KV slot of the new token, 3 kv_len, 4.. the KV slot table [bs, Lb].
A batch of B <= bs sequences fills rows 0..B-1; rows B..bs-1 repeat row 0 (same token, same slot,
same KV: their KV writes store the very values row 0 stores, and per-token math never mixes rows).
Slot-table columns past a sequence's length hold slot 0 and are masked by kv_len.

Graphs are captured lazily, the first time a (bs, Lb) pair is seen, after two eager warm-up runs on
a side stream (so Triton compiles and lazily allocated kernel state exist before capture), into
one memory pool shared by every graph. A capture that fails (an op that synchronises with the host,
or a CPU->GPU copy from pageable memory) disables the runner with the reason; decode runs eagerly.

Overlapped greedy steps (`launch_greedy` -> `GreedyStep.tokens()`, the scheduler's overlap schedule): a step is
queued without waiting for the GPU: its inputs go through a pinned host buffer (two per graph, used
in turn, so the buffer of the step still in flight is never rewritten), the argmax after the replay
(`kernels/argmax_triton.row_argmax` on CUDA: one launch, torch.argmax's result) writes the device token
buffer `[max_bs]`, and an async copy of it to a pinned host row plus an event
tell the host when the tokens can be read. A chained step names, per row, the row of the previous
launch whose token is its input: one gather on the device fills the ids column, so a sequence's
token never has to reach the host before the next step is queued.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from quantrt.platform.interface import DecodeInputs

log = logging.getLogger(__name__)

META_COLS = 4          # ids, positions, out slot, kv_len; the slot table follows
MIN_LEN_BUCKET = 64    # the smallest KV-length bucket
LEN_STEPS = 8          # buckets per power of two above MIN_LEN_BUCKET (padding < max(64, L/4))
WARMUP_RUNS = 2

# forward(ids [bs], positions [bs], out_slots [bs], kv_lens [bs], kv_slots [bs, Lb]) -> logits [bs, V]
DecodeForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def capture_sizes(max_bs: int) -> tuple[int, ...]:
    """Padded batch sizes: 1, 2, 4, 8, ... below max_bs, then max_bs itself."""
    if max_bs < 1:
        raise ValueError(f"--cuda-graph-max-bs must be >= 1, got {max_bs}")
    sizes, b = [], 1
    while b < max_bs:
        sizes.append(b)
        b *= 2
    return (*sizes, max_bs)


def padded_batch(sizes: tuple[int, ...], n: int) -> int | None:
    """Smallest capture size >= n, or None when n is larger than every size."""
    return next((s for s in sizes if s >= n), None)


def len_bucket(length: int, max_len: int) -> int | None:
    """KV gather length for `length` tokens: a multiple of max(64, pow2ceil(length) / 8), capped at
    max_len (rounded up to 64); None when length exceeds max_len."""
    if length < 1:
        raise ValueError(f"KV length must be >= 1, got {length}")
    cap = -(-max_len // MIN_LEN_BUCKET) * MIN_LEN_BUCKET
    if length > cap:
        return None
    step = max(MIN_LEN_BUCKET, (1 << (length - 1).bit_length()) // LEN_STEPS)
    return min(-(-length // step) * step, cap)


def pack_inputs(d: DecodeInputs, bs: int, lb: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """DecodeInputs (B rows, L <= lb columns) -> host buffer [bs, 4 + lb] int64, rows B.. repeating row 0
    (written into `out`, e.g. a pinned buffer, when given)."""
    b, length = d.batch, d.kv_slots.shape[1]
    if not 1 <= b <= bs or length > lb:
        raise ValueError(f"batch {b} x length {length} does not fit the graph's {bs} x {lb}")
    if out is None:
        host = np.zeros((bs, META_COLS + lb), dtype=np.int64)   # numpy: each step pays this on the host
    else:
        host = out.numpy()
        host[:, META_COLS + length:] = 0
    for col, t in enumerate((d.ids, d.positions, d.out_slots, d.kv_lens)):
        host[:b, col] = t.numpy()
    host[:b, META_COLS:META_COLS + length] = d.kv_slots.numpy()
    host[b:] = host[0]
    return torch.from_numpy(host) if out is None else out


class GraphBackend(Protocol):
    """How graphs are made: `capture(fn)` -> (handle, static output); `replay(handle)` refreshes it."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]: ...

    def replay(self, handle: Any) -> None: ...


class CudaGraphBackend:
    """torch.cuda graphs sharing one memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                fn()
        main.wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out

    def replay(self, handle: Any) -> None:
        handle.replay()


@dataclass
class _Graph:
    buf: torch.Tensor        # [bs, 4 + Lb] int64 on the device: the static inputs
    handle: Any
    out: torch.Tensor        # [bs, V] static logits
    staging: list[torch.Tensor]  # two [bs, 4 + Lb] int64 host buffers (pinned on CUDA) for queued steps


@dataclass
class GreedyStep:
    """A queued greedy decode step: its B tokens are in `host` once `event` (None: already) has fired."""

    host: torch.Tensor       # [B] int64, pinned on CUDA
    event: Any

    def tokens(self) -> list[int]:
        """The step's tokens (waits for this step only, not for steps queued after it)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def _greedy_argmax(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """(logits [B, V], out [B] int64) -> out = argmax per row: one Triton launch on CUDA (`argmax_triton`), torch's
    on the CPU stand-in."""
    if device.type == "cuda":
        from quantrt.platforms.cuda.kernels.argmax_triton import row_argmax

        return lambda logits, out: row_argmax(logits, out=out)
    return lambda logits, out: torch.argmax(logits, dim=-1, out=out)


class DecodeGraphRunner:
    """Pads decode batches to capture sizes and KV lengths to buckets, captures lazily, replays.

    `run(inputs)` returns the logits [B, V] (a fresh tensor) or None when the batch does not fit
    (B > max_bs, length > max_len) or the runner is disabled; the caller then runs eagerly.
    """

    def __init__(self, forward: DecodeForward, device: torch.device, max_bs: int, max_len: int,
                 backend: GraphBackend | None = None) -> None:
        self.forward, self.device = forward, device
        self.sizes = capture_sizes(max_bs)
        self.max_bs, self.max_len = max_bs, max_len
        self.backend = backend if backend is not None else CudaGraphBackend(device)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.disabled: str | None = None     # why graphs stopped (a failed capture)
        self.replays = 0
        self._pinned = device.type == "cuda"
        self._tokens = torch.zeros(max_bs, dtype=torch.long, device=device)  # [max_bs] last greedy step's tokens
        self._tokens_host = [self._host_buffer((max_bs,)) for _ in range(2)]   # its host copies, used in turn
        self._launches = 0                   # greedy launches so far (picks the host buffers in turn)
        self._argmax = _greedy_argmax(device)

    def key(self, batch: int, length: int) -> tuple[int, int] | None:
        """(padded batch, length bucket) for a step, or None when it must run eagerly."""
        bs, lb = padded_batch(self.sizes, batch), len_bucket(length, self.max_len)
        return None if bs is None or lb is None else (bs, lb)

    def _views(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cols = [buf[:, i].contiguous() for i in range(META_COLS)]
        return (*cols, buf[:, META_COLS:])

    def _host_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.long, pin_memory=self._pinned)

    def _capture(self, key: tuple[int, int], buf: torch.Tensor) -> _Graph | None:
        """buf: the step's inputs on the device, allocated before capture (outside the graph pool)."""
        try:
            handle, out = self.backend.capture(lambda: self.forward(*self._views(buf)))
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly from now on
            self.disabled = f"capture of batch {key[0]} x KV length {key[1]} failed: {type(e).__name__}: {e}"
            log.warning("decode graphs disabled, running eagerly: %s", self.disabled)
            return None
        log.info("captured a decode graph for batch %d, KV length %d", *key)
        return _Graph(buf, handle, out, [self._host_buffer(tuple(buf.shape)) for _ in range(2)])

    def _prepare(self, d: DecodeInputs, queued: bool = False, chained: bool = False) -> _Graph | None:
        """The graph for `d` with `d` in its input buffer (captured now if new), or None: run eagerly.
        queued: copy through the pinned staging buffer without waiting; chained: see `launch_greedy`."""
        if self.disabled is not None:
            return None
        key = self.key(d.batch, d.kv_slots.shape[1])
        if key is None:
            return None
        g = self.graphs.get(key)
        if g is None:
            buf = pack_inputs(d, *key).to(self.device)
            if chained:
                self._chain_ids(buf)
            g = self._capture(key, buf)
            if g is None:
                return None
            self.graphs[key] = g
            return g
        host = pack_inputs(d, *key, out=g.staging[self._launches % 2] if queued else None)
        g.buf.copy_(host, non_blocking=queued)
        if chained:
            self._chain_ids(g.buf)
        return g

    def _chain_ids(self, buf: torch.Tensor) -> None:
        # buf[:, 0] holds rows of the previous greedy launch: replace them by that launch's tokens
        buf[:, 0] = self._tokens[buf[:, 0]]

    def run(self, d: DecodeInputs) -> torch.Tensor | None:
        g = self._prepare(d)
        if g is None:
            return None
        self.backend.replay(g.handle)
        self.replays += 1
        return g.out[: d.batch].clone()

    def launch_greedy(self, d: DecodeInputs, chained: bool = False) -> GreedyStep | None:
        """Queue the step and its argmax without waiting for the GPU; None when it must run eagerly.
        chained: d.ids[i] is not a token but the row of the previous `launch_greedy` whose token is
        row i's input (that token stays on the device)."""
        g = self._prepare(d, queued=True, chained=chained)
        if g is None:
            return None
        self.backend.replay(g.handle)
        self.replays += 1
        b = d.batch
        self._argmax(g.out[:b], self._tokens[:b])
        host = self._tokens_host[self._launches % 2][:b]
        host.copy_(self._tokens[:b], non_blocking=self._pinned)
        self._launches += 1
        event = None
        if self._pinned:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return GreedyStep(host, event)
