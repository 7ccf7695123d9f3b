"""AWQ (AutoAWQ GEMM layout, FORMATS.md §2.2): 4-bit, interleaved nibbles along N, unsigned zero points.
`awq_marlin` is SGLang's fast-kernel spelling of the same checkpoint and loads identically here.
Like SGLang/vLLM we assume the GEMM layout (`version` is not read). SGLang's plain AWQ kernel wants fp16
activations; quantrt runs bf16 and fp32 models as they are (see gptq.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from quantrt.errors import CheckpointError, ConfigError
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.formats.gptq import skip_layer, split_partial_groups, symmetric_or_zero
from quantrt.quant.formats.packing import unpack_awq
from quantrt.quant.weights import WEIGHT_ONLY, ActScheme, IntWeight

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs


class _AwqBase(QuantFormat):
    def __init__(self, group_size: int, zero_point: bool, ignored: tuple[str, ...] = ()):
        self.group_size, self.zero_point, self.ignored = group_size, zero_point, ignored

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> _AwqBase:
        if not qcfg:
            raise ConfigError(f"{cls.name} needs an AWQ checkpoint (quantization_config with bits/group_size)")
        bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
        if bits != 4:
            raise ConfigError(f"AWQ bits={bits} is not supported; AWQ checkpoints are 4-bit")
        group = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
        return cls(group, bool(qcfg.get("zero_point", True)), tuple(qcfg.get("modules_to_not_convert") or ()))

    def describe(self) -> str:
        return f"{self.name} (w4a16 g{self.group_size}, GEMM layout, zero points)"

    def is_quantized(self, prefix: str) -> bool:
        return not skip_layer(prefix, self.ignored, False)

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset({"qweight", "qzeros", "scales"}), frozenset()

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> IntWeight:
        """qweight [K, N/8] int32, qzeros [K/G, N/8], scales [K/G, N] -> IntWeight [N, K]."""
        n, k = shape
        g = k if self.group_size == -1 else self.group_size
        if g <= 0 or n % 8:
            raise CheckpointError(f"{prefix}: AWQ needs a positive group size and 8 | N (G={g}, shape {shape})")
        ng = -(-k // g)                                         # a partial last group when G does not divide K
        want = {"qweight": (k, n // 8), "qzeros": (ng, n // 8), "scales": (ng, n)}
        for name, shp in want.items():
            if tuple(tensors[name].shape) != shp:
                raise CheckpointError(f"{prefix}.{name} has shape {tuple(tensors[name].shape)}, expected {shp}")
        codes = unpack_awq(tensors["qweight"]).t().contiguous()                  # [N, K] uint8
        zero = unpack_awq(tensors["qzeros"]).t().contiguous()                    # [N, K/G] uint8
        scale = tensors["scales"].t().to(torch.float32).contiguous()             # [N, K/G]
        g, (scale, zero) = split_partial_groups(k, g, scale, zero)
        codes, zero_opt = symmetric_or_zero(codes, zero, 4)
        return IntWeight(codes, scale, 4, g, zero=zero_opt)

    def act_scheme(self, prefix: str) -> ActScheme:
        return WEIGHT_ONLY


@register_format
class AwqFormat(_AwqBase):
    name = "awq"


@register_format
class AwqMarlinFormat(_AwqBase):
    name = "awq_marlin"
