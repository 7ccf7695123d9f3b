"""fp8 e4m3fn -> e4m3fnuz for MI300 (gfx94x), FORMATS.md §7 fact 7.

The same 8 bits read as e4m3fnuz (exponent bias 8 instead of 7) are worth half as much, so the bit pattern
is kept and every scale is doubled; 0x80 is -0 in e4m3fn but NaN in e4m3fnuz and becomes 0. Applied once in
the ROCm fp8 kernels' prepare (weights; input and KV scales double the same way).
"""

from __future__ import annotations

import torch

from quantrt.quant.weights import FloatWeight


def e4m3fn_to_fnuz(data: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """data [..] float8_e4m3fn, scale (any shape) -> (float8_e4m3fnuz data, scale * 2); values unchanged."""
    if data.dtype != torch.float8_e4m3fn:
        raise ValueError(f"expected float8_e4m3fn data, got {data.dtype}")
    bits = data.view(torch.int8).clone()
    bits[bits == -128] = 0                                   # -0 (fn) would read as NaN (fnuz)
    return bits.view(torch.float8_e4m3fnuz), scale.to(torch.float32) * 2.0


def fnuz_scale(scale: torch.Tensor) -> torch.Tensor:
    """An input/KV scale loaded on MI300: doubled like the weight scales."""
    return scale.to(torch.float32) * 2.0


def weight_to_fnuz(w: FloatWeight) -> FloatWeight:
    """A FloatWeight in e4m3fn -> the same values in e4m3fnuz (e5m2 and fnuz weights pass through)."""
    if w.data.dtype != torch.float8_e4m3fn:
        return w
    data, scale = e4m3fn_to_fnuz(w.data, w.scale)
    return FloatWeight(data, scale, w.granularity, w.block)
