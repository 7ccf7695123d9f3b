"""Fuse the shards of one QuantLinear (q/k/v, gate/up) into one canonical weight along N.

`concat_n` returns None when the shards cannot be fused exactly; QuantLinear then keeps one kernel
per shard. Every fusion here satisfies dequantize(concat_n(ws)) == cat(dequantize(w) for w in ws)
bit for bit, except `merge_act_schemes` for static activation scales (see there).
"""

from __future__ import annotations

import torch

from quantrt.quant.weights import (
    ActKind,
    ActScheme,
    CodebookWeight,
    DenseWeight,
    FloatWeight,
    IntWeight,
    MicroWeight,
    QuantizedWeight,
    ScaleGranularity,
)


def _same(ts: list[torch.Tensor | None]) -> bool:
    """All None, or all tensors equal (shape and values)."""
    if all(t is None for t in ts):
        return True
    if any(t is None for t in ts):
        return False
    first = ts[0]
    return all(t.shape == first.shape and torch.equal(t, first) for t in ts[1:])  # type: ignore[union-attr]


def _cat_opt(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]


def _concat_float(ws: list[FloatWeight]) -> FloatWeight | None:
    if len({w.data.dtype for w in ws}) != 1 or len({w.shape[1] for w in ws}) != 1:
        return None
    data = torch.cat([w.data for w in ws])                                   # [sum N, K]
    grans = {w.granularity for w in ws}
    if ScaleGranularity.BLOCK in grans:
        if grans != {ScaleGranularity.BLOCK} or len({w.block for w in ws}) != 1:
            return None
        bn = ws[0].block[0]  # type: ignore[index]
        if any(w.shape[0] % bn for w in ws):
            return None  # a block would straddle two shards
        return FloatWeight(data, torch.cat([w.scale.to(torch.float32) for w in ws]),
                           ScaleGranularity.BLOCK, ws[0].block)
    if grans == {ScaleGranularity.TENSOR} and _same([w.scale.to(torch.float32) for w in ws]):
        return FloatWeight(data, ws[0].scale.to(torch.float32), ScaleGranularity.TENSOR)
    # differing per-tensor scales (or per-channel shards): exact per-channel expansion
    per_row = [w.scale.to(torch.float32).reshape(-1).expand(w.shape[0])
               if w.granularity is ScaleGranularity.TENSOR else w.scale.to(torch.float32) for w in ws]
    return FloatWeight(data, torch.cat(per_row).contiguous(), ScaleGranularity.CHANNEL)


def _concat_int(ws: list[IntWeight]) -> IntWeight | None:
    w0 = ws[0]
    for w in ws[1:]:
        if (w.bits, w.group_size, w.codes.dtype, w.shape[1]) != (w0.bits, w0.group_size, w0.codes.dtype,
                                                                 w0.shape[1]):
            return None
        if (w.zero is None) != (w0.zero is None) or (w.offset is None) != (w0.offset is None):
            return None
    if not _same([w.g_idx for w in ws]):
        return None
    return IntWeight(torch.cat([w.codes for w in ws]), torch.cat([w.scale for w in ws]), w0.bits,
                     w0.group_size, _cat_opt([w.zero for w in ws]), _cat_opt([w.offset for w in ws]),
                     w0.g_idx)


def _concat_micro(ws: list[MicroWeight]) -> MicroWeight | None:
    if len({w.block for w in ws}) != 1 or not _same([w.global_scale for w in ws]):
        return None
    return MicroWeight(torch.cat([w.codes for w in ws]), torch.cat([w.scale for w in ws]), ws[0].block,
                       ws[0].global_scale)


def _concat_codebook(ws: list[CodebookWeight]) -> CodebookWeight | None:
    bs = ws[0].blocksize
    if any(w.blocksize != bs or w.shape[1] % bs for w in ws) or not _same([w.codebook for w in ws]):
        return None  # absmax blocks are row-major: they only stay aligned when bs divides K
    return CodebookWeight(torch.cat([w.codes for w in ws]), ws[0].codebook,
                          torch.cat([w.absmax for w in ws]), bs)


def concat_n(weights: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Fuse shards [N_i, K] into one [sum N_i, K] weight, or None when no exact fusion exists."""
    if not weights:
        return None
    if len(weights) == 1:
        return weights[0]
    kind = type(weights[0])
    if any(type(w) is not kind for w in weights) or len({w.shape[1] for w in weights}) != 1:
        return None
    if kind is DenseWeight:
        return DenseWeight(torch.cat([w.data for w in weights]))  # type: ignore[union-attr]
    if kind is FloatWeight:
        return _concat_float(weights)  # type: ignore[arg-type]
    if kind is IntWeight:
        return _concat_int(weights)  # type: ignore[arg-type]
    if kind is MicroWeight:
        return _concat_micro(weights)  # type: ignore[arg-type]
    if kind is CodebookWeight:
        return _concat_codebook(weights)  # type: ignore[arg-type]
    return None


def merge_act_schemes(acts: list[ActScheme]) -> ActScheme | None:
    """One activation scheme for fused shards, or None when they cannot share one.

    Same kind/dtype/group -> that scheme. STATIC_TENSOR shards with different checkpoint scales
    -> the maximum scale (SGLang's rule: no shard's activations clip, at the cost of slightly coarser
    steps for the shards whose own scale was smaller; not bit-identical to per-shard execution).
    """
    if not acts:
        return None
    a0 = acts[0]
    if any((a.kind, a.dtype, a.group) != (a0.kind, a0.dtype, a0.group) for a in acts[1:]):
        return None
    if a0.kind is not ActKind.STATIC_TENSOR or len(acts) == 1:
        return a0
    if any(a.zero is not None for a in acts):  # asymmetric (zero point): share only identical quantizers
        same = all(a.zero is not None and torch.equal(a.zero, a0.zero) and torch.equal(a.scale, a0.scale)
                   for a in acts[1:])
        return a0 if same else None
    scales = [a.scale.to(torch.float32).reshape(()) for a in acts]  # type: ignore[union-attr]
    return ActScheme(ActKind.STATIC_TENSOR, a0.dtype, scale=torch.stack(scales).max())
