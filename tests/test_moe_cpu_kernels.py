"""Quantized experts: the MoE kernel interface and selection, and the CPU MoE kernels against a float64
computation on the dequantized weights (weight-only) or the reference kernel (quantized activations)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantrt.layers.moe.experts import GroupedMoEKernel, ReferenceMoEKernel
from quantrt.layers.moe.routing import RoutingConfig, select_experts
from quantrt.platforms.xpu.cpu_moe_dequant import CpuMoEDequantKernel
from quantrt.platforms.xpu.cpu_moe_kernels import CpuMoEInt4PackedKernel, CpuMoEInt8PackedKernel
from quantrt.platforms.xpu.cpu_platform import CpuPlatform
from quantrt.quant.moe_kernel import MoESpec, select_moe_kernel
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import WEIGHT_ONLY, ActKind, ActScheme, DenseWeight, IntWeight

E, H, I, K = 8, 256, 128, 2  # noqa: E741  (experts, hidden, intermediate, top-k)
CPU = CpuPlatform()


def _int(w: torch.Tensor, bits: int, group: int, sym: bool, g_idx: bool = False) -> IntWeight:
    """RTN: w [N, K] -> IntWeight (signed codes when sym, uint8 codes + zero otherwise)."""
    n, k = w.shape
    wg = w.view(n, k // group, group)
    if sym:
        s = wg.abs().amax(-1) / (2 ** (bits - 1) - 1)
        q = (wg / s[..., None]).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return IntWeight(q.view(n, k).to(torch.int8), s, bits, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = (hi - lo) / (2 ** bits - 1)
    z = (-lo / s).round()
    q = (wg / s[..., None] + z[..., None]).round().clamp(0, 2 ** bits - 1)
    gi = None
    if g_idx:  # act-order: a permuted group assignment with the same codes/scales semantics
        gi = torch.randperm(k).remainder(k // group).to(torch.int32)
        full_s, full_z = s[:, gi.long()], z[:, gi.long()]
        q = (w / full_s + full_z).round().clamp(0, 2 ** bits - 1)
        return IntWeight(q.to(torch.uint8), s, bits, group, zero=z.to(torch.int32), g_idx=gi)
    return IntWeight(q.view(n, k).to(torch.uint8), s, bits, group, zero=z.to(torch.int32))


def _experts(make, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(E):
        ws = [torch.randn(I, H, generator=g) * 0.05, torch.randn(I, H, generator=g) * 0.05,
              torch.randn(H, I, generator=g) * 0.05]
        out.append(tuple(make(w) for w in ws))
    return tuple(out)


def _spec(experts, act=WEIGHT_ONLY, dtype=torch.float32) -> MoESpec:
    return MoESpec(experts, tuple((act, act, act) for _ in experts), H, I, dtype)


def _float64(spec: MoESpec, x, weights, ids) -> torch.Tensor:
    """The definition, in float64 on the dequantized weights, one (token, slot) at a time."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g, u, d = (w.dequantize(torch.float64) if not isinstance(w, DenseWeight) else w.data.double()
                       for w in spec.experts[e])
            bg, bu, bd = ((b[e].double() if b is not None else 0.0)
                          for b in (spec.gate_bias, spec.up_bias, spec.down_bias))
            xt = x[t].double()
            a, b = g @ xt + bg, u @ xt + bu
            if spec.activation == "silu":
                h = F.silu(a) * b
            else:  # gpt-oss: gate clamped above, up clamped both ways, (up + 1) * gate * sigmoid(alpha gate)
                _, alpha, limit = spec.activation
                a, b = a.clamp(max=limit), b.clamp(-limit, limit)
                h = (b + 1) * a * torch.sigmoid(alpha * a)
            out[t] += weights[t, j].double() * (d @ h + bd)
    return out


def _routing(tokens: int, seed: int = 1):
    torch.manual_seed(seed)
    x = torch.randn(tokens, H)
    w, ids = select_experts(torch.randn(tokens, E), RoutingConfig(E, K))
    return x, w, ids


WEIGHT_ONLY_CASES = {
    "fp8-tensor": lambda w: quantize_fp8(w, "tensor"),
    "fp8-channel": lambda w: quantize_fp8(w, "channel"),
    "fp8-block": lambda w: quantize_fp8(w, "block", (128, 128)),
    "fp8e5m2-channel": lambda w: quantize_fp8(w, "channel", dtype=torch.float8_e5m2),
    "int4-g64-sym": lambda w: _int(w, 4, 64, True),
    "int4-g32-asym": lambda w: _int(w, 4, 32, False),
    "int4-g128-asym": lambda w: _int(w, 4, 128, False),          # down: K = I = 128, one group per row
    "int4-g32-actorder": lambda w: _int(w, 4, 32, False, g_idx=True),
    "int8-channel-sym": lambda w: _int(w, 8, w.shape[1], True),
    "int8-g32-asym": lambda w: _int(w, 8, 32, False),
    "int3-g32-sym": lambda w: _int(w, 3, 32, True),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_ONLY_CASES))
def test_dequant_kernel_matches_float64(case, tokens=13):
    spec = _spec(_experts(WEIGHT_ONLY_CASES[case]))
    ok, why = CpuMoEDequantKernel.can_implement(spec, CPU)
    assert ok, why
    x, w, ids = _routing(tokens)
    want = _float64(spec, x, w, ids)
    got = CpuMoEDequantKernel.prepare(spec, CPU).apply(x, w, ids)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    ref = ReferenceMoEKernel.prepare(spec, CPU).apply(x, w, ids)
    torch.testing.assert_close(ref.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["int4-g32-actorder", "int8-g32-asym", "fp8-block", "fp8-channel"])
def test_dequant_kernel_tiles_match_float64(monkeypatch, case):
    """Small tiles: several per projection, gate/up parts with their own act-order permutation, fp8 block
    tiles aligned to the 128-row scale blocks."""
    import quantrt.platforms.xpu.cpu_moe_dequant as mod

    monkeypatch.setattr(mod, "TILE_BYTES", 4 * H * 40)                  # 40 rows of K = H fp32
    spec = _spec(_experts(WEIGHT_ONLY_CASES[case]))
    k = CpuMoEDequantKernel.prepare(spec, CPU)
    assert len(k.w13.tiles) >= 2 and k.w13.rows * H * 4 <= max(4 * H * 40, 4 * H * 128)
    if case.startswith("int"):                                             # no tile crosses gate | up
        assert {p for *_, p in k.w13.tiles} == {0, 1} and all(n1 <= (p + 1) * I for _, n1, p in k.w13.tiles)
    x, w, ids = _routing(40)
    torch.testing.assert_close(k.apply(x, w, ids).double(), _float64(spec, x, w, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["int4-g64-sym", "int4-g32-asym", "int4-g128-asym", "int4-g32-actorder"])
def test_int4_packed_kernel_bf16_matches_float64(case):
    spec = _spec(_experts(WEIGHT_ONLY_CASES[case]), dtype=torch.bfloat16)
    ok, why = CpuMoEInt4PackedKernel.can_implement(spec, CPU)
    assert ok, why
    x, w, ids = _routing(9)
    got = CpuMoEInt4PackedKernel.prepare(spec, CPU).apply(x.bfloat16(), w, ids)
    want = _float64(spec, x.bfloat16().float(), w, ids)
    assert got.dtype == torch.bfloat16
    err = (got.double() - want).norm() / want.norm()
    assert err < 1e-2, f"relative error {err:.2e}"        # bf16 activations and scales inside the op


@pytest.mark.parametrize("tokens", [11, 120])    # 120: > PACK_MAX_ROWS rows per expert (fp32 dequant path)
def test_int8_w8a8_runs_the_dequant_kernel_and_weight_only_bf16_the_packed_op(tokens):
    experts = _experts(WEIGHT_ONLY_CASES["int8-channel-sym"])
    act = ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8)
    spec = _spec(experts, act)
    ok, why = CpuMoEInt8PackedKernel.can_implement(spec, CPU)
    assert not ok and "int8 W8A8 runs cpu_moe_dequant" in why
    assert select_moe_kernel(spec, CPU).kernel is CpuMoEDequantKernel
    x, w, ids = _routing(tokens)
    got = CpuMoEDequantKernel.prepare(spec, CPU).apply(x, w, ids)
    ref = ReferenceMoEKernel.prepare(spec, CPU).apply(x, w, ids)
    # int8 codes as exact fp32 integers, scales on the output: the reference up to summation order
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    bf = _spec(experts, dtype=torch.bfloat16)
    assert CpuMoEInt8PackedKernel.can_implement(bf, CPU) == (True, "")
    got = CpuMoEInt8PackedKernel.prepare(bf, CPU).apply(x.bfloat16(), w, ids)
    want = _float64(bf, x.bfloat16().float(), w, ids)
    assert (got.double() - want).norm() / want.norm() < 1e-2


@pytest.mark.parametrize("act", [
    ActScheme(ActKind.DYNAMIC_TOKEN, torch.float8_e4m3fn),
    ActScheme(ActKind.DYNAMIC_GROUP, torch.float8_e4m3fn, group=128),
    ActScheme(ActKind.DYNAMIC_TENSOR, torch.float8_e4m3fn),
    ActScheme(ActKind.STATIC_TENSOR, torch.float8_e4m3fn, scale=torch.tensor(0.02)),
], ids=str)
def test_dequant_kernel_fp8_activations_match_the_reference(act):
    spec = _spec(_experts(WEIGHT_ONLY_CASES["fp8-block"]), act)
    x, w, ids = _routing(17)
    got = CpuMoEDequantKernel.prepare(spec, CPU).apply(x, w, ids)
    ref = ReferenceMoEKernel.prepare(spec, CPU).apply(x, w, ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    dq = _float64(spec, x, w, ids)          # and the activation quantization really happened
    assert (ref.double() - dq).abs().max() > 1e-4


BIAS_CASES = [  # (kernel, weight case, activation scheme, compute dtype, relative tolerance)
    (CpuMoEDequantKernel, "int4-g32-asym", WEIGHT_ONLY, torch.float32, 1e-5),
    (CpuMoEDequantKernel, "fp8-block", WEIGHT_ONLY, torch.float32, 1e-5),
    (CpuMoEInt4PackedKernel, "int4-g64-sym", WEIGHT_ONLY, torch.bfloat16, 1e-2),
    (CpuMoEInt8PackedKernel, "int8-channel-sym", WEIGHT_ONLY, torch.bfloat16, 1e-2),
    (CpuMoEDequantKernel, "int8-channel-sym", ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8), torch.float32, 1e-2),
    (GroupedMoEKernel, "dense", WEIGHT_ONLY, torch.float32, 1e-5),
    (ReferenceMoEKernel, "int4-g32-asym", WEIGHT_ONLY, torch.float32, 1e-5),
]


@pytest.mark.parametrize("kernel, case, act, dtype, tol", BIAS_CASES,
                         ids=[f"{k.name}-{c}-{a}-{str(d)[6:]}" for k, c, a, d, _ in BIAS_CASES])
def test_cpu_moe_kernels_honour_biases_and_clamped_swiglu(kernel, case, act, dtype, tol):
    """gpt-oss-style experts (per-expert gate/up/down biases, clamped SwiGLU with a limit low enough that
    both clamps fire) on every CPU MoE kernel vs the float64 definition."""
    make = DenseWeight if case == "dense" else WEIGHT_ONLY_CASES[case]
    experts = _experts(make)
    g = torch.Generator().manual_seed(3)
    biases = [torch.randn(E, n, generator=g) * 0.3 for n in (I, I, H)]
    spec = MoESpec(experts, tuple((act, act, act) for _ in experts), H, I, dtype, ("swiglu_clamped", 1.702, 0.3),
                   *biases)
    assert kernel.can_implement(spec, CPU) == (True, "")
    x, w, ids = _routing(11)
    x = (x * 3).to(dtype)
    want = _float64(spec, x.float(), w, ids)
    got = kernel.prepare(spec, CPU).apply(x, w, ids)
    err = float((got.double() - want).norm() / want.norm())
    if act.kind is ActKind.NONE:
        assert err < tol, f"relative error {err:.2e}"
    else:  # int8 activations: equal to the reference, which fake-quantizes the same way
        torch.testing.assert_close(got, ReferenceMoEKernel.prepare(spec, CPU).apply(x, w, ids), atol=1e-5, rtol=1e-4)
        assert err < 5e-2
    plain = _float64(_spec(experts, act, dtype), x.float(), w, ids)          # silu without biases: far off
    assert float((got.double() - plain).norm() / plain.norm()) > 0.2
    gate = torch.stack([experts[int(e)][0].dequantize(torch.float64) @ x[0].double() for e in ids[0]])
    assert (gate + biases[0][ids[0]].double() > 0.3).any()                  # the gate clamp fires


def test_moe_spec_rejects_bad_activation_and_bias_shapes():
    experts = _experts(DenseWeight)
    acts = tuple((WEIGHT_ONLY,) * 3 for _ in experts)
    with pytest.raises(Exception, match=r"MoE activation \('swiglu_clamped', 1.7\): expected"):
        MoESpec(experts, acts, H, I, torch.float32, ("swiglu_clamped", 1.7))
    with pytest.raises(Exception, match=rf"MoE gate_bias: shape \({E}, {H}\), expected \({E}, {I}\)"):
        MoESpec(experts, acts, H, I, torch.float32, gate_bias=torch.zeros(E, H))


def test_selection_explains_every_rejection():
    spec = _spec(_experts(WEIGHT_ONLY_CASES["int4-g32-asym"]))          # fp32 compute
    choice = select_moe_kernel(spec, CPU)
    assert choice.kernel is CpuMoEDequantKernel
    why = choice.explain()
    assert "cpu_moe_int4_packed: compute dtype float32" in why and "cpu_moe_int8_packed: needs symmetric" in why
    bf = _spec(_experts(WEIGHT_ONLY_CASES["int4-g32-asym"]), dtype=torch.bfloat16)
    assert select_moe_kernel(bf, CPU).kernel is CpuMoEInt4PackedKernel
    dense = _spec(_experts(DenseWeight))
    assert select_moe_kernel(dense, CPU).kernel is GroupedMoEKernel
    assert "moe_kernels" in CPU.describe() and CPU.describe()["moe_kernels"][-1] == "reference"


def test_mixed_expert_schemes_fall_back_to_the_reference_with_reasons(caplog):
    ex = list(_experts(WEIGHT_ONLY_CASES["fp8-channel"]))
    ex[3] = _experts(WEIGHT_ONLY_CASES["int4-g32-asym"])[3]
    spec = _spec(tuple(ex))
    with caplog.at_level("WARNING"):
        choice = select_moe_kernel(spec, CPU)
    assert choice.kernel is ReferenceMoEKernel
    assert "cpu_moe_dequant: experts are fp8-channel/int4-g32-asym" in choice.explain()
    assert "grouped: serves dense experts only" in choice.explain()
    assert "no fast MoE kernel" in caplog.text
    x, w, ids = _routing(5)
    torch.testing.assert_close(ReferenceMoEKernel.prepare(spec, CPU).apply(x, w, ids).double(),
                               _float64(spec, x, w, ids), atol=2e-5, rtol=1e-4)


def test_moe_spec_rejects_wrong_expert_shapes():
    from quantrt.errors import CheckpointError

    ex = list(_experts(DenseWeight))
    ex[2] = (ex[2][0], DenseWeight(torch.zeros(I, H + 1)), ex[2][2])
    with pytest.raises(CheckpointError, match=r"expert 2 up: weight shape \(128, 257\), expected \(128, 256\)"):
        _spec(tuple(ex))


# == format MoE paths: tiny Qwen3-MoE / Mixtral checkpoints vs transformers on the dequantized weights ==


# -- MXFP4 (gpt-oss experts) --------------------------------------------------------------------------------
def _mxfp4_spec(dtype=torch.float32, biased=True, zero_exp=False) -> MoESpec:
    from quantrt.quant.formats.mxfp4 import quantize_mxfp4
    from quantrt.quant.weights import MicroWeight

    experts = _experts(quantize_mxfp4)
    if zero_exp:  # one block per expert scaled by e8m0 byte 0 (2^-127: an fp32 subnormal)
        experts = tuple((MicroWeight(g.codes, g.scale.clone().index_put_((torch.tensor([1]), torch.tensor([2])),
                                                                          torch.tensor(2.0 ** -127)), 32), u, d)
                        for g, u, d in experts)
    g = torch.Generator().manual_seed(5)
    biases = [torch.randn(E, n, generator=g) * 0.3 for n in (I, I, H)] if biased else [None] * 3
    return MoESpec(experts, tuple((WEIGHT_ONLY,) * 3 for _ in experts), H, I, dtype,
                   ("swiglu_clamped", 1.702, 0.3) if biased else "silu", *biases)


def test_mxfp4_tiles_dequantize_bit_exactly():
    """A tile of the kernel's dequantization (codes two per byte, e8m0 bytes, fp16 bit patterns) times 2^14
    equals MicroWeight.dequantize (e2m1 table x decoded scales), bit for bit, e8m0 byte 0 included."""
    from quantrt.platforms.xpu.cpu_moe_mxfp4 import E2M1_FACTOR, CpuMoEMxfp4Kernel, half_block_order

    spec = _mxfp4_spec(zero_exp=True)
    k = CpuMoEMxfp4Kernel.prepare(spec, CPU)
    assert k.w13.codes.dtype == torch.uint8 and k.w13.codes.shape == (E, 2 * I, H // 2)     # 4 bits per weight
    assert k.w13.exps.dtype == torch.uint8 and k.w13.zero_exp
    for e in (0, 5):
        g, u, d = spec.experts[e]
        want = torch.cat([g.dequantize(torch.float64), u.dequantize(torch.float64)])
        got = torch.cat([k.w13.dequant(e, n0, n1).double() for n0, n1, _ in k.w13.tiles]) * E2M1_FACTOR
        assert torch.equal(got, want[:, half_block_order(H)])                 # tile columns: block halves
        assert torch.equal(k.w2.dequant(e, 0, H).double() * E2M1_FACTOR, d.dequantize(torch.float64)[:, half_block_order(I)])
    assert want[1, 2 * 32:3 * 32].abs().max() < 1e-37 and want[1, 2 * 32:3 * 32].abs().max() > 0


@pytest.mark.parametrize("dtype, biased", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)])
def test_mxfp4_kernel_matches_float64(dtype, biased):
    """gpt-oss experts (MXFP4, per-expert biases, clamped SwiGLU whose clamps fire) vs the float64 definition;
    selected on the CPU for MXFP4 experts."""
    spec = _mxfp4_spec(dtype, biased)
    choice = select_moe_kernel(spec, CPU)
    assert choice.kernel.name == "cpu_moe_mxfp4", choice.explain()
    x, w, ids = _routing(21)
    x = (x * 3).to(dtype)
    got = choice.kernel.prepare(spec, CPU).apply(x, w, ids)
    want = _float64(spec, x.float(), w, ids)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    else:  # fp32 math, only the output rounded to bf16
        torch.testing.assert_close(got.double(), want.bfloat16().double(), atol=1e-2, rtol=1e-2)


def test_mxfp4_kernel_declines_nvfp4_and_non_power_of_two_scales():
    from quantrt.platforms.xpu.cpu_moe_mxfp4 import CpuMoEMxfp4Kernel
    from quantrt.quant.weights import MicroWeight

    spec = _mxfp4_spec(biased=False)
    nv = tuple(tuple(MicroWeight(w.codes, w.scale.repeat_interleave(2, 1), 16, torch.tensor(0.5)) for w in ex)
               for ex in spec.experts)
    ok, why = CpuMoEMxfp4Kernel.can_implement(_spec(nv), CPU)
    assert not ok and "NVFP4 not served" in why
    odd = tuple(tuple(MicroWeight(w.codes, w.scale * 1.5, 32) for w in ex) for ex in spec.experts)
    ok, why = CpuMoEMxfp4Kernel.can_implement(_spec(odd), CPU)
    assert not ok and "not all powers of two" in why
    choice = select_moe_kernel(_spec(odd), CPU)
    assert choice.kernel is ReferenceMoEKernel and "cpu_moe_mxfp4: MXFP4 block scales" in choice.explain()
    fp8 = _spec(_experts(WEIGHT_ONLY_CASES["fp8-channel"]))
    assert CpuMoEMxfp4Kernel.can_implement(fp8, CPU) == (False, "experts are fp8-channel, not all MicroWeight")


def test_dequant_kernel_fp8_blocks_that_do_not_divide_the_shape():
    """hidden 192 with 128x128 blocks: the down projection's last row block and gate/up's last column block
    are partial (the ragged tail of a tile is scaled on its own)."""
    h = 192
    g = torch.Generator().manual_seed(7)
    experts = tuple(tuple(quantize_fp8(torch.randn(*shape, generator=g) * 0.05, "block", (128, 128))
                          for shape in ((I, h), (I, h), (h, I))) for _ in range(E))
    spec = MoESpec(experts, tuple((WEIGHT_ONLY,) * 3 for _ in experts), h, I, torch.float32)
    k = CpuMoEDequantKernel.prepare(spec, CPU)
    assert k.w2.rows == h and h % 128                                  # one tile, 64-row partial block
    torch.manual_seed(2)
    x = torch.randn(9, h)
    w, ids = select_experts(torch.randn(9, E), RoutingConfig(E, K))
    torch.testing.assert_close(k.apply(x, w, ids).double(), _float64(spec, x, w, ids), atol=2e-5, rtol=1e-4)
