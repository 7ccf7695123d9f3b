"""Turn logits into next tokens: penalties, temperature, top-k, top-p, min-p, per-request seeds."""

from __future__ import annotations

import torch

from quantrt.engine.request import Request


def _penalize(row: torch.Tensor, req: Request) -> torch.Tensor:
    p = req.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.all_ids)), dtype=torch.long)
        v = row[seen]
        row[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and req.output_ids:
        ids, counts = torch.tensor(req.output_ids, dtype=torch.long).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
    return row


def _filter(row: torch.Tensor, req: Request) -> torch.Tensor:
    """Temperature-scaled logits with top-k / top-p / min-p applied (masked to -inf)."""
    p = req.params
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p      # keep the smallest set whose mass reaches top_p
        row = row.scatter(0, idx[drop], float("-inf"))
    if p.min_p > 0.0:
        probs = row.softmax(-1)
        row = row.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return row


def sample(logits: torch.Tensor, reqs: list[Request]) -> list[int]:
    """logits: [B, V] fp32 (raw model output) -> one token id per request."""
    simple = all(r.params.greedy and r.params.repetition_penalty == 1.0 and not r.params.frequency_penalty
                 and not r.params.presence_penalty for r in reqs)
    if simple:
        return logits.argmax(-1).tolist()
    out = []
    for row, req in zip(logits, reqs):
        row = _penalize(row.clone(), req)
        if req.params.greedy:
            out.append(int(row.argmax()))
            continue
        probs = torch.nan_to_num(_filter(row, req).softmax(-1), nan=0.0, posinf=0.0, neginf=0.0)
        if not float(probs.sum()) > 0.0:  # degenerate distribution (inf/nan logits): fall back to greedy
            out.append(int(torch.nan_to_num(row, nan=float("-inf")).argmax()))
            continue
        # the per-request generator lives on the host: draw there, so a seed gives the same tokens on
        # every platform (and a CUDA/NPU row never meets a CPU generator)
        out.append(int(torch.multinomial(probs.cpu(), 1, generator=req.generator)))
    return out


def token_logprobs(logits: torch.Tensor, targets: list[int | None], top_n: int
                   ) -> tuple[list[tuple], list[list[tuple] | None]]:
    """logits: [S, V]; the log-probability of each target (None -> None) and the top_n alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = []
    for i, t in enumerate(targets):
        chosen.append((None, t, None) if t is None else (float(lp[i, t]), t, None))
    tops: list[list[tuple] | None] = []
    if top_n > 0:
        v, ix = lp.topk(top_n, dim=-1)
        tops = [[(float(a), int(b), None) for a, b in zip(vr, ir)] for vr, ir in zip(v, ix)]
    return chosen, tops
