"""Layer ops the CUDA platform swaps in for quantrt's torch math (Platform.rms_norm_op).

`triton_rms_norm` is one kernel per call where the torch RMSNorm launches about eight (cast, square,
mean, rsqrt, two products, two casts): in a decode step of a 32-layer model that is ~500 fewer
launches, the part of a CUDA-graph replay that is not weight reading. It computes exactly what
quantrt.layers.norm.RMSNorm does for plain norms: y = (x * rsqrt(mean(x^2) + eps)) rounded to x.dtype,
times the weight in x.dtype (fp32 product, rounded).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, d, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < d
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / d + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, y.to(x.dtype), mask=mask)


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] fp16/bf16/fp32, weight [D] in x.dtype -> [..., D] x.dtype."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(d)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), d, eps, BLOCK=block,
                                         num_warps=4 if block <= 2048 else 8)
    return y.reshape(x.shape)
