"""The dense fp16/bf16 GEMV (`dense_gemv_triton`) and its linear kernel (`TritonDenseGemvKernel`) vs float64.

Under TRITON_INTERPRET=1 (CI) at tiny shapes; `-m accelerator` adds the Llama-3.1-8B shapes natively, with
programmatic dependent launch, inside a CUDA graph after the kernel that writes x, and against F.linear.
Bound per element: the fp32-accumulated product rounded once to the 8-bit (bf16) / 11-bit (fp16) mantissa,
so |y - ref| <= 2 ulp(ref) + a small multiple of the fp32 accumulation error sum_k |w x|.
"""

from __future__ import annotations

import pytest
import torch

from quantrt.platforms.cuda.kernels import CUDA_LINEAR_KERNELS
from quantrt.platforms.cuda.kernels.dense_gemv import TritonDenseGemvKernel
from quantrt.platforms.cuda.platform import CudaPlatform
from quantrt.quant.kernel import LinearSpec, select_linear_kernel
from quantrt.quant.weights import WEIGHT_ONLY, DenseWeight, IntWeight
from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM

pytestmark = NEEDS_TRITON
LLAMA_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]  # (K, N)


def assert_close_to_f64(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """y [M, N] vs x @ w.T (+ bias) in float64, within 2 ulp of y's dtype plus fp32 accumulation slack."""
    assert y.dtype == x.dtype and torch.isfinite(y).all()
    ref = x.double() @ w.double().t()
    mag = x.double().abs() @ w.double().abs().t()                   # sum_k |x w|: the accumulation scale
    ulp = 2.0 ** -(7 if y.dtype == torch.bfloat16 else 10)
    bound = 2 * ulp * ref.abs() + 1e-5 * mag
    if bias is not None:                                            # (x w rounded) + b, rounded again
        bound = bound + 2 * ulp * (ref + bias.double()).abs()
        ref = ref + bias.double()
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,cfg", [
    (40, 256, (16, 64, 4, 4, 1, True)),    # split K 4, last column tile ragged (clamped rows), prefetch
    (40, 256, (16, 64, 4, 4, 1, False)),   # same, without the prefetch
    (33, 128, (8, 128, 1, 4, 1, True)),    # one K step, no split: direct store
])
def test_dense_gemv_vs_float64(dtype, m, n, k, cfg):
    from quantrt.platforms.cuda.kernels.dense_gemv_triton import DenseGemvConfig, dense_gemv

    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(DEV, dtype)
    y = dense_gemv(x, w, DenseGemvConfig(*cfg))
    assert y.shape == (m, n)
    assert_close_to_f64(y, x, w)


def test_dense_gemv_split_is_deterministic_and_counters_reset():
    """Split-K partials are summed in split order by the last program: two calls give identical bits, and
    the shared arrival counters are back at zero after each launch."""
    from quantrt.platforms.cuda.kernels._common import split_counters
    from quantrt.platforms.cuda.kernels.dense_gemv_triton import DenseGemvConfig, dense_gemv

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 512, generator=gen).to(DEV, torch.bfloat16)
    w = torch.randn(24, 512, generator=gen).to(DEV, torch.bfloat16)
    cfg = DenseGemvConfig(8, 64, 8)                                 # 3 tiles x split 8
    y1, y2 = dense_gemv(x, w, cfg), dense_gemv(x, w, cfg)
    assert torch.equal(y1, y2)
    assert int(split_counters(x.device, 3)[:3].abs().sum()) == 0
    assert_close_to_f64(y1, x, w)


def test_plan_split_picks_divisor_nearest_target():
    from quantrt.platforms.cuda.kernels.dense_gemv_triton import plan_split

    assert plan_split(4096, 512, 256, 528) == 2          # 8 steps: 512 programs is nearest 528
    assert plan_split(14336, 512, 256, 528) == 2         # 28 steps: divisors 1, 2, 4, 7, ...
    assert plan_split(4096, 512, 8016, 528) == 1         # the lm_head has tiles enough
    assert plan_split(512, 512, 4, 528) == 1             # one K step cannot split


def test_dense_gemv_rejects_bad_block():
    from quantrt.platforms.cuda.kernels.dense_gemv_triton import DenseGemvConfig, dense_gemv

    x = torch.randn(1, 192).to(DEV, torch.bfloat16)
    with pytest.raises(ValueError, match="K=192 is not a multiple of block_k=128"):
        dense_gemv(x, torch.randn(8, 192).to(DEV, torch.bfloat16), DenseGemvConfig(8, 128))


def test_registered_and_selected_for_dense_weights():
    assert TritonDenseGemvKernel in CUDA_LINEAR_KERNELS and CUDA_LINEAR_KERNELS[-1] is TritonDenseGemvKernel
    w = torch.randn(64, 128).to(DEV, torch.bfloat16)
    choice = select_linear_kernel(LinearSpec(DenseWeight(w), WEIGHT_ONLY, torch.bfloat16), PLATFORM)
    assert choice.kernel is TritonDenseGemvKernel
    assert "triton_dense_gemv" in choice.explain()


@pytest.mark.parametrize("weight,dtype,why", [
    (DenseWeight(torch.zeros(8, 96, device=DEV)), torch.bfloat16, "K=96 is not a multiple of 64"),
    (DenseWeight(torch.zeros(8, 128, device=DEV)), torch.float32, "is not float16/bfloat16"),
    (IntWeight(torch.zeros(8, 128, dtype=torch.int8), torch.ones(8, 1), 8, 128), torch.bfloat16,
     "weight is IntWeight, not DenseWeight"),
])
def test_can_implement_reasons(weight, dtype, why):
    ok, reason = TritonDenseGemvKernel.can_implement(LinearSpec(weight, WEIGHT_ONLY, dtype), PLATFORM)
    assert not ok and why in reason, reason


def test_can_implement_rejects_cpu_weight_outside_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = TritonDenseGemvKernel.can_implement(
        LinearSpec(DenseWeight(torch.zeros(8, 128)), WEIGHT_ONLY, torch.bfloat16), PLATFORM)
    assert not ok and "not a CUDA/ROCm device" in reason


@pytest.mark.parametrize("m", [1, 3, 7])
def test_kernel_apply_gemv_rows_and_linear_fallback(m):
    """M <= GEMV_MAX_M runs the GEMV, larger M F.linear (same result as the portable dense kernel); bias and
    leading dims are kept."""
    import torch.nn.functional as F

    from quantrt.platforms.cuda.kernels.dense_gemv import GEMV_MAX_M

    gen = torch.Generator().manual_seed(m)
    w = (torch.randn(48, 128, generator=gen) * 0.05).to(DEV, torch.bfloat16)
    b = torch.randn(48, generator=gen).to(DEV, torch.bfloat16)
    kern = TritonDenseGemvKernel.prepare(LinearSpec(DenseWeight(w), WEIGHT_ONLY, torch.bfloat16), PLATFORM)
    x = torch.randn(m, 1, 128, generator=gen).to(DEV, torch.bfloat16)
    y = kern.apply(x, b)
    assert y.shape == (m, 1, 48)
    if m > GEMV_MAX_M:
        assert torch.equal(y, F.linear(x, w, b))
    else:
        assert_close_to_f64(y.reshape(m, 48), x.reshape(m, 128), w, b)


# --- native (H100) -------------------------------------------------------------------------------------


@pytest.mark.accelerator
@pytest.mark.parametrize("k,n", LLAMA_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 4])
def test_native_llama_shapes_vs_float64_and_cublas(k, n, m):
    import torch.nn.functional as F

    from quantrt.platforms.cuda.kernels.dense_gemv_triton import default_config, dense_gemv

    gen = torch.Generator(device="cuda").manual_seed(k + n + m)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
    y = dense_gemv(x, w, default_config(m, n, k, pdl=True))
    assert_close_to_f64(y, x, w)
    ref = F.linear(x, w)
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) < 4e-3


@pytest.mark.accelerator
def test_native_pdl_in_cuda_graph_waits_for_the_producer():
    """Inside a CUDA graph, x is written by the kernel just before the GEMV (launched with programmatic
    dependent launch, weight reads before griddepcontrol.wait): every replay must see the new x."""
    from quantrt.platforms.cuda.kernels.dense_gemv_triton import default_config, dense_gemv

    k, n = 4096, 4096
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    src = torch.randn(1, k, device="cuda").bfloat16()
    x = torch.empty_like(src)
    cfg = default_config(1, n, k, pdl=True)
    dense_gemv(x, w, cfg)                                           # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        torch.mul(src, 3.0, out=x)
        y = dense_gemv(x, w, cfg)
    for scale in (1.0, -2.0, 0.5):
        src.copy_(torch.randn_like(src) * scale)
        g.replay()
        torch.cuda.synchronize()
        assert_close_to_f64(y, (src * 3.0), w)


@pytest.mark.accelerator
def test_native_pdl_chain_in_cuda_graph():
    """A decode layer's PDL chain in one CUDA graph, 2 rows: add + RMSNorm -> GEMV (gate_up) -> act * up -> GEMV
    (down) -> add + RMSNorm, every kernel launched with PDL (each lets the next launch early and waits for the
    one before): each replay equals the same ops run eagerly on the new input, and the torch math."""
    import torch.nn.functional as F

    from quantrt.platforms.cuda.kernels.dense_gemv_triton import default_config, dense_gemv
    from quantrt.platforms.cuda.kernels.pdl_triton import PDL_MIN_ROWS
    from quantrt.platforms.cuda.layer_ops import triton_act_mul, triton_add_rms_norm

    d, i, rows = 4096, 14336, 2
    assert rows >= PDL_MIN_ROWS
    gen = torch.Generator(device="cuda").manual_seed(3)
    w_gu = (torch.randn(2 * i, d, device="cuda", generator=gen) * 0.02).bfloat16()
    w_dn = (torch.randn(d, i, device="cuda", generator=gen) * 0.02).bfloat16()
    g = (torch.rand(d, device="cuda", generator=gen) + 0.5).bfloat16()
    x, delta = (torch.randn(rows, d, device="cuda", generator=gen).bfloat16() for _ in range(2))
    cfg_gu, cfg_dn = default_config(rows, 2 * i, d, pdl=True), default_config(rows, d, i, pdl=True)

    def layer():
        h, s = triton_add_rms_norm(x, delta, g, 1e-5)
        out = dense_gemv(triton_act_mul(dense_gemv(h, w_gu, cfg_gu)), w_dn, cfg_dn)
        return triton_add_rms_norm(s, out, g, 1e-5)

    layer()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, s = layer()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        delta.copy_(torch.randn_like(delta))
        graph.replay()
        ref_y, ref_s = layer()
        torch.cuda.synchronize()
        assert torch.equal(s, ref_s) and torch.equal(y, ref_y)
    h_ref = F.linear(F.rms_norm((x + delta).float(), (d,), eps=1e-5).bfloat16() * g, w_gu)
    a = F.silu(h_ref[:, :i]) * h_ref[:, i:]
    ref_s = (x + delta) + F.linear(a, w_dn)
    assert float((s.float() - ref_s.float()).norm() / ref_s.float().norm()) < 2e-2


class _CublasDensePlatform(CudaPlatform):
    """The CUDA platform without the dense GEMV: unquantized linears run the portable F.linear kernel."""

    def linear_kernels(self):
        return [k for k in super().linear_kernels() if k is not TritonDenseGemvKernel]


@pytest.mark.accelerator
def test_native_engine_kernel_choice_and_tokens(tiny_models):
    """A bf16 tiny Llama on the GPU (decode graphs on): every linear runs this kernel, and greedy tokens equal
    those of the same engine on F.linear, logprobs within bf16 noise."""
    from quantrt.engine.engine import Engine
    from tests.test_cuda_fused_layer import PROMPTS, _assert_parity, _decode

    kw = dict(model_path=str(tiny_models["llama"][0]), dtype="bfloat16", max_total_tokens=2048, page_size=16,
              random_seed=0)
    eng = Engine(**kw)
    descs = [m.kernel_desc for m in eng.model.modules() if hasattr(m, "kernel_desc")]
    assert descs and all(d.startswith("triton_dense_gemv") for d in descs), descs
    ours = _decode(eng, PROMPTS, 12)
    del eng
    ref_eng = Engine(platform=_CublasDensePlatform(), **kw)
    assert all(m.kernel_desc.startswith("dense") for m in ref_eng.model.modules() if hasattr(m, "kernel_desc"))
    _assert_parity(ours, _decode(ref_eng, PROMPTS, 12), 5e-2)
