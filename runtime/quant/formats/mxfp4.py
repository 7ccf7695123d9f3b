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

Online (`--quantization mxfp4` on a bf16/fp32 checkpoint, SGLang's Mxfp4DynamicQuantMoEMethod): the dense
experts are quantized at load time by the OCP MX v1.0 rule: per 32 inputs, scale 2^(floor(log2 amax) - 2)
(emax of e2m1 is 2), elements rounded to the nearest e2m1 value with ties to the even code, |v| > 6
saturating to 6. Other linears stay dense.
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


# e2m1 rounding boundaries between neighbouring magnitudes (0, .5, 1, 1.5, 2, 3, 4, 6); a value exactly on a
# boundary goes to the even code: up at 0.75, 1.75, 3.5 (to 1, 2, 4), down at 0.25, 1.25, 2.5, 5.
_UP_TIES, _DOWN_TIES = (0.75, 1.75, 3.5), (0.25, 1.25, 2.5, 5.0)


def quantize_mxfp4(w: torch.Tensor) -> MicroWeight:
    """Round-to-nearest MXFP4 of w [N, K] (K a multiple of 32) by the OCP MX rule above."""
    n, k = w.shape
    v = w.to(torch.float32).reshape(n, k // MX_BLOCK, MX_BLOCK)
    amax = v.abs().amax(-1)                                                   # [N, G]
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127.0))
    e = e.clamp(-127, 127)
    m = (v / torch.exp2(e)[..., None]).abs()                                  # exact: a power-of-two scale
    idx = sum((m >= b).to(torch.uint8) for b in _UP_TIES) + sum((m > b).to(torch.uint8) for b in _DOWN_TIES)
    codes = idx + 8 * (v < 0).to(torch.uint8)                                 # bit 3: sign
    return MicroWeight(codes.reshape(n, k), torch.exp2(e), MX_BLOCK)


def _matches(name: str, pattern: str) -> bool:
    """transformers' modules_to_not_convert rule: a regex from the start up to a module boundary, or a suffix."""
    return bool(re.match(rf"(?:{pattern})(?=\.|$)", name)) or name.endswith(pattern)


@register_format
class Mxfp4Format(QuantFormat):
    """Pre-quantized MXFP4 experts (weight-only: activations stay in the compute dtype)."""

    name = "mxfp4"

    online = True

    def __init__(self, not_converted: tuple[str, ...] = (), quantize_dense: bool = False):
        self.not_converted = not_converted
        self.quantize_dense = quantize_dense  # online: dense experts quantized at load time
        self.loaded = 0  # expert matrices converted

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args=None) -> Mxfp4Format:
        """{} -> online (quantize a float checkpoint's experts); else the checkpoint's quantization_config."""
        if not qcfg:
            return cls(quantize_dense=True)
        skip = qcfg.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise ConfigError(f"mxfp4 quantization_config.modules_to_not_convert must be a list of module "
                              f"names, got {skip!r}")
        return cls(tuple(skip))

    def is_quantized(self, prefix: str) -> bool:
        """Expert projections only (`...experts.<proj>`), unless modules_to_not_convert names them."""
        return "experts" in prefix.split(".") and not any(_matches(prefix, p) for p in self.not_converted)

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        """`blocks` + `scales` (stored as `<proj>_blocks`, `<proj>_scales`); online: the dense `weight`."""
        return frozenset({"weight"} if self.quantize_dense else SUFFIXES), frozenset()

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> MicroWeight:
        """One matrix: blocks [N, K/32, 16], scales [N, K/32] -> MicroWeight [N, K]."""
        n, k = shape
        blocks, scales = tensors["blocks"], tensors["scales"]
        self._check(prefix, blocks, scales, (n, k))
        self.loaded += 1
        return MicroWeight(unpack_mxfp4(blocks), e8m0_decode(scales), MX_BLOCK)

    def make_experts(self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int, int]
                     ) -> list[MicroWeight]:
        """Fused over experts -> E MicroWeights [N, K]: blocks [E, N, K/32, 16] + scales [E, N, K/32], or
        (online) weight [E, N, K] quantized here. prefix: the projection without suffix (`...experts.gate_up_proj`)."""
        e, n, k = shape
        if self.quantize_dense:
            w = tensors["weight"]
            if k % MX_BLOCK or tuple(w.shape) != shape or not w.dtype.is_floating_point:
                raise CheckpointError(f"{prefix}: online mxfp4 quantizes float [{e}, {n}, {k}] experts with K a "
                                      f"multiple of {MX_BLOCK}; got {w.dtype} {tuple(w.shape)}")
            self.loaded += e
            return [quantize_mxfp4(w[i]) for i in range(e)]
        blocks, scales = tensors["blocks"], tensors["scales"]
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
            if self.quantize_dense:
                raise CheckpointError("--quantization mxfp4 quantized no expert: online MXFP4 covers the "
                                      "experts of GptOssForCausalLM only")
            raise CheckpointError("the checkpoint says quant_method mxfp4 but no MXFP4 expert tensors "
                                  "(`*_blocks` / `*_scales`) were loaded; quantrt reads MXFP4 experts of "
                                  "GptOssForCausalLM")

    def describe(self) -> str:
        online = "online: experts quantized at load, " if self.quantize_dense else ""
        return f"mxfp4 ({online}e2m1, e8m0 scales per 32; experts only)"
