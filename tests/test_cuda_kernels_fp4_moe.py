"""Triton NVFP4/MXFP4 linears and the fused MoE kernel vs float64 / reference computations.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, tiny shapes, CI);
on the GPU machine `-m accelerator` adds real shapes run natively. Paged decode attention:
tests/test_cuda_paged_attention.py.
"""

from __future__ import annotations

import pytest
import torch

from quantrt.errors import CheckpointError
from quantrt.platforms.cuda.kernels.fp4 import (
    SCALE_E4M3,
    SCALE_E8M0,
    SCALE_F32,
    TritonFp4Kernel,
    pack_micro_weight,
)
from quantrt.platforms.cuda.platform import CudaPlatform
from quantrt.quant.kernel import LinearSpec
from quantrt.quant.kernels.reference import ReferenceLinearKernel
from quantrt.quant.weights import ActKind, ActScheme, MicroWeight
from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM

pytestmark = NEEDS_TRITON


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return float((y.double() - ref.double()).norm() / ref.double().norm())


# -- NVFP4 / MXFP4 ---------------------------------------------------------------------------------
def make_micro_weight(n: int, k: int, kind: str, gen: torch.Generator) -> MicroWeight:
    """Random fp4 weight: nvfp4 (e4m3 block-16 scales + global scale, the modelopt layout), nvfp4_folded
    (compressed-tensors: e4m3 / global folded into fp32 scales), mxfp4 (e8m0 block-32), f32 (arbitrary)."""
    codes = torch.randint(0, 16, (n, k), generator=gen).to(torch.uint8)
    if kind == "mxfp4":
        scale = torch.exp2(torch.randint(-8, 2, (n, k // 32), generator=gen).float())
        return MicroWeight(codes.to(DEV), scale.to(DEV), 32)
    e4m3 = (torch.rand(n, k // 16, generator=gen) * 400 + 1).to(torch.float8_e4m3fn).float()
    if kind == "nvfp4":
        return MicroWeight(codes.to(DEV), e4m3.to(DEV), 16, torch.tensor(3e-4).to(DEV))
    if kind == "nvfp4_folded":
        return MicroWeight(codes.to(DEV), (e4m3 / torch.tensor(2800.0)).to(DEV), 16)
    return MicroWeight(codes.to(DEV), (torch.rand(n, k // 16, generator=gen) * 0.1 + 1e-3).to(DEV), 16)


def test_fp4_packing_picks_exact_scale_bytes():
    gen = torch.Generator().manual_seed(0)
    for kind, want in (("mxfp4", SCALE_E8M0), ("nvfp4", SCALE_E4M3), ("nvfp4_folded", SCALE_E4M3),
                       ("f32", SCALE_F32)):
        w = make_micro_weight(8, 64, kind, gen)
        packed, scale, skind, post = pack_micro_weight(w)
        assert skind == want, kind
        assert packed.shape == (8, 8) and packed.dtype == torch.int32
        assert scale.shape == (64 // w.block, 8)
        # independent decode of the packed form equals the canonical dequantization
        words = packed.t().to(torch.int64) & 0xFFFFFFFF                 # [N, K/8]
        codes = torch.stack([(words >> (4 * i)) & 15 for i in range(8)], -1).reshape(8, 64)
        assert torch.equal(codes.to(torch.uint8), w.codes)
        if skind == SCALE_E8M0:
            s = torch.exp2(scale.t().double() - 127)
        elif skind == SCALE_E4M3:
            s = scale.t().view(torch.float8_e4m3fn).double()
        else:
            s = scale.t().double()
        ref = w.scale.double() * (float(w.global_scale) if w.global_scale is not None else 1.0)
        assert torch.allclose(s * post, ref, rtol=1e-6, atol=0)


FP4_CASES = ["nvfp4", "nvfp4_folded", "mxfp4", "f32"]


@pytest.mark.parametrize("kind", FP4_CASES)
@pytest.mark.parametrize("m", [1, 5, 64])
def test_fp4_matches_reference(kind, m):
    gen = torch.Generator().manual_seed(m + len(kind))
    w = make_micro_weight(48, 256, kind, gen)
    dtype = torch.float16 if m == 5 else torch.bfloat16
    spec = LinearSpec(w, ActScheme(), dtype)
    ok, why = TritonFp4Kernel.can_implement(spec, PLATFORM)
    assert ok, why
    kern = TritonFp4Kernel.prepare(spec, PLATFORM)
    x = torch.randn(m, 256, generator=gen).to(DEV, dtype)
    b = torch.randn(48, generator=gen).to(DEV, dtype) if m == 5 else None
    y = kern.apply(x, b)
    ref = x.double() @ w.dequantize(torch.float64).t() + (b.double() if b is not None else 0)
    assert y.shape == (m, 48) and y.dtype == dtype
    assert rel_err(y, ref) < 1e-2
    assert rel_err(y, ReferenceLinearKernel.prepare(spec, PLATFORM).apply(x, b)) < 1e-2


def test_fp4_split_k_counters_reset():
    from quantrt.platforms.cuda.kernels.fp4_triton import Fp4Config, fp4_matmul

    gen = torch.Generator().manual_seed(3)
    w = make_micro_weight(32, 512, "nvfp4", gen)
    packed, scale, skind, post = pack_micro_weight(w)
    ref = None
    for m, cfg in ((1, Fp4Config(1, 16, 64, 4)), (3, Fp4Config(16, 16, 64, 2)),
                   (5, Fp4Config(16, 16, 128, 2, swap=True))):
        x = torch.randn(m, 512, generator=gen).to(DEV, torch.float16)
        ref = x.double() @ w.dequantize(torch.float64).t()
        for _ in range(2):  # the second call reuses the counters the first one reset
            assert rel_err(fp4_matmul(x, packed, scale, 16, skind, post, cfg), ref) < 2e-3


def test_fp4_rejections():
    gen = torch.Generator().manual_seed(1)
    w = make_micro_weight(16, 64, "nvfp4", gen)
    ok, why = TritonFp4Kernel.can_implement(
        LinearSpec(w, ActScheme(ActKind.DYNAMIC_TOKEN, torch.float8_e4m3fn), torch.bfloat16), PLATFORM)
    assert not ok and "weight-only" in why
    ok, why = TritonFp4Kernel.can_implement(LinearSpec(w, ActScheme(), torch.float32), PLATFORM)
    assert not ok and "float32" in why


def test_fp4_kernel_registered():
    from quantrt.platforms.cuda.kernels import CUDA_LINEAR_KERNELS

    assert TritonFp4Kernel in CUDA_LINEAR_KERNELS
    w = make_micro_weight(16, 64, "mxfp4", torch.Generator().manual_seed(2))
    from quantrt.quant.kernel import select_linear_kernel

    assert select_linear_kernel(LinearSpec(w, ActScheme(), torch.bfloat16), PLATFORM).kernel is TritonFp4Kernel


@pytest.mark.accelerator
@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m", [2, 9, 16])
def test_fp4_swap_native(kind, m):
    """The swapped-operand tl.dot path (y^T = W^T x^T) vs the reference kernel."""
    from quantrt.platforms.cuda.kernels.fp4_triton import Fp4Config, fp4_matmul

    gen = torch.Generator().manual_seed(m)
    w = make_micro_weight(4096, 4096, kind, gen)
    spec = LinearSpec(w, ActScheme(), torch.bfloat16)
    packed, scale, skind, post = pack_micro_weight(w)
    x = torch.randn(m, 4096, generator=gen).to(DEV, torch.bfloat16)
    for cfg in (Fp4Config(16, 64, 256, 0, 4, 3, 4, True), Fp4Config(16, 128, 128, 0, 8, 3, 4, True)):
        y = fp4_matmul(x, packed, scale, w.block, skind, post, cfg)
        assert rel_err(y, ReferenceLinearKernel.prepare(spec, PLATFORM).apply(x, None)) < 1e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("kind", FP4_CASES)
@pytest.mark.parametrize("m", [1, 7, 16, 64, 200])
def test_fp4_native(kind, m):
    gen = torch.Generator().manual_seed(m)
    w = make_micro_weight(4096, 4096, kind, gen)
    spec = LinearSpec(w, ActScheme(), torch.bfloat16)
    kern = TritonFp4Kernel.prepare(spec, PLATFORM)
    x = torch.randn(m, 4096, generator=gen).to(DEV, torch.bfloat16)
    assert rel_err(kern.apply(x, None), ReferenceLinearKernel.prepare(spec, PLATFORM).apply(x, None)) < 1e-2


# -- fused MoE ---------------------------------------------------------------------------------------
def _moe_platform():
    """The interpreter runs on CPU tensors: a CPU platform there, the CUDA platform on the GPU."""
    from quantrt.platform.interface import Platform

    return Platform() if DEV == "cpu" else CudaPlatform()


def make_experts(scheme: str, e: int, h: int, i: int, gen: torch.Generator):
    """E experts of (gate [I, H], up [I, H], down [H, I]) in one canonical scheme, with their ActSchemes."""
    from quantrt.quant.quantize import quantize_fp8
    from quantrt.quant.weights import DenseWeight, IntWeight

    def one(n: int, k: int):
        w = torch.randn(n, k, generator=gen) * 0.2
        if scheme == "dense":
            return DenseWeight(w.to(DEV, torch.bfloat16))
        if scheme in ("nvfp4", "mxfp4"):
            return make_micro_weight(n, k, scheme, gen)
        if scheme.startswith("fp8"):
            gran = scheme.split("-")[1]
            blk = (128, 128) if min(n, k) >= 512 else (32, 32)
            fw = quantize_fp8(w, gran, blk if gran == "block" else None)
            return type(fw)(fw.data.to(DEV), fw.scale.to(DEV), fw.granularity, fw.block)
        bits, group, asym = {"int4-g32-asym": (4, 32, True), "int8-channel": (8, k, False),
                             "int4-g64": (4, 64, False)}[scheme]
        g = k // group
        scale = (torch.rand(n, g, generator=gen) * 0.02 + 0.005).to(DEV)
        if scheme == "int4-g64":        # fp16-valued, as GPTQ / AWQ store them: the 16-bit scale path
            scale = scale.half().float()
        if asym:
            codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
            zero = torch.randint(0, 2**bits, (n, g), generator=gen).to(torch.int32).to(DEV)
            return IntWeight(codes.to(DEV), scale, bits, group, zero=zero)
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=gen).to(torch.int8)
        return IntWeight(codes.to(DEV), scale, bits, group)

    experts = tuple((one(i, h), one(i, h), one(h, i)) for _ in range(e))
    act = ActScheme(ActKind.DYNAMIC_TOKEN, torch.float8_e4m3fn) if scheme == "fp8-channel-w8a8" else ActScheme()
    return experts, tuple((act, act, act) for _ in range(e))


def moe_float64(x, weights, ids, experts, clamp: tuple[float, float] | None = None, biases=None):
    """Independent float64 computation of the routed experts (weight-only schemes). clamp: (alpha, limit)
    of gpt-oss's clamped SwiGLU (else silu); biases: (gate [E, I], up [E, I], down [E, H]) or None."""
    import torch.nn.functional as F

    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g, u, d = (w.dequantize(torch.float64) for w in experts[e])
            bg, bu, bd = (b[e].double() for b in biases) if biases is not None else (0.0, 0.0, 0.0)
            xt = x[t].double()
            a, b = g @ xt + bg, u @ xt + bu
            if clamp is None:
                hid = F.silu(a) * b
            else:
                alpha, limit = clamp
                a, b = torch.minimum(a, torch.tensor(limit)), b.clamp(-limit, limit)
                hid = (b + 1) * a / (1 + torch.exp(-alpha * a))
            out[t] += float(weights[t, j]) * (d @ hid + bd)
    return out


MOE_SCHEMES = ["dense", "fp8-tensor", "fp8-channel", "fp8-block", "int4-g32-asym", "int8-channel", "int4-g64",
               "nvfp4", "mxfp4", "fp8-channel-w8a8"]


@pytest.mark.parametrize("scheme", MOE_SCHEMES)
def test_fused_moe_matches_reference(scheme):
    from quantrt.layers.moe.experts import ReferenceMoEKernel
    from quantrt.platforms.cuda.kernels.moe import TritonMoEKernel
    from quantrt.quant.moe_kernel import MoESpec

    gen = torch.Generator().manual_seed(len(scheme))
    e, h, i, t, k = 4, 128, 64, 4, 2
    experts, acts = make_experts(scheme.removesuffix("-w8a8"), e, h, i, gen)
    if scheme.endswith("w8a8"):
        acts = make_experts(scheme, 1, h, i, gen)[1] * e
    spec = MoESpec(experts, acts, h, i, torch.bfloat16)
    plat = _moe_platform()
    ok, why = TritonMoEKernel.can_implement(spec, plat)
    assert ok, why
    kern = TritonMoEKernel.prepare(spec, plat)
    x = torch.randn(t, h, generator=gen).to(DEV, torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(DEV)
    ids[0] = torch.tensor([3, 1])  # expert 2 (and maybe others) gets no token: empty groups are skipped
    weights = torch.rand(t, k, generator=gen).to(DEV)
    y = kern.apply(x, weights, ids)
    assert y.shape == (t, h) and y.dtype == torch.bfloat16
    ref = ReferenceMoEKernel.prepare(spec, plat).apply(x, weights, ids)
    assert rel_err(y, ref) < 2e-2
    if not scheme.endswith("w8a8"):
        assert rel_err(y, moe_float64(x, weights, ids, experts)) < 2e-2


@pytest.mark.parametrize("scheme", ["dense", "mxfp4", "int4-g32-asym"])
def test_fused_moe_biases_and_clamped_swiglu_match_float64(scheme):
    """gpt-oss experts: per-expert gate/up/down biases (added in the GEMM epilogue) and the clamped SwiGLU
    (limit small enough that both clamps fire) vs an independent float64 computation; the reference
    MoE kernel too."""
    from quantrt.layers.moe.experts import ReferenceMoEKernel
    from quantrt.platforms.cuda.kernels.moe import TritonMoEKernel
    from quantrt.quant.moe_kernel import MoESpec

    gen = torch.Generator().manual_seed(7)
    e, h, i, t, k, alpha, limit = 4, 128, 64, 5, 2, 1.702, 1.5
    experts, acts = make_experts(scheme, e, h, i, gen)
    biases = tuple((torch.randn(e, n, generator=gen) * 0.5).to(DEV) for n in (i, i, h))
    spec = MoESpec(experts, acts, h, i, torch.bfloat16, ("swiglu_clamped", alpha, limit), *biases)
    plat = _moe_platform()
    assert TritonMoEKernel.can_implement(spec, plat) == (True, "")
    kern = TritonMoEKernel.prepare(spec, plat)
    x = (torch.randn(t, h, generator=gen) * 2).to(DEV, torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(DEV)
    weights = torch.rand(t, k, generator=gen).to(DEV)
    g0 = experts[int(ids[0, 0])][0].dequantize(torch.float64) @ x[0].double()
    assert (g0 > limit).any() and (g0 < limit).any()                         # the clamp matters here
    ref64 = moe_float64(x, weights, ids, experts, (alpha, limit), biases)
    assert rel_err(kern.apply(x, weights, ids), ref64) < 2e-2
    assert rel_err(ReferenceMoEKernel.prepare(spec, plat).apply(x, weights, ids), ref64) < 1e-2
    plain = moe_float64(x, weights, ids, experts)                            # silu, no biases: far off
    assert rel_err(kern.apply(x, weights, ids), plain) > 0.2


def _faked_rocm(arch: str, monkeypatch):
    from quantrt.platforms.rocm.platform import RocmPlatform

    monkeypatch.delenv("SGLANG_USE_AITER", raising=False)
    monkeypatch.delenv("QUANTRT_USE_AITER", raising=False)
    plat = RocmPlatform(arch=arch)
    if DEV == "cpu":
        monkeypatch.setattr(plat, "device", lambda index=0: torch.device("cpu"))
    return plat


def test_rocm_selects_the_shared_triton_fp4_linear_and_fused_moe(monkeypatch):
    """Faked ROCm (MI300 gfx942, MI350 gfx950), aiter off: MXFP4 linears and fused MoE (gpt-oss's biases and
    clamped SwiGLU included) select the shared plain-Triton kernels and compute like float64; fp8 experts on
    the fnuz arch are declined with the reason."""
    from quantrt.platforms.rocm.shared_triton import RocmTritonFp4Kernel, RocmTritonMoEKernel
    from quantrt.quant.kernel import select_linear_kernel
    from quantrt.quant.moe_kernel import MoESpec, select_moe_kernel

    gen = torch.Generator().manual_seed(11)
    mi300, mi350 = _faked_rocm("gfx942", monkeypatch), _faked_rocm("gfx950", monkeypatch)
    w = make_micro_weight(96, 128, "mxfp4", gen)
    lspec = LinearSpec(w, ActScheme(), torch.bfloat16)
    choice = select_linear_kernel(lspec, mi300)
    assert choice.kernel is RocmTritonFp4Kernel, choice.explain()
    x = torch.randn(3, 128, generator=gen).to(DEV, torch.bfloat16)
    y = choice.kernel.prepare(lspec, mi300).apply(x, None)
    assert rel_err(y, x.double() @ w.dequantize(torch.float64).t()) < 1e-2

    e, h, i, t, k = 4, 128, 64, 5, 2
    experts, acts = make_experts("mxfp4", e, h, i, gen)
    biases = tuple((torch.randn(e, n, generator=gen) * 0.5).to(DEV) for n in (i, i, h))
    spec = MoESpec(experts, acts, h, i, torch.bfloat16, ("swiglu_clamped", 1.702, 7.0), *biases)
    mc = select_moe_kernel(spec, mi300)
    assert mc.kernel is RocmTritonMoEKernel and "aiter is off" in mc.explain(), mc.explain()
    x = (torch.randn(t, h, generator=gen) * 2).to(DEV, torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(DEV)
    weights = torch.rand(t, k, generator=gen).to(DEV)
    got = mc.kernel.prepare(spec, mi300).apply(x, weights, ids)
    assert rel_err(got, moe_float64(x, weights, ids, experts, (1.702, 7.0), biases)) < 2e-2

    fp8, fp8_acts = make_experts("fp8-channel", e, h, i, gen)
    fspec = MoESpec(fp8, fp8_acts, h, i, torch.bfloat16)
    ok, why = RocmTritonMoEKernel.can_implement(fspec, mi300)
    assert not ok and why.startswith("fp8 experts on gfx942") and "e4m3fnuz" in why
    assert select_moe_kernel(fspec, mi350).kernel is RocmTritonMoEKernel


def test_moe_kernels_without_bias_support_decline_biased_experts():
    """aiter's fused_moe and the NPU MoE path (emulated) take no expert biases: they decline with the reason."""
    from quantrt.platforms.ascend.emulation import EmulatedAscendPlatform
    from quantrt.platforms.ascend.moe_kernels import NpuGroupedMoEKernel
    from quantrt.platforms.rocm.aiter_moe import AiterFusedMoEKernel
    from quantrt.platforms.rocm.emulation import EmulatedRocmPlatform
    from quantrt.quant.moe_kernel import MoESpec

    gen = torch.Generator().manual_seed(5)
    experts, acts = make_experts("dense", 2, 64, 32, gen)
    plain = MoESpec(experts, acts, 64, 32, torch.bfloat16)
    biased = MoESpec(experts, acts, 64, 32, torch.bfloat16, down_bias=torch.zeros(2, 64))
    mi300 = EmulatedRocmPlatform()
    assert AiterFusedMoEKernel.can_implement(plain, mi300) == (True, "")
    assert AiterFusedMoEKernel.can_implement(biased, mi300) == (False, "per-expert biases: aiter fused_moe takes "
                                                                       "no expert biases")
    assert NpuGroupedMoEKernel.can_implement(biased, EmulatedAscendPlatform()) == (
        False, "per-expert biases: the NPU MoE path takes no expert biases")


def test_moe_align_blocks():
    from quantrt.platforms.cuda.kernels.moe_triton import moe_align

    ids = torch.tensor([[2, 0], [2, 5], [0, 2]])
    sorted_ids, expert_ids = moe_align(ids, 6, 4)
    p = ids.numel()
    # P = 6 pairs bound the blocks: 3 used, 3 padding blocks (expert -1, skipped)
    assert expert_ids.tolist() == [0, 2, 5, -1, -1, -1] and sorted_ids.numel() == 24
    blocks = sorted_ids.view(6, 4).tolist()
    assert blocks[:3] == [[1, 4, p, p], [0, 2, 5, p], [3, p, p, p]] and blocks[3:] == [[p] * 4] * 3


def test_moe_rejections_and_registration():
    from quantrt.platforms.cuda.kernels.moe import TritonMoEKernel
    from quantrt.quant.moe_kernel import MoESpec
    from quantrt.quant.weights import IntWeight

    gen = torch.Generator().manual_seed(0)
    experts, acts = make_experts("int4-g32-asym", 2, 64, 32, gen)
    plat = _moe_platform()
    with pytest.raises(CheckpointError, match=r"MoE activation 'gelu': expected \"silu\" or \(\"swiglu_clamped\""):
        MoESpec(experts, acts, 64, 32, torch.bfloat16, "gelu")
    with pytest.raises(CheckpointError, match=r"MoE down_bias: shape \(2, 32\), expected \(2, 64\)"):
        MoESpec(experts, acts, 64, 32, torch.bfloat16, down_bias=torch.zeros(2, 32))
    ok, why = TritonMoEKernel.can_implement(MoESpec(experts, acts, 64, 32, torch.float32), plat)
    assert not ok and "float32" in why
    g, u, d = experts[0]
    ao = IntWeight(g.codes, g.scale, 4, 32, zero=g.zero, g_idx=(torch.arange(64) // 32).to(torch.int32).to(DEV))
    ok, why = TritonMoEKernel.can_implement(MoESpec(((ao, u, d), experts[1]), acts, 64, 32, torch.bfloat16), plat)
    assert not ok and "mix schemes" in why
    st = ActScheme(ActKind.STATIC_TENSOR, torch.float8_e4m3fn, scale=torch.tensor(0.1))
    fp8, _ = make_experts("fp8-tensor", 2, 64, 32, gen)
    ok, why = TritonMoEKernel.can_implement(MoESpec(fp8, ((st, st, st),) * 2, 64, 32, torch.bfloat16), plat)
    assert not ok and "per-token" in why
    assert TritonMoEKernel in PLATFORM.moe_kernels()


@pytest.mark.accelerator
@pytest.mark.parametrize("scheme", MOE_SCHEMES)
@pytest.mark.parametrize("t", [1, 16, 256])
def test_fused_moe_native(scheme, t):
    """Qwen3-30B-A3B-like expert shapes (hidden 2048, intermediate 768, top 8) with 16 experts."""
    from quantrt.layers.moe.experts import ReferenceMoEKernel
    from quantrt.platforms.cuda.kernels.moe import TritonMoEKernel
    from quantrt.quant.moe_kernel import MoESpec

    gen = torch.Generator().manual_seed(t)
    e, h, i, k = 16, 2048, 768, 8
    experts, acts = make_experts(scheme.removesuffix("-w8a8"), e, h, i, gen)
    if scheme.endswith("w8a8"):
        acts = make_experts(scheme, 1, h, i, gen)[1] * e
    spec = MoESpec(experts, acts, h, i, torch.bfloat16)
    kern = TritonMoEKernel.prepare(spec, CudaPlatform())
    x = torch.randn(t, h, generator=gen).to(DEV, torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(DEV)
    weights = torch.rand(t, k, generator=gen).to(DEV)
    ref = ReferenceMoEKernel.prepare(spec, CudaPlatform()).apply(x, weights, ids)
    assert rel_err(kern.apply(x, weights, ids), ref) < 2e-2
