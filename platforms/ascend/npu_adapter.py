"""The one thin adapter between quantrt and torch_npu: the handful of torch_npu ops the NPU kernels call.

`NpuOps` is the protocol; `TorchNpuOps` forwards to the real torch_npu (imported lazily through the
platform's guarded import, never at module import); `quantrt.platforms.ascend.emulation.EmulatedNpuOps`
implements the same calls on CPU following the documented semantics (torch_npu API reference / CANN
aclnn docs), so the kernels are tested here without an NPU. Emulated is not the same as run on hardware.

Documented semantics the kernels rely on (and the emulation follows):
- npu_quantize(x, scales, zero_points, dtype, axis, div_mode=False): q = x * scales + zero_points -> int8.
- npu_dynamic_quant(x, dst_type=int8|quint4x2): symmetric per-token, scale = rowmax(|x|) / DTYPE_MAX,
  q = round(x / scale); int4 results come packed 8 per int32 along the last dimension.
- npu_quant_matmul(x1, x2, scale, offset=, pertoken_scale=, bias=, output_dtype=): int8 (or int4 packed
  in int32) x1 [M, K] @ x2 [K, N]; bias int32: (x1@x2 + bias) * scale [* pertoken]; bias float:
  x1@x2 * scale [* pertoken] + bias.
- npu_weight_quant_batchmatmul(x, weight [K, N] int8, antiquant_scale, antiquant_offset, bias=):
  y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias.
- npu_grouped_matmul(x, weight, bias=, scale=, per_token_scale=, group_list=, split_item=, group_type=,
  group_list_type=, output_dtype=): one matmul per group of rows; int8/int4 operands are dequantized by the
  per-channel (or per-K-group) `scale` and the per-row `per_token_scale` (the MoE path of vllm-ascend).
- npu_convert_weight_to_int4pack(w int32 [K, N] holding int4): -> int32 [K, N/8].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform


class NpuOps(Protocol):
    """The torch_npu operators quantrt calls (keyword names as torch_npu spells them)."""

    def npu_quantize(self, x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                     dtype: torch.dtype, axis: int = -1, div_mode: bool = True) -> torch.Tensor: ...

    def npu_dynamic_quant(self, x: torch.Tensor, *, smooth_scales: torch.Tensor | None = None,
                          dst_type: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def npu_quant_matmul(self, x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *,
                         offset: torch.Tensor | None = None, pertoken_scale: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None,
                         output_dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def npu_weight_quant_batchmatmul(self, x: torch.Tensor, weight: torch.Tensor,
                                     antiquant_scale: torch.Tensor,
                                     antiquant_offset: torch.Tensor | None = None,
                                     quant_scale: torch.Tensor | None = None,
                                     quant_offset: torch.Tensor | None = None,
                                     bias: torch.Tensor | None = None,
                                     antiquant_group_size: int = 0) -> torch.Tensor: ...

    def npu_grouped_matmul(self, x: list[torch.Tensor], weight: list[torch.Tensor], *,
                           bias: list[torch.Tensor] | None = None, scale: list[torch.Tensor] | None = None,
                           per_token_scale: list[torch.Tensor] | None = None, group_list: Any = None,
                           split_item: int = 0, group_type: int | None = None, group_list_type: int = 0,
                           output_dtype: torch.dtype | None = None) -> list[torch.Tensor]: ...

    def npu_convert_weight_to_int4pack(self, weight: torch.Tensor) -> torch.Tensor: ...


_OPS = ("npu_quantize", "npu_dynamic_quant", "npu_quant_matmul", "npu_weight_quant_batchmatmul",
        "npu_grouped_matmul", "npu_convert_weight_to_int4pack")


class TorchNpuOps:
    """Forwards every NpuOps call to torch_npu (imported on first use with the guarded import)."""

    def __init__(self, module: Any = None) -> None:
        self._mod = module

    def _torch_npu(self) -> Any:
        if self._mod is None:
            import importlib

            from quantrt.platforms.ascend import import_torch_npu

            import_torch_npu()
            self._mod = importlib.import_module("torch_npu")
        return self._mod

    def __getattr__(self, name: str) -> Any:
        if name not in _OPS:
            raise AttributeError(name)
        return getattr(self._torch_npu(), name)


def npu_ops_of(platform: Platform) -> NpuOps | None:
    """The platform's NpuOps (AscendPlatform: torch_npu; the emulated platform: CPU emulation), else None."""
    get = getattr(platform, "npu_ops", None)
    return get() if callable(get) else None
