"""`--torchao-config` (FORMATS.md §4.3): SGLang's nine torchao strings as online quantization into our
canonical weights, so they run on every platform through its own kernels (torchao's int4 path does not
run on CPU at all, and its int8 paths are slow there: reference/CPU.md).

| string           | weight                                  | activations                 |
|------------------|-----------------------------------------|-----------------------------|
| int8wo           | int8 per-channel symmetric              | none                        |
| int8dq           | int8 per-channel symmetric              | int8 dynamic per-token      |
| int4wo-<g>       | uint4 asymmetric, group g, float zero   | none                        |
| fp8wo            | e4m3 per-channel                        | none                        |
| fp8dq-per_tensor | e4m3 per-tensor                         | e4m3 dynamic per-tensor     |
| fp8dq-per_row    | e4m3 per-channel                        | e4m3 dynamic per-token      |

Only linears whose name contains `proj` are quantized (SGLang's filter), so lm_head stays float.
int4wo follows torchao's `Int4WeightOnlyConfig` (tinygemm layout, `ZeroPointDomain.FLOAT`): per group,
scale = (max - min) / 15, zero = min + 8·scale (both rounded to bf16, torchao's scales_precision),
q = clamp(round((w - (zero - 8·scale)) / scale), 0, 15) and w ≈ (q - 8)·scale + zero. The canonical
IntWeight stores codes q with offset = zero - 8·scale (w = q·scale + offset).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from quantrt.errors import ConfigError
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.formats.w8a8 import check_float_weight, quantize_int8_channel
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import (
    WEIGHT_ONLY,
    ActKind,
    ActScheme,
    DenseWeight,
    IntWeight,
    QuantizedWeight,
    ScaleGranularity,
)

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs

log = logging.getLogger(__name__)
INT4_GROUPS = (32, 64, 128, 256)
E4M3 = torch.float8_e4m3fn


def quantize_int4_torchao(w: torch.Tensor, group: int) -> IntWeight:
    """Float weight [N, K] -> torchao-style asymmetric uint4 IntWeight (codes [N, K] uint8 0..15,
    scale/offset [N, K/group] fp32 holding bf16-rounded values)."""
    w32 = w.to(torch.float32)
    n, k = w32.shape
    g = w32.reshape(n, k // group, group)                                     # [N, G, group]
    lo, hi = g.amin(-1), g.amax(-1)                                           # [N, G]
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.bfloat16).eps).to(torch.bfloat16).float()
    zero = (lo + scale * 8).to(torch.bfloat16).float()
    low = zero - scale * 8                                                    # value of code 0
    q = ((g - low[..., None]) / scale[..., None]).round().clamp(0, 15)
    return IntWeight(q.reshape(n, k).to(torch.uint8), scale, bits=4, group_size=group, offset=low)


def parse_torchao_config(s: str) -> tuple[str, int]:
    """Validate one of the nine strings; (kind, int4 group or 0). SGLang's substring order."""
    if s in ("int8wo", "int8dq", "fp8wo", "fp8dq-per_tensor", "fp8dq-per_row"):
        return s, 0
    if s.startswith("int4wo-"):
        g = s.removeprefix("int4wo-")
        if not g.isdigit() or int(g) not in INT4_GROUPS:
            raise ConfigError(f"--torchao-config {s!r}: int4wo group size must be one of "
                              f"{', '.join(map(str, INT4_GROUPS))}")
        return "int4wo", int(g)
    raise ConfigError(f"--torchao-config {s!r} is not a torchao config; choose one of: int8wo, int8dq, "
                      f"int4wo-32, int4wo-64, int4wo-128, int4wo-256, fp8wo, fp8dq-per_tensor, fp8dq-per_row")


@register_format
class TorchaoFormat(QuantFormat):
    """Online quantization selected by `--torchao-config` (method name `torchao`)."""

    name = "torchao"
    online = True

    def __init__(self, config: str):
        self.config = config
        self.kind, self.group = parse_torchao_config(config)

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> TorchaoFormat:
        """qcfg = {"torchao_config": "<string>"} (detect.detect_for_args builds it from the flag)."""
        s = qcfg.get("torchao_config") or (args.torchao_config if args is not None else None)
        if not s:
            raise ConfigError("the torchao format needs --torchao-config")
        return cls(str(s))

    def describe(self) -> str:
        return f"torchao {self.config}"

    def is_quantized(self, prefix: str) -> bool:
        return "proj" in prefix

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset({"weight"}), frozenset()

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor],
                    shape: tuple[int, int]) -> QuantizedWeight:
        w = tensors["weight"]
        check_float_weight(prefix, w, shape)
        if self.kind in ("int8wo", "int8dq"):
            return quantize_int8_channel(w)
        if self.kind in ("fp8wo", "fp8dq-per_row"):
            return quantize_fp8(w, ScaleGranularity.CHANNEL)
        if self.kind == "fp8dq-per_tensor":
            return quantize_fp8(w, ScaleGranularity.TENSOR)
        if shape[1] % self.group:  # torchao skips such layers too (it logs and leaves them float)
            log.warning("--torchao-config %s: %s has K=%d, not a multiple of %d; left unquantized",
                        self.config, prefix, shape[1], self.group)
            return DenseWeight(w)
        return quantize_int4_torchao(w, self.group)

    def act_scheme(self, prefix: str) -> ActScheme:
        if self.kind == "int8dq":
            return ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8)
        if self.kind == "fp8dq-per_row":
            return ActScheme(ActKind.DYNAMIC_TOKEN, E4M3)
        if self.kind == "fp8dq-per_tensor":
            return ActScheme(ActKind.DYNAMIC_TENSOR, E4M3)
        return WEIGHT_ONLY
