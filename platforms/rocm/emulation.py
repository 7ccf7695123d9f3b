"""CPU emulation of the aiter ops in AiterOps (written from aiter's documented Python semantics), and an
emulated MI300X platform (name "rocm", arch gfx942, e4m3fnuz, tensors on CPU) so the aiter kernels run end
to end in CI. EMULATED: it checks layouts, dtypes and scale conventions, not CK kernels' rounding or speed.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from quantrt.platform.checks import ROCM_ALLOWED_QUANTIZATION
from quantrt.platforms.xpu.cpu_platform import CpuPlatform

_FP8 = (torch.float8_e4m3fnuz, torch.float8_e4m3fn)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"[emulated aiter] {msg}")


def _shuffle_dims(shape: torch.Size, elem: int, layout: tuple[int, int]) -> tuple[int, int, int, int, int]:
    bn, bk = layout[0], layout[1] * 2
    pack = 16 // elem
    n, k = shape[-2], shape[-1]
    _check(n % bn == 0 and k % bk == 0, f"shuffle needs N % {bn} == 0 and K % {bk} == 0, got {tuple(shape)}")
    return n // bn, bn, k // bk, bk // pack, pack


def unshuffle_weight(x: torch.Tensor, layout: tuple[int, int] = (16, 16)) -> torch.Tensor:
    """Inverse of shuffle_weight (what a bpreshuffle GEMM reads back)."""
    nb, bn, kb, kp, p = _shuffle_dims(x.shape, x.element_size(), layout)
    v = x.reshape(-1, nb, kb, kp, bn, p).permute(0, 1, 4, 2, 3, 5)
    return v.contiguous().reshape(x.shape)


class EmulatedAiterOps:
    """AiterOps on CPU; GEMMs dequantize exactly (fp8/int8 values are exact in fp32) and sum in fp32."""

    def pertoken_quant(self, x: torch.Tensor, quant_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        _check(quant_dtype in (*_FP8, torch.int8), f"quant_dtype {quant_dtype}")
        xf = x.to(torch.float32)
        qmax = 127.0 if quant_dtype == torch.int8 else float(torch.finfo(quant_dtype).max)
        scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax        # [M, 1]
        y = (xf / scale).clamp(-qmax, qmax)
        return (y.round().to(torch.int8) if quant_dtype == torch.int8 else y.to(quant_dtype)), scale

    def shuffle_weight(self, x: torch.Tensor, layout: tuple[int, int] = (16, 16)) -> torch.Tensor:
        nb, bn, kb, kp, p = _shuffle_dims(x.shape, x.element_size(), layout)
        v = x.reshape(-1, nb, bn, kb, kp, p).permute(0, 1, 3, 4, 2, 5)
        return v.contiguous().reshape(x.shape)

    def gemm_a8w8(self, XQ: torch.Tensor, WQ: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        _check(XQ.dtype == WQ.dtype and XQ.dtype in (*_FP8, torch.int8), f"operands {XQ.dtype}/{WQ.dtype}")
        _check(XQ.shape[-1] == WQ.shape[-1], f"K mismatch {tuple(XQ.shape)} vs {tuple(WQ.shape)}")
        _check(x_scale.shape == (XQ.shape[0], 1) and w_scale.shape == (1, WQ.shape[0]), "scale shapes")
        _check(dtype in (torch.bfloat16, torch.float16), f"output dtype {dtype}")
        y = (XQ.to(torch.float32) @ WQ.to(torch.float32).T) * x_scale.float() * w_scale.float()
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(dtype)

    def gemm_a8w8_bpreshuffle(self, XQ: torch.Tensor, WQ: torch.Tensor, x_scale: torch.Tensor,
                              w_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.gemm_a8w8(XQ, unshuffle_weight(WQ), x_scale, w_scale, None, dtype)

    def rmsnorm2d_fwd(self, x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon) * weight.to(torch.float32)
        return y.to(x.dtype)

    def rmsnorm2d_fwd_with_add(self, out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                               residual_out: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
        residual_out.copy_(x + residual)
        out.copy_(self.rmsnorm2d_fwd(residual_out, weight, epsilon))


class EmulatedRocmPlatform(CpuPlatform):
    """An MI300X (gfx942, fp8 e4m3fnuz) as quantrt's checks and kernels see it, with aiter on, on CPU."""

    name: ClassVar[str] = "rocm"
    allowed_quantization: ClassVar[frozenset[str] | None] = ROCM_ALLOWED_QUANTIZATION
    linear_kernels_ref: ClassVar[str | None] = "quantrt.platforms.rocm.kernels:ROCM_LINEAR_KERNELS"

    def arch(self) -> str:
        return "gfx942"

    def is_fp8_fnuz(self) -> bool:
        return True

    def fp8_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fnuz

    def aiter_ops(self) -> EmulatedAiterOps:
        return EmulatedAiterOps()

    def device_name(self) -> str:
        return "AMD Instinct MI300X (emulated on CPU, aiter emulated)"
