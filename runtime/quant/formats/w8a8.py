"""w8a8_int8 and w8a8_fp8 (SGLang's `--quantization w8a8_int8|w8a8_fp8`, FORMATS.md §2.1).

Per-channel weights, dynamic per-token activations. Two ways in:
- online, on a float checkpoint: every linear except lm_head is quantized at load time
  (int8: symmetric round-to-nearest, scale = amax/127 per output row; fp8: e4m3, amax/448 per row);
- as an override of a compressed-tensors checkpoint (the allowed CLI/checkpoint pair of FORMATS.md
  §1.3): the checkpoint's INT8 (or FP8) tensors are read by the compressed-tensors format and run with
  per-token dynamic activations, whatever the checkpoint's own activation scheme said.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from quantrt.errors import CheckpointError, ConfigError
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import (
    ActKind,
    ActScheme,
    FloatWeight,
    IntWeight,
    QuantizedWeight,
    ScaleGranularity,
)

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_AMAX = 1e-12


def quantize_int8_channel(w: torch.Tensor) -> IntWeight:
    """Float weight [N, K] -> IntWeight: codes int8 [N, K] in [-127, 127], scale [N, 1] = amax/127."""
    w32 = w.to(torch.float32)
    scale = w32.abs().amax(dim=1, keepdim=True).clamp(min=_MIN_AMAX) / 127.0    # [N, 1]
    codes = (w32 / scale).round().clamp(-127, 127).to(torch.int8)               # [N, K]
    return IntWeight(codes, scale, bits=8, group_size=w32.shape[1])


def check_float_weight(prefix: str, w: torch.Tensor, shape: tuple[int, int]) -> None:
    """A float checkpoint weight of the expected [N, K] shape, or a CheckpointError naming it."""
    if tuple(w.shape) != tuple(shape):
        raise CheckpointError(f"{prefix}.weight has shape {tuple(w.shape)}, expected {tuple(shape)}")
    if w.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{prefix}.weight has dtype {w.dtype}; online quantization reads "
                              f"float32/bfloat16/float16 checkpoints")


def quantize_online(prefix: str, w: torch.Tensor, shape: tuple[int, int], kind: str) -> QuantizedWeight:
    """Check a float checkpoint weight and quantize it per channel: kind "int8" or "fp8"."""
    check_float_weight(prefix, w, shape)
    if kind == "int8":
        return quantize_int8_channel(w)
    return quantize_fp8(w, ScaleGranularity.CHANNEL)


class _W8A8Format(QuantFormat):
    """Shared logic of the two W8A8 methods; subclasses fix the dtype."""

    online = True
    kind: ClassVar[str]
    act_dtype: ClassVar[torch.dtype]
    weight_type: ClassVar[type]

    def __init__(self, checkpoint: QuantFormat | None = None):
        self.checkpoint = checkpoint  # the compressed-tensors format when overriding a checkpoint

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> _W8A8Format:
        if not qcfg:
            return cls()
        method = str(qcfg.get("quant_method", "")).lower()
        if method != "compressed-tensors":
            raise ConfigError(f"--quantization {cls.name} reads float checkpoints or compressed-tensors "
                              f"checkpoints, not {method or 'this quantization_config'}")
        from quantrt.quant.formats.compressed_tensors import CompressedTensorsFormat

        return cls(CompressedTensorsFormat.from_config(qcfg, args))

    def describe(self) -> str:
        src = "compressed-tensors checkpoint" if self.checkpoint else "online"
        return f"{self.name} ({src}: per-channel {self.kind} weights, dynamic per-token {self.kind} activations)"

    def is_quantized(self, prefix: str) -> bool:
        if self.checkpoint is not None:
            return self.checkpoint.is_quantized(prefix)
        return prefix.rsplit(".", 1)[-1] != "lm_head"

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        if self.checkpoint is not None:
            return self.checkpoint.tensor_names(prefix)
        return frozenset({"weight"}), frozenset()

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor],
                    shape: tuple[int, int]) -> QuantizedWeight:
        if self.checkpoint is None:
            return quantize_online(prefix, tensors["weight"], shape, self.kind)
        w = self.checkpoint.make_weight(prefix, tensors, shape)
        if not isinstance(w, self.weight_type) or _bits(w) != 8:
            raise CheckpointError(f"--quantization {self.name}: {prefix} holds a {_describe(w)} weight in "
                                  f"this compressed-tensors checkpoint, not 8-bit {self.kind}")
        return w

    def act_scheme(self, prefix: str) -> ActScheme:
        return ActScheme(ActKind.DYNAMIC_TOKEN, self.act_dtype)


def _bits(w: QuantizedWeight) -> int:
    if isinstance(w, IntWeight):
        return w.bits
    if isinstance(w, FloatWeight):
        return 8
    return 0


def _describe(w: QuantizedWeight) -> str:
    if isinstance(w, IntWeight):
        return f"{w.bits}-bit integer"
    return type(w).__name__


@register_format
class W8A8Int8Format(_W8A8Format):
    """int8 per-channel weights x int8 per-token dynamic activations."""

    name = "w8a8_int8"
    kind = "int8"
    act_dtype = torch.int8
    weight_type = IntWeight


@register_format
class W8A8Fp8Format(_W8A8Format):
    """e4m3 per-channel weights x e4m3 per-token dynamic activations."""

    name = "w8a8_fp8"
    kind = "fp8"
    act_dtype = torch.float8_e4m3fn
    weight_type = FloatWeight
