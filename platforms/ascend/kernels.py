"""Ascend NPU linear kernels (`NPU_LINEAR_KERNELS`), all through the NpuOps adapter (torch_npu on an NPU,
the CPU emulation in tests). They serve per-channel int8/int4 IntWeights, which msModelSlim, compressed-
tensors W8A8 and W8A16 checkpoints become:
- NpuW8A8StaticKernel:  npu_quantize (scale 1/input_scale, zero point) + npu_quant_matmul with
  deq_scale = weight scale * input_scale and a float bias that carries the zero-point correction.
- NpuW8A8DynamicKernel / NpuW4A4DynamicKernel: npu_dynamic_quant + npu_quant_matmul(pertoken_scale=...).
- NpuW8A16Kernel: npu_weight_quant_batchmatmul with antiquant scale/offset.
Weights are stored [K, N] (SGLang transposes NPU weights; the NZ cast is left to torch_npu's defaults).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from quantrt.platforms.ascend.npu_adapter import NpuOps, npu_ops_of
from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.weights import ActKind, IntWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

_HALF = (torch.float16, torch.bfloat16)


def _common(spec: LinearSpec, platform: Platform, bits: int, acts: tuple[ActKind, ...],
            act_dtype: torch.dtype | None) -> tuple[bool, str]:
    """Checks every NPU kernel shares: adapter present, per-channel IntWeight of `bits`, act scheme, dtype."""
    w = spec.weight
    if npu_ops_of(platform) is None:
        return False, f"platform {platform.name} has no torch_npu ops"
    if not isinstance(w, IntWeight):
        return False, f"weight is {type(w).__name__}, not IntWeight"
    if w.bits != bits or w.codes.dtype != torch.int8:
        return False, f"needs int{bits} codes held in int8, got {w.bits}-bit {w.codes.dtype}"
    if w.group_size != w.shape[1] or w.g_idx is not None or w.offset is not None:
        return False, "needs per-channel scales (no groups, g_idx or float offset)"
    if spec.act.kind not in acts or spec.act.dtype != act_dtype:
        return False, f"activation scheme {spec.act} is not {'/'.join(str(a) for a in acts)} {act_dtype}"
    if spec.compute_dtype not in _HALF:
        return False, f"compute dtype {spec.compute_dtype}: NPU quant matmuls take float16/bfloat16"
    return True, ""


class _NpuKernel(LinearKernel):
    def __init__(self, ops: NpuOps, spec: LinearSpec, device: torch.device):
        w: IntWeight = spec.weight  # type: ignore[assignment]
        self.ops, self.dtype, self.n = ops, spec.compute_dtype, w.shape[0]
        self.weight_kn = w.codes.t().contiguous().to(device)                   # [K, N] int8
        self.scale = w.scale.to(torch.float32).reshape(-1).to(device)           # [N] fp32
        self.zero = None if w.zero is None else w.zero.reshape(-1).to(device)   # [N] int

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> LinearKernel:
        return cls(npu_ops_of(platform), spec, platform.device())  # type: ignore[arg-type]

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    def _bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        return None if bias is None else bias.to(torch.float32)


class NpuW8A8StaticKernel(_NpuKernel):
    """msModelSlim W8A8 (static, asymmetric per-tensor int8 activations)."""

    name = "npu_w8a8_static"

    def __init__(self, ops: NpuOps, spec: LinearSpec, device: torch.device):
        super().__init__(ops, spec, device)
        act = spec.act
        self.in_scale = act.scale.to(torch.float32).reshape(1).to(device)      # type: ignore[union-attr]
        self.inv_scale = 1.0 / self.in_scale
        zero = act.zero.to(torch.float32).reshape(1) if act.zero is not None else torch.zeros(1)
        self.in_zero = zero.to(device)
        self.deq = (self.scale * self.in_scale).contiguous()                   # [N] fp32 deq_scale
        # y = deq * (x_q @ W - zero * rowsum(W)) + b: the zero-point term rides in the float bias
        self.correction = -self.deq * zero.to(device) * self.weight_kn.to(torch.float32).sum(0)  # [N]

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        ok, why = _common(spec, platform, 8, (ActKind.STATIC_TENSOR,), torch.int8)
        if ok and spec.weight.zero is not None:  # type: ignore[union-attr]
            return False, "npu_quant_matmul has no weight offset"
        return ok, why

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        xq = self.ops.npu_quantize(self._flat(x), self.inv_scale, self.in_zero, torch.qint8, -1, False)
        b = self.correction if bias is None else self.correction + bias.to(torch.float32)
        y = self.ops.npu_quant_matmul(xq, self.weight_kn, self.deq, bias=b, output_dtype=self.dtype)
        return y.reshape(*lead, self.n)


class NpuW8A8DynamicKernel(_NpuKernel):
    """Per-token dynamic int8 activations x per-channel int8 weights."""

    name = "npu_w8a8_dynamic"
    bits: ClassVar[int] = 8
    act_dtype: ClassVar[torch.dtype] = torch.int8

    def __init__(self, ops: NpuOps, spec: LinearSpec, device: torch.device):
        super().__init__(ops, spec, device)
        self.dst_type = torch.quint4x2 if self.bits == 4 else torch.int8
        if self.bits == 4:  # int4 weights go packed 8 per int32 along N
            self.weight_kn = ops.npu_convert_weight_to_int4pack(self.weight_kn.to(torch.int32))

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        ok, why = _common(spec, platform, cls.bits, (ActKind.DYNAMIC_TOKEN,), cls.act_dtype)
        if ok and spec.weight.zero is not None:  # type: ignore[union-attr]
            return False, "npu_quant_matmul has no weight offset"
        if ok and cls.bits == 4 and (spec.in_features % 8 or spec.out_features % 8):
            return False, "int4 packing needs K and N divisible by 8"
        return ok, why

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, s = self.ops.npu_dynamic_quant(self._flat(x).to(self.dtype), dst_type=self.dst_type)
        y = self.ops.npu_quant_matmul(xq, self.weight_kn, self.scale, pertoken_scale=s, bias=self._bias(bias),
                                      output_dtype=self.dtype)
        return y.reshape(*lead, self.n)


class NpuW4A4DynamicKernel(NpuW8A8DynamicKernel):
    """msModelSlim W4A4_DYNAMIC: per-token int4 activations x per-channel int4 weights."""

    name = "npu_w4a4_dynamic"
    bits: ClassVar[int] = 4
    act_dtype: ClassVar[torch.dtype] = torch.int4


class NpuW8A16Kernel(_NpuKernel):
    """Weight-only per-channel int8 (W8A16) through npu_weight_quant_batchmatmul."""

    name = "npu_w8a16"

    def __init__(self, ops: NpuOps, spec: LinearSpec, device: torch.device):
        super().__init__(ops, spec, device)
        self.a_scale = self.scale.to(self.dtype)                               # antiquant dtype = x dtype
        self.a_offset = None if self.zero is None else (-self.zero.to(torch.float32)).to(self.dtype)

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        return _common(spec, platform, 8, (ActKind.NONE,), None)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.ops.npu_weight_quant_batchmatmul(self._flat(x).to(self.dtype), self.weight_kn, self.a_scale,
                                                  self.a_offset, bias=self._bias(bias))
        return y.reshape(*lead, self.n)


NPU_LINEAR_KERNELS: list[type[LinearKernel]] = [NpuW8A8StaticKernel, NpuW8A8DynamicKernel,
                                                NpuW4A4DynamicKernel, NpuW8A16Kernel]
