"""RMSNorm in the two flavours our architectures use, with the optional additive bias of msModelSlim's
anti-outlier checkpoints (`*.norm.bias`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantrt.quant.kernel import QuantizedRows
from quantrt.quant.pending import (
    ADD_RMS_NORM,
    NORM_PARTS,
    PendingNorm,
    PendingNormParts,
    PendingRows,
    SummedRows,
)


@dataclass
class PostNormed:
    """A sub-layer's output that a norm of its own still scales before the residual add (Gemma's sandwich:
    post-attention / post-MLP norm): the delta is `norm(rows)`. The next norm's `add_forward` makes both in one
    platform kernel where its op takes the delta's norm (`takes_pre`), else runs `norm` first."""
    rows: torch.Tensor          # [T, D]
    norm: RMSNorm

    def value(self) -> torch.Tensor:
        return self.norm(self.rows)


class RMSNorm(nn.Module):
    """y = x / rms(x) * w  (Llama/Qwen), or  * (1 + w) with `offset=True` (Gemma). Computed in fp32.
    With `enable_bias()` (a checkpoint that carries `<prefix>.bias`, e.g. msModelSlim anti-outlier):
    y = x / rms(x) * w + b."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias: nn.Parameter | None = None
        self.eps = eps
        self.offset = offset
        self._scale: torch.Tensor | None = None  # precomputed (1 + w) or w, fp32 (Gemma) / dtype (Llama)
        self._bias: torch.Tensor | None = None
        self._op = None  # the platform's RMSNorm op (Platform.rms_norm_op), for plain norms only
        self._add_op = None  # the platform's residual add + RMSNorm (Platform.fused_add_rms_norm_op), likewise
        self._codes_op = None  # the same making the next linear's codes (Platform.fused_add_rms_norm_codes_op)

    def enable_bias(self) -> None:
        """Give the norm a bias parameter [dim] that the checkpoint must then fill (before loading)."""
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros_like(self.weight), requires_grad=False)

    def finish_loading(self, dtype: torch.dtype, platform=None) -> None:
        def served(op):   # Gemma's (1 + w) is an fp32 scale: only ops that say they take one (`fp32_weight`)
            return op if op is not None and (not self.offset or getattr(op, "fp32_weight", False)) else None

        op = platform.rms_norm_op() if platform is not None and self.bias is None else None
        self._op = served(op)                                  # ours for biased norms and unserved (1 + w)
        self._add_op = served(platform.fused_add_rms_norm_op()) if self._op is not None else None
        self._codes_op = served(platform.fused_add_rms_norm_codes_op()) if self._add_op is not None else None
        dev = platform.device() if platform is not None else self.weight.device
        if self.offset:
            self._scale = 1.0 + self.weight.data.to(dev).float()
        else:
            self._scale = self.weight.data.to(device=dev, dtype=dtype)
        if self.bias is not None:
            self._bias = self.bias.data.to(dev).float() if self.offset else self.bias.data.to(device=dev, dtype=dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | SummedRows | PostNormed | None, reader=None
                    ) -> tuple[torch.Tensor | QuantizedRows | PendingRows, torch.Tensor]:
        """The residual add folded into the norm: (norm(x + delta), x + delta), the sum rounded to x.dtype
        as `x + delta` rounds it; delta None: (norm(x), x); delta `SummedRows` (a linear added x already):
        (norm(delta.s), delta.s). One platform kernel where it has one. `reader`: the one linear (QuantLinear)
        reading the norm. Where it computes the norm in its own kernel (`takes_pending`), the norm comes back as
        `PendingNorm` (x + delta is written when the linear runs) or `PendingNormParts` (from the partial sums of
        squares the summing linear left); where it asks for activation codes (`row_codes`) and the platform's
        kernel makes them, as those codes (QuantizedRows). delta `PostNormed`: its norm first, in the same kernel
        where the platform's op takes it (`takes_pre`)."""
        # x, delta: [T, D] -> ([T, D] or its codes or pending rows, [T, D])
        if delta is None:
            return self(x), x
        pre = {}
        if isinstance(delta, PostNormed):
            if (self._add_op is not None and delta.norm._op is not None and getattr(self._add_op, "takes_pre", False)
                    and (self._codes_op is None or getattr(self._codes_op, "takes_pre", False))):
                pre = {"pre": (delta.norm._scale, delta.norm.eps)}
                delta = delta.rows
            else:
                delta = delta.value()
        t = x.shape[0]
        # the linears that make the norm themselves (`takes_pending`) compute the plain norm's rounding only
        pending = reader is not None and not self.offset
        if isinstance(delta, SummedRows):
            s = delta.s
            if (delta.parts is not None and pending and self._op is not None
                    and reader.takes_pending(t, NORM_PARTS)):
                return PendingNormParts(s, delta.parts, self._scale, self.eps, self._op), s
            return self(s), s
        if pending and not pre and self._add_op is not None and reader.takes_pending(t, ADD_RMS_NORM):
            s = torch.empty_like(x)
            return PendingNorm(x, delta, self._scale, self.eps, s, self._add_op), s
        codes = reader.row_codes(t) if reader is not None and self._codes_op is not None else None
        if codes is not None:
            return self._codes_op(x, delta, self._scale, self.eps, codes, **pre)
        if self._add_op is not None:
            return self._add_op(x, delta, self._scale, self.eps, **pre)
        s = x + delta
        return self(s), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [T, D] same dtype
        if self._op is not None:
            return self._op(x, self._scale, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma multiplies in fp32, then casts
            y = xf * self._scale
            return (y if self._bias is None else y + self._bias).to(x.dtype)
        y = self._scale * xf.to(x.dtype)
        return y if self._bias is None else y + self._bias
