"""aiter linear kernels for ROCm (issue 8): with SGLANG_USE_AITER=1 / QUANTRT_USE_AITER=1, per-channel fp8 (converted to
e4m3fnuz on MI300, scales x2) and int8 W8A8 linears run aiter's gemm_a8w8 on preshuffled weights with
per-token dynamic activations; 128x128 block fp8 runs gemm_a8w8_blockscale with per-1x128 activations. Without the variable these kernels decline and the next ones (Triton
kernels shared with CUDA, when present) or the reference kernel serve the layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrt.platforms.rocm.aiter_adapter import AiterOps, aiter_ops_of
from quantrt.platforms.rocm.fnuz import weight_to_fnuz
from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.weights import ActKind, FloatWeight, IntWeight, ScaleGranularity

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

_HALF = (torch.float16, torch.bfloat16)


class _AiterW8A8Kernel(LinearKernel):
    """Shared apply: per-token quant -> (bpreshuffle) gemm_a8w8 -> + bias."""

    def __init__(self, ops: AiterOps, data: torch.Tensor, scale: torch.Tensor, act_dtype: torch.dtype,
                 out_dtype: torch.dtype, device: torch.device):
        n, k = data.shape                                                       # [N, K] int8 / fp8
        self.ops, self.act_dtype, self.out_dtype, self.n = ops, act_dtype, out_dtype, n
        self.preshuffled = n % 16 == 0 and k % 32 == 0
        data = data.to(device)
        self.weight = ops.shuffle_weight(data, (16, 16)) if self.preshuffled else data
        self.w_scale = scale.to(torch.float32).reshape(1, n).to(device)         # [1, N]

    @staticmethod
    def _ok(spec: LinearSpec, platform: Platform, act_dtype: torch.dtype) -> tuple[bool, str]:
        if aiter_ops_of(platform) is None:
            return False, "aiter is off (set SGLANG_USE_AITER=1 on ROCm)"
        if spec.act.kind is not ActKind.DYNAMIC_TOKEN or spec.act.dtype != act_dtype:
            return False, f"activation scheme {spec.act} is not {act_dtype} dynamic per-token"
        if spec.compute_dtype not in _HALF:
            return False, f"compute dtype {spec.compute_dtype}: aiter GEMMs output float16/bfloat16"
        return True, ""

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, xs = self.ops.pertoken_quant(x.reshape(-1, x.shape[-1]), quant_dtype=self.act_dtype)
        if self.preshuffled:
            y = self.ops.gemm_a8w8_bpreshuffle(xq, self.weight, xs, self.w_scale, dtype=self.out_dtype)
            y = y if bias is None else y + bias.to(y.dtype)
        else:
            y = self.ops.gemm_a8w8(xq, self.weight, xs, self.w_scale, bias, dtype=self.out_dtype)
        return y.reshape(*lead, self.n)


class AiterFp8Kernel(_AiterW8A8Kernel):
    """fp8 per-tensor/per-channel weights; e4m3fn checkpoints become e4m3fnuz on MI300 (FORMATS.md fact 7)."""

    name = "aiter_fp8_w8a8"

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        w = spec.weight
        if not isinstance(w, FloatWeight) or w.granularity is ScaleGranularity.BLOCK:
            return False, f"needs a per-tensor/per-channel FloatWeight, got {type(w).__name__}"
        if w.data.dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
            return False, f"weight dtype {w.data.dtype} is not e4m3"
        return cls._ok(spec, platform, torch.float8_e4m3fn)

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> AiterFp8Kernel:
        w: FloatWeight = spec.weight  # type: ignore[assignment]
        fnuz = getattr(platform, "is_fp8_fnuz", lambda: False)()
        if fnuz:
            w = weight_to_fnuz(w)
        n = w.shape[0]
        scale = w.scale.reshape(-1).expand(n) if w.granularity is ScaleGranularity.TENSOR else w.scale
        act = torch.float8_e4m3fnuz if fnuz else torch.float8_e4m3fn
        return cls(aiter_ops_of(platform), w.data, scale, act, spec.compute_dtype,  # type: ignore[arg-type]
                   platform.device())


class AiterInt8Kernel(_AiterW8A8Kernel):
    """Symmetric per-channel int8 weights with per-token int8 activations (w8a8_int8, msModelSlim dynamic)."""

    name = "aiter_int8_w8a8"

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        w = spec.weight
        if not isinstance(w, IntWeight) or w.bits != 8 or w.codes.dtype != torch.int8:
            return False, "needs an 8-bit IntWeight with int8 codes"
        if w.group_size != w.shape[1] or w.zero is not None or w.offset is not None or w.g_idx is not None:
            return False, "needs symmetric per-channel scales"
        return cls._ok(spec, platform, torch.int8)

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> AiterInt8Kernel:
        w: IntWeight = spec.weight  # type: ignore[assignment]
        return cls(aiter_ops_of(platform), w.codes, w.scale.reshape(-1), torch.int8,  # type: ignore[arg-type]
                   spec.compute_dtype, platform.device())


class AiterBlockFp8Kernel(LinearKernel):
    """Block fp8 (DeepSeek-V3 style: 128x128 weight blocks, 1x128 per-token-group activations):
    aiter's per-1x128 quant (pertoken_quant over 128-wide groups) + gemm_a8w8_blockscale (FORMATS.md §4.4)."""

    name = "aiter_block_fp8"
    BLOCK = 128

    def __init__(self, ops: AiterOps, w: FloatWeight, act_dtype: torch.dtype, out_dtype: torch.dtype,
                 device: torch.device):
        self.ops, self.act_dtype, self.out_dtype = ops, act_dtype, out_dtype
        self.n, self.k = w.shape
        self.weight = w.data.to(device)                                         # [N, K] fp8
        self.w_scale = w.scale.to(torch.float32).to(device)                     # [N/128, K/128]

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        w, a, b = spec.weight, spec.act, cls.BLOCK
        if aiter_ops_of(platform) is None:
            return False, "aiter is off (set SGLANG_USE_AITER=1 on ROCm)"
        if not isinstance(w, FloatWeight) or w.granularity is not ScaleGranularity.BLOCK or w.block != (b, b):
            return False, f"needs a {b}x{b} block-scaled FloatWeight"
        if w.data.dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
            return False, f"weight dtype {w.data.dtype} is not e4m3"
        if a.kind is not ActKind.DYNAMIC_GROUP or a.group != b or a.dtype != torch.float8_e4m3fn:
            return False, f"activation scheme {a} is not fp8 per-token-group of {b}"
        if w.shape[1] % b:
            return False, f"K={w.shape[1]} is not a multiple of {b} (per-1x{b} activation groups)"
        if spec.compute_dtype not in _HALF:
            return False, f"compute dtype {spec.compute_dtype}: aiter GEMMs output float16/bfloat16"
        return True, ""

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> AiterBlockFp8Kernel:
        w: FloatWeight = spec.weight  # type: ignore[assignment]
        fnuz = getattr(platform, "is_fp8_fnuz", lambda: False)()
        if fnuz:
            w = weight_to_fnuz(w)
        act = torch.float8_e4m3fnuz if fnuz else torch.float8_e4m3fn
        return cls(aiter_ops_of(platform), w, act, spec.compute_dtype, platform.device())  # type: ignore[arg-type]

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        m = x2.shape[0]
        xq, xs = self.ops.pertoken_quant(x2.reshape(-1, self.BLOCK), quant_dtype=self.act_dtype)  # per 1x128
        y = self.ops.gemm_a8w8_blockscale(xq.reshape(m, self.k), self.weight, xs.reshape(m, -1), self.w_scale,
                                          dtype=self.out_dtype)
        y = y if bias is None else y + bias.to(y.dtype)
        return y.reshape(*lead, self.n)


AITER_LINEAR_KERNELS: list[type[LinearKernel]] = [AiterFp8Kernel, AiterInt8Kernel, AiterBlockFp8Kernel]
