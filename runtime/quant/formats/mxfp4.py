"""MXFP4 (OCP MX, gpt-oss): `quant_method: "mxfp4"` (FORMATS.md §2.7).

Only the MoE experts are quantized; attention, router, embeddings and lm_head stay bf16
(`modules_to_not_convert`). Each expert projection is stored fused over the experts:

| tensor                            | dtype | shape                 |
|-----------------------------------|-------|-----------------------|
| `<experts>.gate_up_proj_blocks`   | uint8 | [E, 2I, H/32, 16]     |
| `<experts>.gate_up_proj_scales`   | uint8 | [E, 2I, H/32]         |
| `<experts>.down_proj_blocks`      | uint8 | [E, H, I/32, 16]      |
| `<experts>.down_proj_scales`      | uint8 | [E, H, I/32]          |

Rows are output features (N), blocks of 32 run along the input features (K). A block's 16 bytes hold
32 e2m1 codes, the even element in the low nibble; its scale byte is E8M0, 2^(b - 127). One expert's
slice becomes MicroWeight(codes [N, K], scale [N, K/32] fp32, block 32); the model splits rows further
(gpt-oss interleaves gate/up rows).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from quantrt.errors import CheckpointError, ConfigError
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.weights import WEIGHT_ONLY, ActScheme, MicroWeight, e8m0_decode

MX_BLOCK = 32
SUFFIXES = ("blocks", "scales")  # checkpoint names are `<projection>_blocks`, `<projection>_scales`


def unpack_mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [..., G, 16] -> codes uint8 [..., G*32]; byte j of a block holds elements 2j (low), 2j+1 (high)."""
    return torch.stack([blocks & 0xF, blocks >> 4], dim=-1).reshape(*blocks.shape[:-2], -1)


def _matches(name: str, pattern: str) -> bool:
    """transformers' modules_to_not_convert rule: a regex from the start up to a module boundary, or a suffix."""
    return bool(re.match(rf"(?:{pattern})(?=\.|$)", name)) or name.endswith(pattern)


@register_format
class Mxfp4Format(QuantFormat):
    """Pre-quantized MXFP4 experts (weight-only: activations stay in the compute dtype)."""

    name = "mxfp4"

    def __init__(self, not_converted: tuple[str, ...] = ()):
        self.not_converted = not_converted
        self.loaded = 0  # expert matrices converted

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args=None) -> Mxfp4Format:
        skip = qcfg.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise ConfigError(f"mxfp4 quantization_config.modules_to_not_convert must be a list of module "
                              f"names, got {skip!r}")
        return cls(tuple(skip))

    def is_quantized(self, prefix: str) -> bool:
        """Expert projections only (`...experts.<proj>`), unless modules_to_not_convert names them."""
        return "experts" in prefix.split(".") and not any(_matches(prefix, p) for p in self.not_converted)

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset(SUFFIXES), frozenset()

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> MicroWeight:
        """One matrix: blocks [N, K/32, 16], scales [N, K/32] -> MicroWeight [N, K]."""
        n, k = shape
        blocks, scales = tensors["blocks"], tensors["scales"]
        self._check(prefix, blocks, scales, (n, k))
        self.loaded += 1
        return MicroWeight(unpack_mxfp4(blocks), e8m0_decode(scales), MX_BLOCK)

    def make_experts(self, prefix: str, blocks: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int, int]
                     ) -> list[MicroWeight]:
        """Fused over experts: blocks [E, N, K/32, 16], scales [E, N, K/32] -> E MicroWeights [N, K].
        prefix: the projection's checkpoint name without suffix (`...experts.gate_up_proj`)."""
        e, n, k = shape
        if blocks.dim() != 4 or blocks.shape[0] != e or scales.dim() != 3 or scales.shape[0] != e:
            raise CheckpointError(f"{prefix}_blocks {tuple(blocks.shape)} / {prefix}_scales {tuple(scales.shape)}: "
                                  f"expected [{e}, {n}, {k // MX_BLOCK}, 16] and [{e}, {n}, {k // MX_BLOCK}] "
                                  f"({e} experts)")
        return [self.make_weight(prefix, {"blocks": blocks[i], "scales": scales[i]}, (n, k)) for i in range(e)]

    @staticmethod
    def _check(prefix: str, blocks: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int]) -> None:
        n, k = shape
        if k % MX_BLOCK:
            raise CheckpointError(f"{prefix}: MXFP4 needs the input size {k} to be a multiple of {MX_BLOCK}")
        want_b, want_s = (n, k // MX_BLOCK, MX_BLOCK // 2), (n, k // MX_BLOCK)
        for t, suffix, want in ((blocks, "blocks", want_b), (scales, "scales", want_s)):
            if t.dtype != torch.uint8:
                raise CheckpointError(f"{prefix}_{suffix} has dtype {t.dtype}; MXFP4 {suffix} are uint8")
            if tuple(t.shape[-len(want):]) != want or t.dim() != len(want):
                raise CheckpointError(f"{prefix}_{suffix} has shape {tuple(t.shape)} per expert, expected {want} "
                                      f"(N={n} rows, K={k} inputs in blocks of {MX_BLOCK})")
        if bool((scales == 255).any()):
            raise CheckpointError(f"{prefix}_scales contains 0xFF, which is NaN in E8M0 (OCP MX spec)")

    def act_scheme(self, prefix: str) -> ActScheme:
        return WEIGHT_ONLY

    def finish_loading(self) -> None:
        if self.loaded == 0:
            raise CheckpointError("the checkpoint says quant_method mxfp4 but no MXFP4 expert tensors "
                                  "(`*_blocks` / `*_scales`) were loaded; quantrt reads MXFP4 experts of "
                                  "GptOssForCausalLM")

    def describe(self) -> str:
        return "mxfp4 (e2m1, e8m0 scales per 32; experts only)"
