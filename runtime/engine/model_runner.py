"""ModelRunner: turns scheduled (request, token range) pairs into a ForwardBatch and runs the model.

Decode steps (one new token per sequence, logits of that token only) go to the platform's graph
runner when there is one (CUDA graphs: quantrt.platforms.cuda.graphs); it pads the batch and the KV
length and calls back `decode_forward` on static device tensors. Everything else (prefill, extend,
decode steps the runner declines) runs eagerly through the same ForwardBatch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from quantrt.engine.forward_batch import ForwardBatch
from quantrt.engine.kv_pool import KVPool
from quantrt.engine.request import Request

log = logging.getLogger(__name__)


@dataclass
class Work:
    """Compute tokens all_ids[start:start+n] of `req`; `rows` are positions whose logits are wanted."""

    req: Request
    start: int
    n: int
    rows: list[int]


def graph_unsafe_reason(model: torch.nn.Module) -> str | None:
    """Why decode graphs cannot capture `model`, or None. An MoE layer can be captured when its MoE
    kernel is `graph_safe` (routing sorted on device, fixed grids: triton_moe) and its top-k is the
    device-side `select_experts`; the portable kernels (`grouped`, `reference`) read expert counts on
    the host (bincount / nonzero / tolist), and a platform top-k op is not known to be capturable."""
    from quantrt.layers.moe.layer import FusedMoE

    for m in model.modules():
        if not isinstance(m, FusedMoE):
            continue
        if m.kernel is None or not getattr(m.kernel, "graph_safe", False):
            return (f"MoE layer {m.prefix} runs the {m.impl} MoE kernel, whose token routing synchronises "
                    f"with the host (graph-safe MoE kernels: triton_moe)")
        if m.topk_op is not None:
            return f"MoE layer {m.prefix} routes with the platform's top-k op {type(m.topk_op).__name__}, not graph-checked"
    return None


def is_graph_decode(works: list[Work]) -> bool:
    """A step the graph runner may take: every sequence adds one token and wants only its logits."""
    return bool(works) and all(w.n == 1 and w.rows == [w.start] for w in works)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_pool: KVPool, page_size: int, device: torch.device):
        self.model, self.kv_pool, self.page_size, self.device = model, kv_pool, page_size, device
        self._offsets = torch.arange(page_size)
        self._offsets_np = np.arange(page_size, dtype=np.int64)
        self.graphs: Any = None            # a decode graph runner (platform-made), or None
        self.graphs_off: str | None = None  # why decode graphs are off (None while on)

    # -- decode graphs ---------------------------------------------------------------------
    def configure_graphs(self, platform: Any, disable: bool, max_bs: int | None, max_running: int,
                         max_len: int) -> None:
        """Decode graphs from the platform unless `--disable-cuda-graph`; max_bs None = min(max_running, 256)."""
        factory = None if disable else platform.graph_runner()
        if factory is not None:
            self.enable_graphs(factory, max_bs or min(max_running, 256), max_len)
        else:
            self.graphs = None
            self.graphs_off = "--disable-cuda-graph" if disable else f"{platform.name} has no graph runner"
        log.info("decode graphs: %s", self.graph_status())

    def enable_graphs(self, factory: Any, max_bs: int, max_len: int, **kw: Any) -> bool:
        """Ask `factory(decode_forward, device, max_bs, max_len, **kw)` for a graph runner (the
        platform's `graph_runner()`). Returns False (reason in `graphs_off`) when the model cannot."""
        why = graph_unsafe_reason(self.model)
        if why is not None:
            self.graphs, self.graphs_off = None, why
            log.info("decode graphs off: %s", why)
            return False
        self.graphs = factory(self.decode_forward, self.device, max_bs, max_len, **kw)
        self.graphs_off = None
        return True

    def graph_status(self) -> str:
        """'on (...)' or 'off: why' as the startup log and `quantrt env` print it."""
        if self.graphs is None:
            return f"off: {self.graphs_off or 'the platform has no graph runner'}"
        if self.graphs.disabled:
            return f"off: {self.graphs.disabled}"
        return f"on (batch sizes {', '.join(map(str, self.graphs.sizes))}; KV length up to {self.graphs.max_len})"

    def decode_forward(self, ids: torch.Tensor, positions: torch.Tensor, out_slots: torch.Tensor,
                       kv_lens: torch.Tensor, kv_slots: torch.Tensor) -> torch.Tensor:
        """One decode step on device tensors: ids/positions/out_slots/kv_lens [B], kv_slots [B, L]
        -> fp32 logits [B, V]. Nothing here reads a device value on the host (graph-capturable)."""
        b = ids.shape[0]
        fb = ForwardBatch(input_ids=ids, positions=positions, out_slots=out_slots, q_lens=[1] * b,
                          kv_lens=[], seq_slots=[], logits_rows=torch.arange(b, device=ids.device),
                          kv_pool=self.kv_pool, is_decode=True, kv_slots=kv_slots, kv_lens_t=kv_lens)
        return self.model(fb)

    # -- overlapped greedy decode ------------------------------------------------------------
    def can_overlap(self) -> bool:
        """Whether greedy decode steps can be queued ahead (a graph runner with `launch_greedy`)."""
        return self.graphs is not None and not self.graphs.disabled and hasattr(self.graphs, "launch_greedy")

    @torch.inference_mode()
    def launch_greedy(self, works: list[Work], chain: list[int] | None = None) -> Any:
        """Queue a decode step and its argmax without waiting for the device; a handle for
        `greedy_tokens`, or None when the step must run through `run_batch`. chain[i]: the row of the
        previously launched step whose token is work i's input (works[i].start = that token's position)."""
        if not self.can_overlap() or not is_graph_decode(works):
            return None
        return self.graphs.launch_greedy(self._decode_inputs(works, chain), chained=chain is not None)

    @staticmethod
    def greedy_tokens(handle: Any) -> list[int]:
        """The tokens of a launched step, one per work (waits for that step only; the handle stands alone,
        so a step queued before the graphs were reconfigured still lands)."""
        return handle.tokens()

    def _decode_inputs(self, works: list[Work], chain: list[int] | None = None):
        from quantrt.platform.interface import DecodeInputs

        # a decode step runs this once per step, so it is built in one pass over the works with numpy (a torch
        # op on small host tensors costs ~10 us, a numpy one ~1 us): at batch 64 that is most of the host work
        b, ps = len(works), self.page_size
        ids, starts, outs, rows = [], [], [], []
        for i, w in enumerate(works):
            s, pages = w.start, w.req.pages
            last = s // ps
            ids.append(w.req.token_at(s) if chain is None else chain[i])
            starts.append(s)
            outs.append(pages[last] * ps + s % ps)
            rows.append(pages[: last + 1])
        lmax = max(starts) + 1
        npages = -(-lmax // ps)
        table = np.zeros((b, npages), dtype=np.int64)                                       # [B, P] page ids
        for i, r in enumerate(rows):
            table[i, : len(r)] = r
        slots = (table[:, :, None] * ps + self._offsets_np).reshape(b, -1)[:, :lmax]         # [B, Lmax]
        meta = np.array([ids, starts, outs], dtype=np.int64)                                 # [3, B]
        kv_lens = meta[1] + 1
        if b > 1:  # columns past a shorter sequence's length point at slot 0 (one sequence has none)
            slots = np.where(np.arange(lmax)[None, :] >= kv_lens[:, None], 0, slots)
        t = torch.from_numpy
        return DecodeInputs(t(meta[0]), t(meta[1]), t(meta[2]), t(kv_lens), t(np.ascontiguousarray(slots)))

    # -- forward ---------------------------------------------------------------------------
    def _slots(self, pages: list[int], length: int) -> torch.Tensor:
        # pages: P page ids -> [length] slot ids (page * page_size + offset)
        p = torch.tensor(pages, dtype=torch.long)
        return (p[:, None] * self.page_size + self._offsets[None, :]).flatten()[:length]

    @torch.inference_mode()
    def run(self, works: list[Work]) -> list[torch.Tensor]:
        """Forward one batch; returns per work the fp32 logits of its rows: [len(rows), V]."""
        logits, counts = self.run_batch(works)
        return list(logits.split(counts))

    @torch.inference_mode()
    def run_batch(self, works: list[Work]) -> tuple[torch.Tensor, list[int]]:
        """Forward one batch -> (fp32 logits [sum of len(rows), V] in work order, len(rows) per work); the
        scheduler slices a work's rows only when it needs them (a greedy decode step needs none)."""
        if is_graph_decode(works):
            d = self._decode_inputs(works)
            logits = self.graphs.run(d) if self.graphs is not None else None
            if logits is None:
                dev = self.device
                logits = self.decode_forward(d.ids.to(dev), d.positions.to(dev), d.out_slots.to(dev),
                                             d.kv_lens.to(dev), d.kv_slots.to(dev))
            return logits, [1] * len(works)
        return self._run_eager(works)

    def _run_eager(self, works: list[Work]) -> tuple[torch.Tensor, list[int]]:
        ids, pos, out_slots, seq_slots, rows = [], [], [], [], []
        offset = 0
        for w in works:
            total = w.start + w.n
            slots = self._slots(w.req.pages, total)
            seq_slots.append(slots.to(self.device))
            out_slots.append(slots[w.start:total])
            ids.extend(w.req.all_ids[w.start:total])
            pos.append(torch.arange(w.start, total))
            rows.extend(offset + r - w.start for r in w.rows)
            offset += w.n
        is_decode = all(w.n == 1 for w in works)
        kv_slots = kv_lens_t = None
        if is_decode:
            lmax = max(s.numel() for s in seq_slots)
            kv_slots = torch.zeros(len(works), lmax, dtype=torch.long, device=self.device)
            for i, s in enumerate(seq_slots):
                kv_slots[i, : s.numel()] = s
            kv_lens_t = torch.tensor([w.start + w.n for w in works], dtype=torch.long, device=self.device)
        fb = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.cat(pos).to(self.device),
            out_slots=torch.cat(out_slots).to(self.device),
            q_lens=[w.n for w in works],
            kv_lens=[w.start + w.n for w in works],
            seq_slots=seq_slots,
            logits_rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            kv_pool=self.kv_pool,
            is_decode=is_decode,
            kv_slots=kv_slots,
            kv_lens_t=kv_lens_t,
        )
        return self.model(fb), [len(w.rows) for w in works]
