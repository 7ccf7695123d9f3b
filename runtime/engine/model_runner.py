"""ModelRunner: turns scheduled (request, token range) pairs into a ForwardBatch and runs the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantrt.engine.forward_batch import ForwardBatch
from quantrt.engine.kv_pool import KVPool
from quantrt.engine.request import Request


@dataclass
class Work:
    """Compute tokens all_ids[start:start+n] of `req`; `rows` are positions whose logits are wanted."""

    req: Request
    start: int
    n: int
    rows: list[int]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_pool: KVPool, page_size: int, device: torch.device):
        self.model, self.kv_pool, self.page_size, self.device = model, kv_pool, page_size, device
        self._offsets = torch.arange(page_size)

    def _slots(self, pages: list[int], length: int) -> torch.Tensor:
        # pages: P page ids -> [length] slot ids (page * page_size + offset)
        p = torch.tensor(pages, dtype=torch.long)
        return (p[:, None] * self.page_size + self._offsets[None, :]).flatten()[:length]

    @torch.inference_mode()
    def run(self, works: list[Work]) -> list[torch.Tensor]:
        """Forward one batch; returns per work the fp32 logits of its rows: [len(rows), V]."""
        ids, pos, out_slots, seq_slots, rows = [], [], [], [], []
        offset = 0
        for w in works:
            total = w.start + w.n
            slots = self._slots(w.req.pages, total)
            seq_slots.append(slots)
            out_slots.append(slots[w.start:total])
            ids.extend(w.req.all_ids[w.start:total])
            pos.append(torch.arange(w.start, total))
            rows.extend(offset + r - w.start for r in w.rows)
            offset += w.n
        is_decode = all(w.n == 1 for w in works)
        kv_slots = None
        if is_decode:
            lmax = max(s.numel() for s in seq_slots)
            kv_slots = torch.zeros(len(works), lmax, dtype=torch.long)
            for i, s in enumerate(seq_slots):
                kv_slots[i, : s.numel()] = s
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
        )
        logits = self.model(fb)
        return list(logits.split([len(w.rows) for w in works]))
