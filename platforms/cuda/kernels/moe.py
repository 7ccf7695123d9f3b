"""`TritonMoEKernel`: fused MoE on CUDA/ROCm through Triton (`moe_triton`), one launch per projection.

Serves uniform expert layers of dense (bf16/fp16), fp8 (per-tensor, per-channel, block), grouped int
(2..8 bits, sym/asym, g >= 8 or per-channel: the moe_wna16 family) and fp4 (NVFP4, MXFP4: gpt-oss) weights. Weights are dequantized in
registers and multiplied in the compute dtype with fp32 accumulation. Row-wise quantized activations
(fp8/int8 per-token or per-token-group, W8A8 checkpoints) are quantized-dequantized first, as the
reference does, so the numerics match; the GEMM itself then runs at weight-only speed (no fp8 MMA).
Per-expert biases (gpt-oss) are added in the GEMM epilogue, and so is the gated activation (silu, or
gpt-oss's clamped SwiGLU): `prepare` interleaves the gate and up columns of every gate/up tensor (weights,
scales, zeros, biases) once, so each output tile holds both halves and the first launch writes the
activated [P, I] rows directly (fp32 only where the down projection quantizes its input per token).

Graph-safe (`graph_safe`): routing is sorted and aligned on device into worst-case padded buffers
(`moe_align`), both grids depend only on T, k and the shapes, blocks past the last expert's run exit on
a device-side -1, and nothing reads a device value on the host, so decode CUDA graphs capture it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrt.layers.moe.experts import uniform_acts
from quantrt.platforms.cuda.kernels._common import interpret_mode, triton_available
from quantrt.platforms.cuda.kernels.fp4 import SCALE_F32, pack_micro_weight
from quantrt.platforms.cuda.kernels.wna16 import pack_int_weight
from quantrt.quant.moe_kernel import MoEKernel, MoESpec, weight_scheme
from quantrt.quant.quantize import FP8_DTYPES, fake_quantize_act
from quantrt.quant.weights import ActKind, DenseWeight, FloatWeight, IntWeight, MicroWeight, ScaleGranularity

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

_ROWWISE = (ActKind.NONE, ActKind.DYNAMIC_TOKEN, ActKind.DYNAMIC_GROUP)
WKIND_DENSE, WKIND_FP8, WKIND_INT, WKIND_FP4 = 0, 1, 2, 3


def _proj_why(ws: list, what: str, inter: int) -> str:
    """'' when the weights of one fused GEMM (gate+up, or down) of every expert share a servable scheme."""
    schemes = {weight_scheme(w) for w in ws}
    if len(schemes) != 1:
        return f"experts' {what} weights mix schemes ({', '.join(sorted(schemes))})"
    w = ws[0]
    if isinstance(w, DenseWeight):
        return ""
    if isinstance(w, FloatWeight):
        if w.data.dtype not in FP8_DTYPES:
            return f"weight dtype {w.data.dtype} is not fp8"
        if w.granularity is ScaleGranularity.BLOCK and what == "gate/up" and inter % w.block[0]:
            return f"fp8 block {w.block} does not divide the intermediate size {inter} (gate/up fused)"
        return ""
    if isinstance(w, IntWeight):
        pack = 32 // (4 if w.bits <= 4 else 8)
        if w.offset is not None:
            return "float offset (GGUF K-quant min) is not supported"
        if w.g_idx is not None:
            return "act-order (g_idx) experts are not supported"
        if w.group_size % pack or w.shape[1] % pack:
            return f"group size {w.group_size} and K={w.shape[1]} must be multiples of {pack}"
        return ""
    if isinstance(w, MicroWeight):
        blocks = {x.block for x in ws}
        return "" if len(blocks) == 1 else f"experts' {what} weights mix fp4 blocks {sorted(blocks)}"
    return f"{type(w).__name__} experts are not served (dense, fp8, int and fp4 only)"


def _why_not(spec: MoESpec) -> str:
    """'' when the experts are a scheme this kernel computes, else the reason."""
    kinds = {type(w) for ex in spec.experts for w in ex}
    if len(kinds) != 1:
        return f"experts mix weight types ({', '.join(sorted(k.__name__ for k in kinds))})"
    why = uniform_acts(spec)
    if why:
        return why
    if not {a.kind for ex in spec.acts for a in ex} <= set(_ROWWISE):
        return f"activation scheme {'/'.join(sorted(spec.act_schemes()))}: only weight-only or per-token(-group)"
    return (_proj_why([w for g, u, _ in spec.experts for w in (g, u)], "gate/up", spec.inter)
            or _proj_why([d for _, _, d in spec.experts], "down", spec.inter))


def _container(w: IntWeight) -> int:
    return 4 if w.bits <= 4 else 8


def _stack_int(parts: list[tuple[IntWeight, ...]], device: torch.device) -> tuple[tuple[torch.Tensor, ...], float]:
    """Per expert the weights of one GEMM ((gate, up) or (down,)) -> ((packed [E, K/PACK, N], scale [E, G, N][,
    zero [E, G, N]]), the zero point every code shares when there is no zero array), each expert's parts
    concatenated along N, in `pack_int_weight`'s compact form: 16-bit scales where every expert's are exact in one
    16-bit type, uint8 zero points, or none. Experts whose forms differ take the full form (fp32, 2**23 + z)."""
    packs = [[pack_int_weight(w, _container(w), None, compact=True) for w in ws] for ws in parts]
    consts = {(1 << (w.bits - 1)) if w.codes.dtype.is_signed else 0 for ws in parts for w in ws}
    zeros = {None if pk[2] is None else pk[2].dtype for ex in packs for pk in ex}
    if len(zeros) > 1 or None in zeros and len(consts) > 1:
        packs = [[pack_int_weight(w, _container(w), None) for w in ws] for ws in parts]
        zeros = {torch.float32}
    sdt = {pk[1].dtype for ex in packs for pk in ex}
    sdt = sdt.pop() if len(sdt) == 1 else torch.float32           # fp16 / bf16 / fp32 -> fp32 is exact
    out = [[torch.cat([pk[i].to(sdt) if i == 1 else pk[i] for pk in ex], dim=1) for i in range(3)
            if ex[0][i] is not None] for ex in packs]
    tensors = tuple(torch.stack(t).to(device).contiguous() for t in zip(*out))
    return tensors, float(consts.pop()) if None in zeros else 0.0


def _stack_fp4(parts: list[tuple[MicroWeight, ...]], device: torch.device) -> tuple[tuple[torch.Tensor, ...], int]:
    """Per expert the fp4 weights of one GEMM -> ((packed [E, K/8, N], scale [E, K/B, N], global [E, N]),
    scale kind): one-byte scales when every weight packs to the same kind, else fp32 for all."""
    packs = [[pack_micro_weight(w) for w in ws] for ws in parts]
    kinds = {pk[2] for ex in packs for pk in ex}
    if len(kinds) > 1:
        packs = [[(pk[0], w.scale.to(torch.float32).t().contiguous(), SCALE_F32,
                   float(w.global_scale) if w.global_scale is not None else 1.0) for pk, w in zip(ex, ws)]
                 for ex, ws in zip(packs, parts)]
    out = []
    for ex in packs:
        out.append((torch.cat([pk[0] for pk in ex], dim=1), torch.cat([pk[1] for pk in ex], dim=1),
                    torch.cat([torch.full((pk[0].shape[1],), pk[3], dtype=torch.float32) for pk in ex])))
    kind = packs[0][0][2]
    return tuple(torch.stack(t).to(device).contiguous() for t in zip(*out)), kind


def _interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Gate rows then up rows along `dim` ([.., 2I, ..]) -> (g0, u0, g1, u1, ...) along `dim`."""
    n = t.shape[dim]
    perm = torch.arange(n, device=t.device).view(2, n // 2).t().reshape(-1)
    return t.index_select(dim, perm).contiguous()


def _interleave_w13(wkind: int, w13: tuple, block) -> tuple:
    """The gate/up GEMM's tensors with interleaved gate/up columns (the fused-activation layout).
    dense / fp8: [E, 2I, K] (fp8 channel scales [E, 2I]; block scales stay: the kernel maps rows);
    int / fp4: packed, scales, zeros or globals all [E, .., 2I]."""
    if wkind == WKIND_DENSE:
        return (_interleave(w13[0], 1),)
    if wkind == WKIND_FP8:
        return _interleave(w13[0], 1), (w13[1] if block is not None else _interleave(w13[1], 1))
    return tuple(_interleave(t, t.dim() - 1) for t in w13)


def _fp8_scale(w: FloatWeight) -> torch.Tensor:
    """Channel scales [N] (tensor expanded) or block scales [N/bn, K/bk], fp32."""
    s = w.scale.to(torch.float32)
    if w.granularity is ScaleGranularity.TENSOR:
        return s.reshape(1).expand(w.shape[0])
    return s


class TritonMoEKernel(MoEKernel):
    """Dense / fp8 / grouped-int experts, tokens sorted by expert, one Triton launch per projection."""

    name = "triton_moe"
    graph_safe = True

    def __init__(self, spec: MoESpec, wkind: int, w13: tuple, w2: tuple) -> None:
        """w13 / w2: (tensors, fp8 block or None, int container bits[, int zero point without a zero array]) of
        the gate+up and down GEMMs, gate and up concatenated; stored with interleaved gate/up columns (the fused
        activation reads pairs)."""
        block = w13[1] if wkind == WKIND_FP8 else None
        w13 = (_interleave_w13(wkind, w13[0], block), *w13[1:])
        self.wkind, self.w13, self.w2 = wkind, w13, w2   # not the spec: its canonical experts are repacked
        self.hidden, self.inter, self.num_experts, self.compute_dtype = (spec.hidden, spec.inter, spec.num_experts,
                                                                         spec.compute_dtype)
        self.act_in, self.act_down = spec.acts[0][0], spec.acts[0][2]
        self.activation = spec.activation                         # silu or ("swiglu_clamped", alpha, limit)
        b13, self.b2 = spec.biases(w13[0][0].device)              # fp32 [E, 2I], [E, H], or None
        self.b13 = None if b13 is None else _interleave(b13, 1)   # [E, 2I] (g0, u0, g1, u1, ...)

    @classmethod
    def can_implement(cls, spec: MoESpec, platform: Platform) -> tuple[bool, str]:
        why = _why_not(spec)
        if why:
            return False, why
        if not triton_available():
            return False, "triton is not installed (pip install triton)"
        if platform.device_type != "cuda" and not (interpret_mode() and platform.is_cpu):
            return False, f"platform {platform.name} is not a CUDA/ROCm device"
        if spec.compute_dtype not in (torch.float16, torch.bfloat16):
            return False, f"compute dtype {spec.compute_dtype} is not float16/bfloat16"
        return True, ""

    @classmethod
    def prepare(cls, spec: MoESpec, platform: Platform) -> TritonMoEKernel:
        dt = spec.compute_dtype
        dev = platform.device()
        ex = spec.experts
        w0 = ex[0][0]
        if isinstance(w0, DenseWeight):
            w13 = torch.stack([torch.cat([g.data, u.data]) for g, u, _ in ex]).to(dev, dt).contiguous()
            w2 = torch.stack([d.data for _, _, d in ex]).to(dev, dt).contiguous()
            return cls(spec, WKIND_DENSE, ((w13,), None, 16), ((w2,), None, 16))
        if isinstance(w0, FloatWeight):
            def blk(w: FloatWeight) -> tuple[int, int] | None:
                return w.block if w.granularity is ScaleGranularity.BLOCK else None

            w13 = (torch.stack([torch.cat([g.data, u.data]) for g, u, _ in ex]).to(dev).contiguous(),
                   torch.stack([torch.cat([_fp8_scale(g), _fp8_scale(u)]) for g, u, _ in ex]).to(dev).contiguous())
            w2 = (torch.stack([d.data for _, _, d in ex]).to(dev).contiguous(),
                  torch.stack([_fp8_scale(d) for _, _, d in ex]).to(dev).contiguous())
            return cls(spec, WKIND_FP8, (w13, blk(w0), 8), (w2, blk(ex[0][2]), 8))
        if isinstance(w0, MicroWeight):
            (w13, k13), (w2, k2) = (_stack_fp4([(g, u) for g, u, _ in ex], dev),
                                    _stack_fp4([(d,) for _, _, d in ex], dev))
            return cls(spec, WKIND_FP4, (w13, (w0.block, k13), 4), (w2, (ex[0][2].block, k2), 4))
        assert isinstance(w0, IntWeight)
        w13, z13 = _stack_int([(g, u) for g, u, _ in ex], dev)
        w2, z2 = _stack_int([(d,) for _, _, d in ex], dev)
        return cls(spec, WKIND_INT, (w13, None, _container(w0), z13), (w2, None, _container(ex[0][2]), z2))

    def _gemm(self, a: torch.Tensor, proj: tuple, n: int, sorted_ids, expert_ids, p: int, a_div: int,
              topk_weights: torch.Tensor | None, cfg, bias: torch.Tensor | None, act: str | tuple = "",
              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from quantrt.platforms.cuda.kernels.moe_triton import moe_gemm

        w, block, bits = proj[:3]
        zero_const = proj[3] if len(proj) > 3 else 0.0      # int without a zero array: the one zero point
        scale = w[1] if len(w) > 1 else None
        zero = w[2] if len(w) > 2 else None
        fp4 = (16, 0)
        if self.wkind == WKIND_FP4:  # block holds (micro block, scale kind)
            fp4, block = block, None
        return moe_gemm(a, w[0], sorted_ids, expert_ids, n, p, a_div, self.wkind, scale, zero, block, bits,
                        topk_weights, out_dtype, cfg, fp4, bias, act, proj is self.w13, zero_const)

    def config(self, pairs: int):
        """The launch configuration for `pairs` = T * k routed rows (a function of the shape only)."""
        from quantrt.platforms.cuda.kernels.moe_triton import MoeConfig

        return MoeConfig() if pairs <= 16 * self.num_experts else MoeConfig(64, 128, 64, 4, 3)

    def apply(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; weights, ids: [T, k] -> [T, H]
        from quantrt.platforms.cuda.kernels.moe_triton import moe_align

        t, k = ids.shape
        h, i = self.hidden, self.inter
        p = t * k
        dt = self.compute_dtype
        cfg = self.config(p)
        sorted_ids, expert_ids = moe_align(ids, self.num_experts, cfg.block_m)
        xa = x if self.act_in.kind is ActKind.NONE else fake_quantize_act(x, self.act_in)
        quant_down = self.act_down.kind is not ActKind.NONE   # per-token quantized down input: keep fp32
        hh = self._gemm(xa.to(dt), self.w13, 2 * i, sorted_ids, expert_ids, p, k, None, cfg, self.b13,
                        self.activation, torch.float32 if quant_down else dt)                # [P, I] activated
        if quant_down:
            hh = fake_quantize_act(hh, self.act_down)
        y = self._gemm(hh.to(dt), self.w2, h, sorted_ids, expert_ids, p, 1,
                       weights.reshape(-1).to(torch.float32).contiguous(), cfg, self.b2)        # [P, H] fp32
        return y.view(t, k, h).sum(1).to(dt)
