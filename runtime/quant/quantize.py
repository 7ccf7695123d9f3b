"""Reference quantizers (fp32 math): online methods quantize weights with these, kernels and tests
quantize activations with them. Every kernel that claims to match the reference kernel must quantize
activations exactly like `fake_quantize_act`.
"""

from __future__ import annotations

import torch

from quantrt.quant.weights import ActKind, ActScheme, FloatWeight, ScaleGranularity

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
_MIN_AMAX = 1e-12  # an all-zero row/group gets a tiny positive scale instead of 0 (no 0/0)


def qmax(dtype: torch.dtype) -> float:
    """Largest finite magnitude of a quantized dtype (e4m3fn 448, e5m2 57344, int8 127, int4 7)."""
    if dtype == torch.int8:
        return 127.0
    if dtype == torch.int4:
        return 7.0
    if dtype not in FP8_DTYPES:
        raise ValueError(f"{dtype} is not an fp8 or int8 dtype")
    return float(torch.finfo(dtype).max)


def _to_codes(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale clamped to the dtype's range and cast (round-to-nearest for int8; int4 codes are held
    in int8)."""
    m = qmax(dtype)
    y = (x / scale).clamp(-m, m)
    if dtype in (torch.int8, torch.int4):
        return y.round().to(torch.int8)
    return y.to(dtype)


def quantize_fp8(w: torch.Tensor, granularity: ScaleGranularity | str,
                 block: tuple[int, int] | None = None,
                 dtype: torch.dtype = torch.float8_e4m3fn) -> FloatWeight:
    """Float weight [N, K] -> FloatWeight with scale = amax / fp8max per tensor, row, or (bn, bk) block."""
    g = ScaleGranularity(granularity)
    w32 = w.to(torch.float32)
    n, k = w32.shape
    m = qmax(dtype)
    if g is ScaleGranularity.TENSOR:
        scale = w32.abs().amax().clamp(min=_MIN_AMAX) / m                       # []
        return FloatWeight(_to_codes(w32, scale, dtype), scale, g)
    if g is ScaleGranularity.CHANNEL:
        scale = w32.abs().amax(dim=1).clamp(min=_MIN_AMAX) / m                  # [N]
        return FloatWeight(_to_codes(w32, scale[:, None], dtype), scale, g)
    if block is None:
        raise ValueError("block quantization needs block=(bn, bk)")
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=w32.device)
    padded[:n, :k] = w32
    amax = padded.abs().reshape(nb, bn, kb, bk).amax(dim=(1, 3))               # [nb, kb]
    scale = amax.clamp(min=_MIN_AMAX) / m
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]  # [N, K]
    return FloatWeight(_to_codes(w32, full, dtype), scale, g, (bn, bk))


def quantize_act_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (codes [M, K] dtype, scale [M, 1] fp32)."""
    x32 = x.to(torch.float32)
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX) / qmax(dtype)
    return _to_codes(x32, scale, dtype), scale


def quantize_act_per_token_group(x: torch.Tensor, dtype: torch.dtype,
                                 group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (codes [M, K], scale [M, ceil(K/group)] fp32); the last group may be partial."""
    x32 = x.to(torch.float32)
    mm, k = x32.shape
    g = -(-k // group)
    padded = x32
    if g * group != k:  # zero-pad the last partial group (zeros never raise an amax)
        padded = torch.zeros(mm, g * group, dtype=torch.float32, device=x32.device)
        padded[:, :k] = x32
    scale = padded.abs().reshape(mm, g, group).amax(dim=-1).clamp(min=_MIN_AMAX) / qmax(dtype)
    full = scale.repeat_interleave(group, dim=1)[:, :k]                          # [M, K]
    return _to_codes(x32, full, dtype), scale


def quantize_act_static(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                        zero: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] with a checkpoint scalar scale (and int8 zero point) -> codes [M, K].
    With a zero point: q = clamp(round(x / scale) + zero, -128, 127) (asymmetric int8)."""
    if zero is None:
        return _to_codes(x.to(torch.float32), scale.to(torch.float32).reshape(()), dtype)
    y = (x.to(torch.float32) / scale.to(torch.float32).reshape(())).round() + zero.to(torch.float32).reshape(())
    return y.clamp(-128, 127).to(torch.int8)


def fake_quantize_act(x: torch.Tensor, act: ActScheme) -> torch.Tensor:
    """x: [M, K] -> fp32 [M, K] after quantize + dequantize per `act` (identity for weight-only)."""
    if act.kind is ActKind.NONE:
        return x.to(torch.float32)
    assert act.dtype is not None
    if act.kind is ActKind.DYNAMIC_TOKEN:
        q, s = quantize_act_per_token(x, act.dtype)
        return q.to(torch.float32) * s
    if act.kind is ActKind.DYNAMIC_GROUP:
        q, s = quantize_act_per_token_group(x, act.dtype, act.group)
        return q.to(torch.float32) * s.repeat_interleave(act.group, dim=1)[:, : x.shape[-1]]
    if act.kind is ActKind.DYNAMIC_TENSOR:
        s = x.to(torch.float32).abs().amax().clamp(min=_MIN_AMAX) / qmax(act.dtype)
        return quantize_act_static(x, s, act.dtype).to(torch.float32) * s
    assert act.scale is not None
    s = act.scale.to(torch.float32).reshape(())
    q = quantize_act_static(x, s, act.dtype, act.zero).to(torch.float32)
    if act.zero is not None:
        q = q - act.zero.to(torch.float32).reshape(())
    return q * s
