"""The W4A16 ring computing its own input (`ring_prologue`): residual add + RMSNorm before q/k/v and gate/up, act *
up before down, handed over as `quant.pending` rows instead of a launch of their own.

On the CPU (CI): the prologue's torch reference against the CUDA platform's own add + RMSNorm / act * up kernels
(Triton interpreter), the argument checks, that the kernel with each prologue compiles for sm_90 with the same
MMAs and no spills, and the decoder's hand-over (a CPU engine whose linears take the rows and materialize them
decodes the same tokens, bit for bit). Natively (`-m accelerator`): the ring with each prologue against the
ring on the reference's input, the residual it writes, and an int4 engine with and without the prologues.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

from quantrt.quant.pending import (  # noqa: E402
    ADD_RMS_NORM,
    GELU_MUL,
    NORM_PARTS,
    RESIDUAL_ADD,
    SILU_MUL,
    PendingActMul,
    PendingRows,
    SummedRows,
)
from tests._cuda_env import DEV  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.experimental.gluon") is None,
    reason="triton with Gluon (>= 3.5) is not installed")


def _rows(m: int, k: int, seed: int, dtype=torch.bfloat16, dev=DEV):
    gen = torch.Generator().manual_seed(seed)
    x, d = (torch.randn(m, k, generator=gen).to(dev, dtype) for _ in range(2))
    w = (torch.rand(k, generator=gen) + 0.5).to(dev, dtype)
    return x, d, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prologue_reference_is_the_platform_ops(dtype):
    """What the kernel's prologue computes (its torch reference) equals the CUDA platform's add + RMSNorm (s bit
    for bit, y to the last bit of 1 / rms) and act * up (bit for bit), which the unfused decode step runs."""
    from quantrt.platforms.cuda.kernels.ring_prologue import PRO_GELU, PRO_NORM, PRO_SILU, RingPrologue
    from quantrt.platforms.cuda.kernels.ring_prologue import prologue_reference as ref
    from quantrt.platforms.cuda.layer_ops import triton_act_mul, triton_add_rms_norm

    k = 256
    x, d, w = _rows(2, k, 1, dtype)
    y, s = triton_add_rms_norm(x, d, w, 1e-5)
    ry, rs = ref(x, RingPrologue(PRO_NORM, d, w, torch.empty_like(x), 1e-5), k)
    assert torch.equal(rs, s)
    torch.testing.assert_close(ry, y, atol=0, rtol=2 ** -7)
    assert (ry == y).float().mean().item() > 0.95
    gu = torch.cat(_rows(3, k, 2, dtype)[:2], dim=1)                                   # [3, 2K]
    for kind, gelu in ((PRO_SILU, False), (PRO_GELU, True)):
        got, none = ref(gu, RingPrologue(kind), k)
        assert none is None and torch.equal(got, triton_act_mul(gu, gelu))


def test_prologue_check_names_the_problem():
    from quantrt.platforms.cuda.kernels.ring_prologue import PRO_NORM, PRO_SILU, RingPrologue

    x, d, w = _rows(1, 256, 3, dev="cpu")
    RingPrologue(PRO_NORM, d, w, torch.empty_like(x), 1e-5).check(x, 256)
    with pytest.raises(ValueError, match=r"add \+ RMSNorm prologue needs .* got delta \(1, 128\)"):
        RingPrologue(PRO_NORM, d[:, :128], w, torch.empty_like(x), 1e-5).check(x, 256)
    with pytest.raises(ValueError, match=r"got weight \(\(256,\), torch.float32\)"):
        RingPrologue(PRO_NORM, d, w.float(), torch.empty_like(x), 1e-5).check(x, 256)
    with pytest.raises(ValueError, match=r"M <= 2; got M=3"):
        x3 = torch.zeros(3, 256, dtype=x.dtype)
        RingPrologue(PRO_NORM, x3, w, x3, 1e-5).check(x3, 256)
    with pytest.raises(ValueError, match=r"act \* mul prologue needs the merged gate_up output \[M <= 2, 512\], got "
                                         r"\(1, 256\)"):
        RingPrologue(PRO_SILU).check(x, 256)
    with pytest.raises(ValueError, match="unknown ring prologue kind 7"):
        RingPrologue(7).check(x, 256)


@pytest.mark.parametrize("pro,rows,res", [(1, 1, False), (2, 1, False), (2, 2, False), (3, 2, False), (4, 1, False),
                                          (4, 1, True), (2, 1, True), (0, 1, True)])
@pytest.mark.gluon_compile
def test_kernel_with_a_prologue_compiles_with_the_same_mmas(pro, rows, res):
    """Each prologue (and the residual epilogue) compiles for sm_90 (K 4096, as launched) with the plain kernel's
    MMAs and registers, no spills; the norms have their 1 / rms (rsqrt) and the activations their exp."""
    from tests._sm90 import ptxas_registers
    from tests.test_cuda_ring_wna16 import _compile_sm90

    tagged = rows <= 2
    ptx = _compile_sm90(128, 8, torch.bfloat16, False, split=9, tagged=tagged, pro=pro, rows=rows, x_vec=pro == 0,
                        div16=True, k=4096, res=res)
    plain = _compile_sm90(128, 8, torch.bfloat16, False, split=9, tagged=tagged)
    assert ptx.count("wgmma.mma_async") == plain.count("wgmma.mma_async") > 0
    assert "local" not in ptx
    assert ptxas_registers(ptx) == (128, 0)                   # the plain kernel's 127-128: four programs per SM
    assert ("rsqrt" in ptx) == (pro in (1, 4)) and ("ex2.approx" in ptx) == (pro in (2, 3))
    assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global")      # every activation read after the wait
    if res:   # the residual is read after the last MMA (in the last split's store)
        assert ptx.rindex("ld.global") > ptx.rindex("wgmma.mma_async")


def _cpu_engine(tiny_models):
    from quantrt.engine.engine import Engine
    from quantrt.platforms.xpu.cpu_platform import CpuPlatform

    return Engine(platform=CpuPlatform(), model_path=str(tiny_models["llama"][0]), dtype="bfloat16",
                  max_total_tokens=256, page_size=4, random_seed=0)


def _greedy(eng):
    outs = eng.generate(input_ids=[[5, 17, 99, 3, 42], [7] * 9], return_logprob=True,
                        sampling_params={"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    return [o["output_ids"] for o in outs], [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]
                                             for o in outs]


@pytest.mark.parametrize("summed", [False, True])
def test_decoder_hands_the_norms_and_act_mul_to_linears_that_take_them(tiny_models, monkeypatch, summed):
    """A CPU engine whose linears say they take pending rows (and materialize them) decodes the same tokens and
    logprobs, bit for bit, as one whose norms and act * mul run themselves; each layer hands over two norms and
    one act * mul per step, and the residual each norm leaves for later is the one the linear wrote. `summed`: the
    o and down projections also add the residual themselves (RESIDUAL_ADD, with partial sums of squares), and
    the norms after them are handed over as RMSNorm-from-partials (NORM_PARTS)."""
    ref = _greedy(_cpu_engine(tiny_models))
    eng = _cpu_engine(tiny_models)
    layers = eng.model.model.layers
    kinds: dict[str, int] = {}
    cls = type(layers[0].self_attn.qkv_proj.kernels[0])
    assert all(type(lin.kernels[0]) is cls for lin in (layers[0].mlp.gate_up_proj, layers[0].mlp.down_proj))
    apply = cls.apply
    taken = {ADD_RMS_NORM, SILU_MUL} | ({RESIDUAL_ADD, NORM_PARTS} if summed else set())

    def count(kind):
        kinds[kind] = kinds.get(kind, 0) + 1

    def apply_pending(self, x, bias):
        if isinstance(x, PendingRows):
            count(x.kind)
            x = x.materialize()
        return apply(self, x, bias)

    def apply_residual(self, x, residual):       # as the ring does it: r + y, and partials of 16 columns
        count(RESIDUAL_ADD)
        s = residual + apply_pending(self, x, None)
        return SummedRows(s, s.float().pow(2).reshape(s.shape[0], -1, 16).sum(-1))

    monkeypatch.setattr(cls, "takes_pending", lambda self, m, kind: kind in taken, raising=False)
    monkeypatch.setattr(cls, "apply", apply_pending)
    monkeypatch.setattr(cls, "apply_residual", apply_residual, raising=False)
    assert _greedy(eng) == ref
    n, acts = len(layers), kinds[SILU_MUL]
    assert acts > 0 and GELU_MUL not in kinds
    if summed:   # every norm but the first reads partials; the first layer's input norm has no delta
        assert kinds[NORM_PARTS] == 2 * acts - acts // n and kinds[RESIDUAL_ADD] == 2 * acts
        assert ADD_RMS_NORM not in kinds
    else:
        assert kinds[ADD_RMS_NORM] == 2 * acts - acts // n and RESIDUAL_ADD not in kinds


def test_linear_materializes_rows_its_kernel_does_not_take():
    """QuantLinear.forward given pending rows its kernel declines computes them with the producing op first."""
    from quantrt.layers.linear import QuantLinear
    from quantrt.platforms.xpu.cpu_platform import CpuPlatform

    lin = QuantLinear("", [("down_proj", 8)], 16)
    lin.load([{"weight": torch.randn(8, 16).to(torch.bfloat16)}], None, CpuPlatform(), torch.bfloat16)
    assert not lin.takes_pending(2, SILU_MUL)
    gu = torch.randn(2, 32).to(torch.bfloat16)
    calls = []

    def op(g, gelu):
        calls.append(gelu)
        return torch.nn.functional.silu(g[:, :16]) * g[:, 16:]

    got = lin(PendingActMul(gu, False, op))
    assert calls == [False]
    torch.testing.assert_close(got, lin(op(gu, False)), atol=0, rtol=0)


def test_w4a16_kernel_takes_the_rows_where_its_ring_would_run(monkeypatch):
    """TritonWNA16Kernel.takes_pending: one row, the three kinds, only where the ring runs (here faked: a CPU has
    no ring), not with act-order; QUANTRT_CUDA_RING_PROLOGUE narrows it to one kind or none."""
    from quantrt.platforms.cuda.kernels.wna16 import TritonWNA16Kernel
    from quantrt.quant.kernel import LinearSpec
    from quantrt.quant.weights import ActScheme
    from tests.test_cuda_kernels import PLATFORM, make_int_weight

    gen = torch.Generator().manual_seed(0)
    kern = TritonWNA16Kernel.prepare(LinearSpec(make_int_weight(256, 512, 4, 128, False, False, gen), ActScheme(),
                                                torch.bfloat16), PLATFORM)
    if DEV == "cpu":
        assert kern.ring_why and not kern.takes_pending(1, ADD_RMS_NORM)          # no ring on a CPU: never
    kern.ring_why = ""
    assert all(kern.takes_pending(1, kind) for kind in (ADD_RMS_NORM, SILU_MUL, GELU_MUL))
    assert not kern.takes_pending(2, SILU_MUL) and not kern.takes_pending(1, "rms_norm")
    assert kern.takes_pending(1, RESIDUAL_ADD) and kern.takes_pending(1, NORM_PARTS)   # K splits at one row
    monkeypatch.setenv("QUANTRT_CUDA_RING_TILES", "1:512:256=64:128:2:4:1:8")          # one split: no epilogue
    assert not kern.takes_pending(1, RESIDUAL_ADD) and kern.takes_pending(1, NORM_PARTS)
    monkeypatch.delenv("QUANTRT_CUDA_RING_TILES")
    for only, kinds in (("norm", {ADD_RMS_NORM}), ("act", {SILU_MUL, GELU_MUL}), ("0", set())):
        monkeypatch.setenv("QUANTRT_CUDA_RING_PROLOGUE", only)
        assert {k for k in (ADD_RMS_NORM, SILU_MUL, GELU_MUL) if kern.takes_pending(1, k)} == kinds
    monkeypatch.delenv("QUANTRT_CUDA_RING_PROLOGUE")
    ordered = TritonWNA16Kernel.prepare(LinearSpec(make_int_weight(256, 512, 4, 128, False, True, gen), ActScheme(),
                                                   torch.bfloat16), PLATFORM)
    ordered.ring_why = ""
    assert ordered.perm is not None and not ordered.takes_pending(1, ADD_RMS_NORM)


# --------------------------------------------------------------------- on the GPU
def _ring_case(m: int, n: int, k: int, seed: int):
    from tests.test_cuda_ring_wna16 import _packed

    _, packed, scale, _ = _packed(n, k, False, seed)
    return packed, scale


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k", [(6144, 4096), (512, 256), (4096, 4096)])
def test_ring_norm_prologue_native(m, n, k):
    """RMSNorm(x + delta) in the ring's load vs the ring on the reference's normalized rows: within the last bit of
    1 / rms; the residual x + delta bit for bit (written once, by column tile 0)."""
    from quantrt.platforms.cuda.kernels.ring_prologue import PRO_NORM, RingPrologue, prologue_reference
    from quantrt.platforms.cuda.kernels.ring_wna16 import ring_wna16

    packed, scale = _ring_case(m, n, k, 5)
    x, d, w = _rows(m, k, 6)
    res = torch.full_like(x, float("nan"))
    pro = RingPrologue(PRO_NORM, d, w, res, 1e-5)
    got = ring_wna16(x, packed, scale, None, 128, pro=pro)
    xin, s = prologue_reference(x, pro, k)
    want = ring_wna16(xin, packed, scale, None, 128)
    assert torch.equal(res, s)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * want.float().abs().mean().item(), rtol=2e-2)


@pytest.mark.accelerator
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("gelu", [False, True])
def test_ring_act_prologue_native(m, gelu):
    """act(gate) * up in the ring's load (down projection 14336 -> 4096) equals the ring on the platform op's
    output, bit for bit (the same fp32 math and roundings; the MMA sees the same operands)."""
    from quantrt.platforms.cuda.kernels.ring_prologue import PRO_GELU, PRO_SILU, RingPrologue
    from quantrt.platforms.cuda.kernels.ring_wna16 import ring_wna16
    from quantrt.platforms.cuda.layer_ops import triton_act_mul

    n, k = 4096, 14336
    packed, scale = _ring_case(m, n, k, 7)
    gu = torch.randn(m, 2 * k, generator=torch.Generator().manual_seed(8)).to(DEV, torch.bfloat16)
    got = ring_wna16(gu, packed, scale, None, 128, pro=RingPrologue(PRO_GELU if gelu else PRO_SILU))
    assert torch.equal(got, ring_wna16(triton_act_mul(gu, gelu), packed, scale, None, 128))


@pytest.mark.accelerator
@pytest.mark.parametrize("n,k,act", [(4096, 4096, False), (4096, 14336, True), (512, 1536, True)])
def test_ring_residual_epilogue_native(n, k, act):
    """residual + y in the ring's last split (o / down projections, down with its act * up prologue): bit for bit
    torch's r + y, and each 128-column tile's sum of squares of it."""
    from quantrt.platforms.cuda.kernels.ring_prologue import PRO_SILU, RingPrologue
    from quantrt.platforms.cuda.kernels.ring_wna16 import ring_wna16

    packed, scale = _ring_case(1, n, k, 11)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1, 2 * k if act else k, generator=gen).to(DEV, torch.bfloat16)
    r = torch.randn(1, n, generator=gen).to(DEV, torch.bfloat16)
    pro = RingPrologue(PRO_SILU) if act else None
    s, parts = ring_wna16(x, packed, scale, None, 128, pro=pro, residual=r)
    assert torch.equal(s, r + ring_wna16(x, packed, scale, None, 128, pro=pro))
    torch.testing.assert_close(parts, s.float().pow(2).reshape(1, parts.shape[1], -1).sum(-1), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="residual epilogue needs M <= 2 rows with K split"):
        ring_wna16(x[:, :k].repeat(3, 1), packed, scale, None, 128, residual=r.repeat(3, 1))


@pytest.mark.accelerator
@pytest.mark.parametrize("n,k", [(6144, 4096), (28672, 4096)])
def test_ring_norm_from_partials_native(n, k):
    """RMSNorm of a summed residual with 1 / rms from 32 partial sums of squares, in the ring's load, vs the ring on
    the reference's rows (to the last bit of 1 / rms)."""
    from quantrt.platforms.cuda.kernels.ring_prologue import PRO_NORM_PARTS, RingPrologue, prologue_reference
    from quantrt.platforms.cuda.kernels.ring_wna16 import ring_wna16

    packed, scale = _ring_case(1, n, k, 13)
    s, _, w = _rows(1, k, 14)
    parts = s.float().pow(2).reshape(1, 32, -1).sum(-1)
    pro = RingPrologue(PRO_NORM_PARTS, weight=w, eps=1e-5, parts=parts)
    got = ring_wna16(s, packed, scale, None, 128, pro=pro)
    want = ring_wna16(prologue_reference(s, pro, k)[0], packed, scale, None, 128)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * want.float().abs().mean().item(), rtol=2e-2)


@pytest.mark.accelerator
def test_int4_engine_with_and_without_ring_prologues_native(tmp_path, monkeypatch):
    """A 2-layer GPTQ g128 Llama (hidden 512, noisy norm weights), decode graphs on: the ring computing the norms
    and act * up gives the greedy tokens of the engine that launches them, logprobs within bf16 noise."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from _cuda_decode import write_checkpoint

    from quantrt.engine.engine import Engine

    shape = dict(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                 num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    path = write_checkpoint(tmp_path / "int4", layers=2, gptq=True, shape=shape, norm_std=0.1)
    prompts = [[5, 17, 99, 3, 42], [7] * 9]

    def run(on: str):
        monkeypatch.setenv("QUANTRT_CUDA_RING_PROLOGUE", on)
        eng = Engine(model_path=str(path), dtype="bfloat16", max_total_tokens=1024, page_size=16, random_seed=0)
        lin = eng.model.model.layers[0].mlp.down_proj
        assert lin.takes_pending(1, SILU_MUL) == (on != "0") and not lin.takes_pending(2, SILU_MUL)
        assert lin.takes_pending(1, RESIDUAL_ADD) == (on == "1")
        outs = [eng.generate(input_ids=p, sampling_params={"max_new_tokens": 12, "temperature": 0,
                                                            "ignore_eos": True}, return_logprob=True)
                for p in prompts + [prompts]]
        del eng
        return outs

    slow = run("0")
    for fast in (run("1"), run("norm+act")):      # with the residual epilogue + partials, and without
        for f, s in zip(fast, slow):
            for a, b in zip(f if isinstance(f, list) else [f], s if isinstance(s, list) else [s]):
                assert a["output_ids"] == b["output_ids"]
                lp = [abs(x[0] - y[0]) for x, y in zip(a["meta_info"]["output_token_logprobs"],
                                                       b["meta_info"]["output_token_logprobs"])]
                assert max(lp) < 5e-2


def test_qkv_kernel_releases_the_attention_early(tiny_models):
    """The q/k/v projection's kernel is told that the op after it is small (the decode attention, which reads
    before its wait: `LinearKernel.release_early`); no other linear is."""
    from quantrt.layers.linear import QuantLinear
    from quantrt.platforms.xpu.cpu_platform import CpuPlatform

    layer = _cpu_engine(tiny_models).model.model.layers[0]
    assert layer.self_attn.qkv_proj.kernels[0].release_early is True
    assert not any(lin.kernels[0].release_early for lin in (layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                                            layer.mlp.down_proj))
    lin = QuantLinear("", [("down_proj", 8)], 16)
    lin.release_early = True
    lin.load([{"weight": torch.randn(8, 16).to(torch.bfloat16)}], None, CpuPlatform(), torch.bfloat16)
    assert lin.kernels[0].release_early is True
    lin.release_next(False)                 # per step, as the attention after decides
    assert lin.kernels[0].release_early is False
    other = layer.self_attn.o_proj
    other.release_next(True)                # a layer not built to release early never does
    assert other.kernels[0].release_early is False


def test_attention_grid_decides_the_early_release(tiny_models, monkeypatch):
    """The q/k/v kernel releases the decode attention at its start only while the attention's grid is small
    (`PagedAttention.small_decode`, CUDA's `small_grid`): one or two sequences over short slot tables; a long table
    (more key splits) or more sequences turn it off for that step. On the CPU, where no fused op runs, never."""
    from types import SimpleNamespace

    from quantrt.platforms.cuda.kernels import decode_attention_op as O
    from quantrt.platforms.cuda.kernels import paged_attention_triton as P

    monkeypatch.setattr(P, "num_sms", lambda *a: 132)      # the H100's, as the splits are picked there
    layer = SimpleNamespace(num_kv_heads=8)
    fb = lambda width: SimpleNamespace(kv_slots=torch.zeros(1, width))  # noqa: E731
    assert O.decode_rotary_attention.small_grid is O._small_grid
    assert O._small_grid(layer, fb(64), 1) and O._small_grid(layer, fb(256), 2)
    assert not O._small_grid(layer, fb(2048), 1)      # 8 key splits: 64 programs
    assert not O._small_grid(layer, fb(64), 3)        # 24 programs
    eng = _cpu_engine(tiny_models)
    _greedy(eng)
    assert eng.model.model.layers[0].self_attn.qkv_proj.kernels[0].release_early is False
