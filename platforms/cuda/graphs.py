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


def pack_inputs(d: DecodeInputs, bs: int, lb: int) -> torch.Tensor:
    """DecodeInputs (B rows, L <= lb columns) -> host buffer [bs, 4 + lb] int64, rows B.. repeating row 0."""
    b, length = d.batch, d.kv_slots.shape[1]
    if not 1 <= b <= bs or length > lb:
        raise ValueError(f"batch {b} x length {length} does not fit the graph's {bs} x {lb}")
    host = np.zeros((bs, META_COLS + lb), dtype=np.int64)   # numpy: each step pays this on the host
    for col, t in enumerate((d.ids, d.positions, d.out_slots, d.kv_lens)):
        host[:b, col] = t.numpy()
    host[:b, META_COLS:META_COLS + length] = d.kv_slots.numpy()
    host[b:] = host[0]
    return torch.from_numpy(host)


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

    def key(self, batch: int, length: int) -> tuple[int, int] | None:
        """(padded batch, length bucket) for a step, or None when it must run eagerly."""
        bs, lb = padded_batch(self.sizes, batch), len_bucket(length, self.max_len)
        return None if bs is None or lb is None else (bs, lb)

    def _views(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cols = [buf[:, i].contiguous() for i in range(META_COLS)]
        return (*cols, buf[:, META_COLS:])

    def _capture(self, key: tuple[int, int], host: torch.Tensor) -> _Graph | None:
        buf = host.to(self.device)   # allocated before capture: outside the graph pool
        try:
            handle, out = self.backend.capture(lambda: self.forward(*self._views(buf)))
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly from now on
            self.disabled = f"capture of batch {key[0]} x KV length {key[1]} failed: {type(e).__name__}: {e}"
            log.warning("decode graphs disabled, running eagerly: %s", self.disabled)
            return None
        log.info("captured a decode graph for batch %d, KV length %d", *key)
        return _Graph(buf, handle, out)

    def run(self, d: DecodeInputs) -> torch.Tensor | None:
        if self.disabled is not None:
            return None
        key = self.key(d.batch, d.kv_slots.shape[1])
        if key is None:
            return None
        host = pack_inputs(d, *key)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(key, host)
            if g is None:
                return None
            self.graphs[key] = g
        else:
            g.buf.copy_(host)
        self.backend.replay(g.handle)
        self.replays += 1
        return g.out[: d.batch].clone()
