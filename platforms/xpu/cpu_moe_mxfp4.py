"""CPU MXFP4 MoE kernel (gpt-oss experts: MicroWeight, e2m1 codes, e8m0 scales per 32 inputs).

Experts stay fp4 in memory: two codes per byte (within each 32-block, byte j holds code j low and code
j + 16 high) plus the e8m0 scale bytes. Per active expert and tile (cpu_moe_dequant.Mats) the codes become
fp16 bit patterns with integer ops, the vectorized fp16->fp32 conversion gives e2m1 / 2^14 exactly, the
decoded block scales multiply the tile and 2^14 is applied to the output. The low nibbles fill the first
K/2 columns of the tile and the high nibbles the rest (contiguous writes, 3x faster than interleaving them
back per block), so the tile's columns are in the order `half_block_order(K)` and x is permuted to match:

    nibble s e e m, sign-extended from bits 4..7 of an int8 and shifted left by 5, masked with 0x8E00
    -> fp16 bits s 000 eem 000000000 = value * 2^-14 (e = 0 lands on fp16 subnormals with the same factor).

Biases and the clamped SwiGLU come from the MoESpec (SortedMoE); activations are weight-only (MXFP4 W4A16),
math in fp32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrt.platforms.xpu.cpu_moe_dequant import CpuMoEDequantKernel, Mats
from quantrt.platforms.xpu.cpu_moe_sorted import base_checks
from quantrt.quant.moe_kernel import MoESpec
from quantrt.quant.weights import MicroWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

MX = 32
E2M1_FACTOR = 2.0 ** 14      # e2m1 value / value of its fp16 bit pattern
_FP16_MASK = 0x8E00 - 0x10000  # keep the sign (bit 15) and e e m (bits 9..11), as int16


def half_block_order(k: int) -> torch.Tensor:
    """Column order of a dequantized tile: the first 16 columns of every 32-block, then the last 16."""
    c = torch.arange(k).view(k // MX, 2, MX // 2)
    return torch.cat([c[:, 0].flatten(), c[:, 1].flatten()])


def e8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    """fp32 powers of two 2^(b - 127) -> the e8m0 bytes b (uint8)."""
    b = torch.log2(scale.to(torch.float64)).round().to(torch.int64) + 127
    return b.clamp(0, 254).to(torch.uint8)


class Mxfp4Mats(Mats):
    """E experts' MicroWeights [N, K] (block 32, no global scale): packed codes [E, N, K/2] uint8, scale bytes
    [E, N, K/32] uint8."""

    def __init__(self, parts: list[list[MicroWeight]], tile_bytes: int | None = None):
        n, k = sum(w.shape[0] for w in parts[0]), parts[0][0].shape[1]
        super().__init__(n, k, [n], tile_bytes)
        self.g = k // MX
        c = torch.stack([torch.cat([w.codes for w in p]) for p in parts]).view(len(parts), n, self.g, 2, MX // 2)
        self.codes = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(len(parts), n, k // 2).contiguous()
        self.exps = torch.stack([torch.cat([e8m0_bytes(w.scale) for w in p]) for p in parts]).contiguous()
        self.zero_exp = bool((self.exps == 0).any())                       # 2^-127: fp32 subnormal
        self.perm = half_block_order(k).expand(len(parts), 1, k)           # same for every expert
        self.scratch(torch.uint8, k // 2)
        self.scratch(torch.int16)

    def scales(self, e: int, n0: int, n1: int) -> torch.Tensor:
        """Decoded block scales [n1-n0, K/32] fp32: the byte is the fp32 exponent field."""
        b = self.exps[e, n0:n1]
        s = (b.to(torch.int32) << 23).view(torch.float32)
        return torch.where(b == 0, 2.0 ** -127, s) if self.zero_exp else s

    def dequant(self, e: int, n0: int, n1: int) -> torch.Tensor:
        """Rows n0:n1 as fp32 / 2^14, columns in half_block_order."""
        r, w, h = n1 - n0, self.scratch(torch.float32)[:n1 - n0], self.scratch(torch.int16)[:n1 - n0]
        c, t, half = self.codes[e, n0:n1], self.scratch(torch.uint8, self.k // 2)[:r], self.k // 2
        h[:, :half].copy_(torch.bitwise_left_shift(c, 4, out=t).view(torch.int8))     # low codes -> bits 4..7
        h[:, half:].copy_(torch.bitwise_and(c, 0xF0, out=t).view(torch.int8))        # high codes, in place
        h.bitwise_left_shift_(5).bitwise_and_(_FP16_MASK)
        w.copy_(h.view(torch.float16))
        w.view(r, 2, self.g, MX // 2).mul_(self.scales(e, n0, n1)[:, None, :, None])
        return w

    def finish(self, yt: torch.Tensor, x: torch.Tensor, e: int, n0: int, n1: int) -> None:
        yt.mul_(E2M1_FACTOR)


class CpuMoEMxfp4Kernel(CpuMoEDequantKernel):
    name = "cpu_moe_mxfp4"

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        why = base_checks(spec, MicroWeight)
        if why:
            return False, why
        if any(w.block != MX or w.global_scale is not None for ex in spec.experts for w in ex):
            return False, "fp4 experts are not MXFP4 (block 32, e8m0 scales, no global scale): NVFP4 not served"
        if not all(bool((torch.frexp(w.scale).mantissa == 0.5).all()) for ex in spec.experts for w in ex):
            return False, "MXFP4 block scales are not all powers of two (e8m0)"
        if spec.act_schemes() != {"a16"}:
            return False, f"activations are quantized ({'/'.join(sorted(spec.act_schemes()))}); MXFP4 is weight-only"
        return True, ""

    @classmethod
    def prepare(cls, spec: MoESpec, platform: Platform) -> CpuMoEMxfp4Kernel:
        return cls(spec, Mxfp4Mats([[g, u] for g, u, _ in spec.experts]), Mxfp4Mats([[d] for _, _, d in spec.experts]))
