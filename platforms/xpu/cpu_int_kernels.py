"""CPU kernels for integer weights (IntWeight): torch's packed int4 / int8 CPU ops.

`CpuInt4PackedKernel` — `aten._weight_int4pack_mm_for_cpu`, which computes w = (q − 8)·s + z per group
(q in 0..15, scales_and_zeros [K/G, N, 2], G ∈ {32, 64, 128, 256}). Every IntWeight with bits ≤ 4
maps onto it exactly in real arithmetic:
  - integer zero point:  z = (8 − zero)·s          (AWQ, GPTQ v1/v2, Q4_0, asym RTN)
  - float offset:        z = 8·s + offset           (GGUF Q4_1, Q4_K, Q2_K sub-block mins)
  - signed codes:        q + 8, z = 0               (symmetric int4 / int3 / int2, Q3_K)
  - unsigned, no zero:   z = 8·s
Larger groups (per-channel, G=512 …) are split into the largest supported group that divides them;
act-order (g_idx) weights are permuted along K once here (x is gathered per call); G=16 (Q2_K/Q3_K
sub-blocks) has no mapping and falls back (below).

Symmetric per-channel int8 (bnb int8, GPTQ 8-bit sym, our formats emit signed codes for it) is
served by `cpu_kernels.CpuInt8WeightOnlyKernel` (`aten._weight_int8pack_mm`), every other IntWeight
grid (bits 5-7, grouped int8 such as GGUF Q8_0/Q5_K/Q6_K, G=16 sub-blocks of Q2_K/Q3_K) by
`cpu_kernels.CpuIntEmulatedKernel` (dequantized once to fp32, packed sgemm: dense speed, no memory
saving); CodebookWeight by `CpuCodebookDequantKernel` here.

Precision: the op takes bf16 activations and bf16 scales (fp32 activations exist but are 10-30x slower,
reference/CPU.md). Rounding fp32 activations to bf16 around the op was tried and measured: on SmolLM2
Q4_1 prompt logprobs moved by up to 0.13 from the fp32 dequantized path (test_smollm2 demands 5e-4),
so the kernel serves only bf16/fp16 compute (`--dtype bfloat16`); with the CPU default fp32 an int4
weight runs dequantized once in fp32 (exact, dense speed). Scales/zeros rounded to bf16 cost at most
1/64 of a quantization step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrt.quant.kernel import LinearKernel, LinearSpec
from quantrt.quant.weights import ActKind, CodebookWeight, IntWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

INT4_GROUPS = (256, 128, 64, 32)
_COMPUTE = (torch.float32, torch.bfloat16, torch.float16)


def _int4_group(w: IntWeight) -> int | None:
    """The op's group size that represents `w` exactly (a divisor of w.group_size), or None."""
    return next((g for g in INT4_GROUPS if w.group_size % g == 0), None)


def _act_order(w: IntWeight) -> torch.Tensor | None:
    """perm [K] so that g_idx[perm] is sorted with exactly group_size members per group; None if
    g_idx is absent or trivial. Raises ValueError when the groups are not equal-sized."""
    if w.g_idx is None:
        return None
    g = w.g_idx.long()
    perm = torch.argsort(g, stable=True)
    if torch.equal(perm, torch.arange(g.numel())):
        return None
    counts = torch.bincount(g, minlength=w.shape[1] // w.group_size)
    if not bool((counts == w.group_size).all()):
        raise ValueError("g_idx groups are not all of group_size members")
    return perm


def _common_checks(spec: LinearSpec, kinds: tuple[type, ...] = (IntWeight,)) -> str:
    w = spec.weight
    if not isinstance(w, kinds):
        return f"weight is {type(w).__name__}, not {'/'.join(k.__name__ for k in kinds)}"
    if spec.act.kind is not ActKind.NONE:
        return f"activations are quantized ({spec.act}); this kernel is weight-only"
    if spec.compute_dtype not in _COMPUTE:
        return f"compute dtype {spec.compute_dtype} is not float32/bfloat16/float16"
    if w.codes.device.type != "cpu":  # type: ignore[union-attr]
        return f"weight is on {w.codes.device.type}, not cpu"
    return ""


class CpuInt4PackedKernel(LinearKernel):
    """IntWeight with bits ≤ 4 through torch's packed int4 CPU GEMM (bf16 inside)."""

    name = "cpu_int4_packed"

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor, group: int, n: int,
                 perm: torch.Tensor | None, out_dtype: torch.dtype):
        self.packed, self.sz, self.group, self.n = packed, sz, group, n
        self.perm, self.out_dtype = perm, out_dtype

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        why = _common_checks(spec)
        if why:
            return False, why
        w: IntWeight = spec.weight  # type: ignore[assignment]
        if spec.compute_dtype == torch.float32:
            return False, ("compute dtype float32: the op rounds activations to bf16 (logprobs move by "
                           "~0.1 on SmolLM2), so fp32 keeps the exact dequantized path; use --dtype bfloat16")
        if w.bits > 4:
            return False, f"{w.bits}-bit codes do not fit the int4 grid"
        if _int4_group(w) is None:
            return False, f"group size {w.group_size} is not a multiple of 32 (op supports {INT4_GROUPS})"
        if w.shape[1] % 2 or w.shape[0] % 16:
            return False, f"shape {w.shape}: the int4 pack needs even K and N divisible by 16"
        try:
            _act_order(w)
        except ValueError as e:
            return False, str(e)
        return True, ""

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> CpuInt4PackedKernel:
        w: IntWeight = spec.weight  # type: ignore[assignment]
        n, k = w.shape
        group = _int4_group(w)
        assert group is not None
        s = w.scale.to(torch.float32)                                            # [N, K/G]
        q = w.codes.to(torch.int32)                                              # [N, K]
        if w.zero is not None:
            z = (8 - w.zero.to(torch.float32)) * s
        elif w.offset is not None:
            z = 8 * s + w.offset.to(torch.float32)
        elif w.codes.dtype == torch.int8:
            q, z = q + 8, torch.zeros_like(s)
        else:
            z = 8 * s
        perm = _act_order(w)
        if perm is not None:   # sort K by group: column j of the new layout is old column perm[j]
            q = q[:, perm]
            gs = w.g_idx.long()[perm]                                            # [K] sorted groups
            s, z = s[:, gs[::w.group_size]], z[:, gs[::w.group_size]]
        rep = w.group_size // group
        s, z = s.repeat_interleave(rep, 1), z.repeat_interleave(rep, 1)          # [N, K/group]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)  # [N, K/2] u8
        sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()  # [K/group, N, 2]
        return cls(packed, sz, group, n, perm, spec.compute_dtype)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # decode runs this ~120 times a step: no-op casts/reshapes are skipped (each is a dispatcher call)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])                  # [M, K]
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.sz)
        if self.out_dtype != torch.bfloat16:
            y = y.to(self.out_dtype)                                             # [M, N]
        if bias is not None:
            y = y + bias.to(self.out_dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.n)


class CpuCodebookDequantKernel(LinearKernel):
    """CodebookWeight (GGUF IQ4_NL, bitsandbytes nf4/fp4: non-uniform grids no packed op holds):
    dequantized once, dense GEMM per call (fp32 compute: oneDNN packed sgemm; bf16/fp16: F.linear in
    that dtype). Same speed as the float model, no memory saving."""

    name = "cpu_codebook_dequant_once"

    def __init__(self, gemm, out_dtype: torch.dtype):
        self.gemm, self.out_dtype = gemm, out_dtype

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        why = _common_checks(spec, (CodebookWeight,))
        return (not why), why

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> CpuCodebookDequantKernel:
        from quantrt.platforms.xpu.cpu_kernels import PackedGemm

        if spec.compute_dtype == torch.float32:
            return cls(PackedGemm(spec.weight.dequantize(torch.float32).contiguous()), torch.float32)
        w = spec.weight.dequantize(torch.float32).to(spec.compute_dtype).contiguous()
        return cls(lambda x, b: torch.nn.functional.linear(x, w, b), spec.compute_dtype)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b = bias.to(self.out_dtype) if bias is not None else None
        return self.gemm(x.to(self.out_dtype), b)


CPU_INT_KERNELS: list[type[LinearKernel]] = [CpuInt4PackedKernel, CpuCodebookDequantKernel]
