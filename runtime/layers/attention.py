"""Paged attention over a slot-indexed KV pool, computed with torch SDPA.

Each layer writes the new tokens' K/V into their slots, then reads every slot of each sequence.
Decode batches run as one padded SDPA call; extend (prefill) batches run one call per sequence with
a causal mask offset by the cached prefix.

Quantized caches (fp8/fp4) are the reference path: pages are dequantized to fp32 (times k_scale /
v_scale) and attention runs with fp32 q, k, v, so QK^T, the softmax and P.V all accumulate in fp32
(the two-level accumulation lesson of ANCHORS.md: never accumulate P.V in the storage precision).

Attention sinks (gpt-oss): `sinks` [H] is one learned logit per head that joins each query's softmax
denominator and attends to nothing. SDPA has no such input, so it is computed exactly with an extra
column: a zero key (score 0) and a zero value are appended, and a float mask adds sinks[h] to that
column's score (and -inf where the boolean mask forbids a key).

Decode on a device may run the platform's own kernel instead (`Platform.decode_attention_ref`, e.g. the
Triton paged decode attention of platforms/cuda reading bf16/fp8/fp4 pages directly); on CPU, or when that
kernel declines a pool, the SDPA path below runs. Extend batches may likewise run the platform's prefill kernel
(`Platform.extend_attention_ref`, e.g. Ascend's fused attention over the paged cache).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantrt.engine.forward_batch import ForwardBatch
from quantrt.platform.interface import Platform


class PagedAttention(nn.Module):
    """k_scale / v_scale: per-tensor KV scales of this layer (1.0 unless the checkpoint gives them)."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = sliding_window
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.platform: Platform | None = None    # the engine's platform (finish_loading); None = current_platform()
        self._rotary_store = None                # the platform's rotary + KV write (Platform.rotary_kv_store_op)
        self._rotary_attend = None               # ... and its decode step with the attention in one op

    def finish_loading(self, platform: Platform) -> None:
        """Remember the platform the engine runs on (its decode attention, e.g. an emulated NPU's, is looked up
        on it rather than on the process-wide current platform) and its fused rotary + KV-write op."""
        self.platform = platform
        self._rotary_store = platform.rotary_kv_store_op()
        self._rotary_attend = platform.decode_rotary_attention_op()

    def _decode_op(self, fb: ForwardBatch, device: torch.device):
        """The platform's fused rotary + KV write + attention op where this decode step runs it, else None."""
        op = self._rotary_attend
        if fb.is_decode and op is not None and platform_decode_attention(self.platform) and (
                device.type != "cpu" or getattr(op, "runs_on_cpu", False)):  # as attend() decides
            return op
        return None

    def small_decode(self, fb: ForwardBatch, rows: int, device: torch.device) -> bool:
        """Whether this step's attention is the platform's fused op on a grid small enough to be released by the
        q/k/v kernel at its start (the op's `small_grid`; `QuantLinear.release_next`): its few programs then make
        their early reads while the projection streams. A large grid released that early takes SM room from it."""
        op = self._decode_op(fb, device)
        small = getattr(op, "small_grid", None)
        return small is not None and small(self, fb, rows)

    def takes_prologue(self, fb: ForwardBatch, device: torch.device, pre) -> bool:
        """Whether this step's platform decode op adds the q/k/v bias and norms q and k itself (`pre`, a
        `QKVPrologue`; the op's `takes_prologue`): the caller then leaves them to `rotary_forward(pre=)`."""
        op = self._decode_op(fb, device)
        takes = getattr(op, "takes_prologue", None)
        return takes is not None and takes(self, pre)

    def rotary_forward(self, rotary, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch,
                       sinks: torch.Tensor | None = None, pre=None) -> torch.Tensor:
        """Rotate q and k at fb.positions (`rotary`: a neox RotaryEmbedding), write k and v, attend: one platform
        kernel for the rotation and the write where it serves this pool, else the rotary's math and forward().
        `pre` (a `QKVPrologue`, where `takes_prologue` said yes): q, k, v still lack the projection's bias and the
        q/k norms; the platform op applies them, or `pre.apply` does if it declines this step."""
        # q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H*D]
        if (op := self._decode_op(fb, q.device)) is not None:
            o = op(self, q, k, v, *rotary.half_tables(), fb, sinks, **({"pre": pre} if pre is not None else {}))
            if o is not None:
                return o
        if pre is not None:
            q, k, v = pre.apply(q, k, v)
        if self._rotary_store is not None:
            qr = self._rotary_store(q, k, v, *rotary.half_tables(), fb.positions, fb.kv_pool, self.layer_id,
                                    fb.out_slots, self.k_scale, self.v_scale)
            if qr is not None:
                return self.attend(qr, fb, sinks)
        key = ("rope", id(rotary))
        if key not in fb.cache:
            fb.cache[key] = rotary.tables(fb.positions)
        q, k = rotary(fb.cache[key], q, k)
        return self(q, k, v, fb, sinks)

    def set_kv_scale(self, which: str, value: float) -> None:
        """which: "k" or "v"; -1 (the 'not calibrated' sentinel) means 1.0."""
        setattr(self, f"{which}_scale", 1.0 if value == -1.0 else float(value))

    def _kv(self, fb: ForwardBatch, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fb.kv_pool.gather(self.layer_id, slots, self.k_scale, self.v_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D]; sinks: [H] or None -> out: [T, H*D]
        fb.kv_pool.write(self.layer_id, fb.out_slots, k, v, self.k_scale, self.v_scale)
        return self.attend(q, fb, sinks)

    def attend(self, q: torch.Tensor, fb: ForwardBatch, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of q over the pool, whose slots already hold this batch's K/V (forward() wrote them)."""
        # q: [T, H, D]; sinks: [H] or None -> out: [T, H*D]
        pool = fb.kv_pool
        if fb.is_decode and (fast := platform_decode_attention(self.platform)) is not None and \
                (q.device.type != "cpu" or getattr(fast, "runs_on_cpu", False)):  # emulated vendor ops run on CPU
            o = fast(self, q, fb, sinks)                                 # the platform's kernel, or None
            if o is not None:
                return o
        if not fb.is_decode and (ext := platform_extend_attention(self.platform)) is not None and \
                (q.device.type != "cpu" or getattr(ext, "runs_on_cpu", False)):
            o = ext(self, q, fb, sinks)                                  # the platform's prefill kernel, or None
            if o is not None:
                return o
        gqa = self.num_heads != self.num_kv_heads
        cdt = torch.float32 if pool.quantized else q.dtype             # fp32 math over quantized pages
        if fb.is_decode:
            kk, vv = self._kv(fb, fb.kv_slots)                           # [B, L, Hkv, D]
            qq = q.unsqueeze(2).to(cdt)                                  # [B, H, 1, D]
            mask = fb.decode_mask(self.window)                           # [B, 1, 1, L] bool
            kk, vv = kk.transpose(1, 2).to(cdt), vv.transpose(1, 2).to(cdt)  # [B, Hkv, L, D]
            if sinks is not None:
                kk, vv, mask = with_sink_column(kk, vv, mask, sinks)
            elif gqa:  # the G query heads of a KV head as G query rows (head h = kv * G + g): no K/V expansion
                qq = qq.view(q.shape[0], self.num_kv_heads, -1, self.head_dim)   # [B, Hkv, G, D]
                gqa = False
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
            return o.reshape(q.shape[0], -1).to(q.dtype)
        outs = []
        start = 0
        for i, n in enumerate(fb.q_lens):
            kk, vv = self._kv(fb, fb.seq_slots[i])                       # [L, Hkv, D]
            kk = kk.transpose(0, 1).unsqueeze(0).to(cdt)                 # [1, Hkv, L, D]
            vv = vv.transpose(0, 1).unsqueeze(0).to(cdt)
            qq = q[start:start + n].transpose(0, 1).unsqueeze(0).to(cdt)  # [1, H, n, D]
            mask = fb.extend_mask(i, self.window)                        # [n, L] bool or None (causal)
            if sinks is not None:
                if mask is None:
                    mask = torch.ones(n, kk.shape[2], dtype=torch.bool, device=kk.device).tril()
                kk, vv, mask = with_sink_column(kk, vv, mask, sinks)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None,
                                               scale=self.scale, enable_gqa=gqa)
            outs.append(o.squeeze(0).transpose(0, 1).reshape(n, -1).to(q.dtype))
            start += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]


_DECODE_BACKENDS: dict[type, Callable | None] = {}


def platform_decode_attention(platform: Platform | None = None) -> Callable | None:
    """The platform's paged decode attention (`Platform.decode_attention_ref`), resolved once per platform
    class; None (SDPA) when it names none or its module cannot be imported (e.g. triton absent)."""
    if platform is None:
        from quantrt.platform import current_platform

        platform = current_platform()
    key = type(platform)
    if key not in _DECODE_BACKENDS:
        fn = None
        if platform.decode_attention_ref:
            module, _, attr = platform.decode_attention_ref.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except ImportError:
                fn = None
        _DECODE_BACKENDS[key] = fn
    return _DECODE_BACKENDS[key]


_EXTEND_BACKENDS: dict[type, Callable | None] = {}


def platform_extend_attention(platform: Platform | None = None) -> Callable | None:
    """The platform's extend (prefill) attention (`Platform.extend_attention_ref`), resolved once per class."""
    if platform is None:
        from quantrt.platform import current_platform

        platform = current_platform()
    key = type(platform)
    if key not in _EXTEND_BACKENDS:
        fn = None
        if platform.extend_attention_ref:
            module, _, attr = platform.extend_attention_ref.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except ImportError:
                fn = None
        _EXTEND_BACKENDS[key] = fn
    return _EXTEND_BACKENDS[key]


def with_sink_column(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact attention sinks for SDPA: softmax over [scores, sinks[h]] with the sink column dropped.

    k, v: [B, Hkv, L, D]; mask: bool, broadcastable to [B, 1, n, L]; sinks: [H]
    -> k, v: [B, Hkv, L+1, D] (a zero key and value appended); float mask [B, H, n, L+1]:
    0 where allowed, -inf where not, sinks[h] in the last column (score 0 + sinks[h]).
    """
    b, _, length, _ = k.shape
    pad = k.new_zeros(b, k.shape[1], 1, k.shape[3])
    k, v = torch.cat([k, pad], dim=2), torch.cat([v, pad], dim=2)
    mask = mask.expand(b, 1, *mask.shape[-2:]) if mask.dim() == 4 else mask.expand(b, 1, *mask.shape)
    n, h = mask.shape[2], sinks.shape[0]
    bias = torch.zeros(mask.shape, dtype=k.dtype, device=k.device).masked_fill(~mask, float("-inf"))
    col = sinks.to(k.dtype).view(1, h, 1, 1).expand(b, h, n, 1)
    return k, v, torch.cat([bias.expand(b, h, n, length), col], dim=-1)
