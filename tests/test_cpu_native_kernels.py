"""cpu_native_int (quantrt_cpu::int_gemm, csrc/int_gemm.cpp) vs a float64 dequantize-matmul reference.

The extension is built once per session (scripts/setup.sh builds it; a cached build loads in < 1 s), so
these tests fail, not skip, when it cannot be built on an x86-64 box with a compiler: the reason is in
the assertion message.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quantrt.platform.resolve import current_platform
from quantrt.platforms.xpu import cpu_ext
from quantrt.platforms.xpu.cpu_native_kernels import CpuNativeIntKernel, q8_0_blocks_exact
from quantrt.platforms.xpu.cpu_platform import CpuPlatform
from quantrt.quant.format import get_format
from quantrt.quant.kernel import LinearSpec, select_linear_kernel
from quantrt.quant.weights import WEIGHT_ONLY, ActKind, ActScheme, IntWeight

N, K = 40, 256            # N not a multiple of the 4-row tile, K = 8 blocks of 32


@pytest.fixture(scope="module", autouse=True)
def ext() -> None:
    assert cpu_ext.load(), cpu_ext.unavailable_reason()


def _weight(bits: int, kind: str, group: int, n: int = N, k: int = K, seed: int = 0) -> IntWeight:
    """Random IntWeight: kind sym (signed codes), zero (unsigned + integer zero), offset (unsigned + min),
    plain (unsigned, no zero)."""
    g = torch.Generator().manual_seed(seed)
    ng = k // group
    scale = (torch.rand(n, ng, generator=g) * 0.02 + 0.001).to(torch.float16).float()
    if kind == "sym":
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
        codes = torch.randint(lo, hi, (n, k), generator=g).to(torch.int8)
        return IntWeight(codes, scale, bits, group)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g).to(torch.uint8)
    if kind == "zero":
        zero = torch.randint(0, 1 << bits, (n, ng), generator=g).to(torch.uint8)
        return IntWeight(codes, scale, bits, group, zero=zero)
    if kind == "offset":
        off = (torch.randn(n, ng, generator=g) * 0.05).to(torch.float16).float()
        return IntWeight(codes, scale, bits, group, offset=off)
    return IntWeight(codes, scale, bits, group)


def _run(w: IntWeight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    spec = LinearSpec(w, WEIGHT_ONLY, x.dtype)
    plat = current_platform()
    ok, why = CpuNativeIntKernel.can_implement(spec, plat)
    assert ok, why
    return CpuNativeIntKernel.prepare(spec, plat).apply(x, bias)


def _check(w: IntWeight, m: int, dtype: torch.dtype = torch.float32, bias: bool = False) -> None:
    x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m)).to(dtype)
    b = torch.randn(w.shape[0]) if bias else None
    y = _run(w, x, b)
    assert y.shape == (m, w.shape[0]) and y.dtype == dtype
    ref = x.double() @ w.dequantize(torch.float64).T + (b.double() if bias else 0)   # float64 reference
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    tol = 2e-6 if dtype == torch.float32 else 8e-3                     # fp32 sums; bf16/fp16 output rounding
    assert err <= tol, (w.bits, w.group_size, m, dtype, err)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("kind", ["sym", "zero", "offset", "plain"])
@pytest.mark.parametrize("group", [32, 64, 128, K])
def test_every_bits_kind_group_vs_float64(bits, kind, group):
    w = _weight(bits, kind, group)
    for m in (1, 2, 3, 4, 5, 16):
        _check(w, m)


@pytest.mark.parametrize("k", [32, 96, 320, 576])
def test_block_counts_that_are_not_a_multiple_of_8(k):
    # the op converts scales/mins 8 blocks at a time: K/32 = 1, 3, 10, 18 exercise the partial group
    for kind in ("offset", "zero", "sym"):
        for bits in (4, 8):
            w = _weight(bits, kind, 32, n=9, k=k)
            for m in (1, 2, 5):
                _check(w, m)


@pytest.mark.parametrize("m", [1, 7, 16, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_dtypes_rows_and_bias(m, dtype):
    # m > 16 runs the tiled path (fp32 tiles dequantized per call + sgemm), m <= 16 the direct kernel
    _check(_weight(4, "offset", 32), m, dtype, bias=True)
    _check(_weight(8, "sym", 32), m, dtype, bias=True)
    _check(_weight(5, "zero", 64), m, dtype)
    _check(_weight(3, "plain", K), m, dtype)


def test_3d_input_fp32_scales_and_act_order():
    # integer zero points stay uint8 (min = -z*s in the op); fp32 scales fp16 cannot hold: fp32 path
    w = _weight(4, "zero", 64)
    w = IntWeight(w.codes, w.scale + 1e-6, 4, 64, zero=w.zero)
    spec = LinearSpec(w, WEIGHT_ONLY, torch.float32)
    k = CpuNativeIntKernel.prepare(spec, current_platform())
    assert k.scales.dtype == torch.float32 and k.mins.dtype == torch.uint8
    x = torch.randn(2, 3, K)
    y = k.apply(x, None)
    assert y.shape == (2, 3, N)
    ref = x.double() @ w.dequantize(torch.float64).T
    assert float((y.double() - ref).abs().max() / ref.abs().max()) <= 2e-6
    # act order: column k belongs to group g_idx[k] (a permuted group table, GPTQ desc_act)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(3))
    wa = IntWeight(w.codes, w.scale, 4, 64, zero=w.zero, g_idx=(torch.argsort(perm) // 64).to(torch.int32))
    _check(wa, 3)


def test_bias_of_another_dtype():
    w = _weight(4, "offset", 32)
    x, b = torch.randn(2, K).bfloat16(), torch.randn(N).half()            # fp16 bias, bf16 activations
    ref = x.double() @ w.dequantize(torch.float64).T + b.double()
    y = _run(w, x, b)
    assert y.dtype == torch.bfloat16 and float((y.double() - ref).abs().max() / ref.abs().max()) <= 8e-3


def test_prepare_keeps_only_packed_bytes():
    w = _weight(4, "offset", 32)
    k = CpuNativeIntKernel.prepare(LinearSpec(w, WEIGHT_ONLY, torch.float32), current_platform())
    held = [v for v in vars(k).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() * t.element_size() for t in held) == N * K // 2 + 2 * 2 * N * (K // 32)
    assert k.qs.dtype == torch.uint8 and k.scales.dtype == torch.float16       # fp16-exact scale and min
    kz = CpuNativeIntKernel.prepare(LinearSpec(_weight(4, "zero", 32), WEIGHT_ONLY, torch.float32),
                                    current_platform())                  # codes, fp16 scale, uint8 zero
    assert sum(t.numel() * t.element_size() for t in (kz.qs, kz.scales, kz.mins)) == N * K // 2 + 3 * N * (K // 32)
    assert _weight(4, "plain", 32) is not None and CpuNativeIntKernel.prepare(
        LinearSpec(_weight(4, "plain", 32), WEIGHT_ONLY, torch.float32), current_platform()).mins is None


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_quantizer_blocks_through_the_load_path(name, dtype):
    """Blocks written by the `gguf` package's quantizer, decoded by the GGUF format, selected on this
    platform: the native kernel is chosen and matches the gguf package's own dequantization."""
    wf = np.random.default_rng(1).standard_normal((N, K)).astype(np.float32)
    qt = gguf.GGMLQuantizationType[name]
    raw = gguf.quants.quantize(wf, qt)
    fmt = get_format("gguf").from_config({})
    qw = fmt.make_weight("l", {"qweight": torch.from_numpy(raw), "qweight_type": torch.tensor(int(qt))}, (N, K))
    spec = LinearSpec(qw, WEIGHT_ONLY, dtype)
    plat = current_platform()
    choice = select_linear_kernel(spec, plat)
    assert choice.kernel is CpuNativeIntKernel, choice.explain()
    x = torch.randn(4, K)
    y = choice.kernel.prepare(spec, plat).apply(x.to(dtype), None)
    deq = torch.from_numpy(gguf.quants.dequantize(raw, qt)).double()             # the producer's weights
    ref = x.to(dtype).double() @ deq.T
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert err <= (2e-6 if dtype == torch.float32 else 8e-3), err


def test_q8_0_tied_head_is_the_embedding_exactly():
    wf = np.random.default_rng(2).standard_normal((N, K)).astype(np.float32)
    raw = gguf.quants.quantize(wf, gguf.GGMLQuantizationType.Q8_0)
    emb = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0))
    qw = q8_0_blocks_exact(emb)
    assert qw is not None and torch.equal(qw.dequantize(), emb)
    for dtype in (torch.float32, torch.bfloat16):
        hw = CpuPlatform().tied_head_weight(emb, dtype)
        assert isinstance(hw, IntWeight) and hw.group_size == 32 and torch.equal(hw.dequantize(), emb)
    assert q8_0_blocks_exact(torch.randn(N, K)) is None                 # not Q8_0 values: no exact blocks
    assert CpuPlatform().tied_head_weight(torch.randn(N, K), torch.float32) is None   # dense fp32 head


def test_declines_with_reasons(monkeypatch):
    plat = current_platform()
    g16 = IntWeight(torch.zeros(N, K, dtype=torch.int8), torch.ones(N, K // 16), 6, 16)
    ok, why = CpuNativeIntKernel.can_implement(LinearSpec(g16, WEIGHT_ONLY, torch.float32), plat)
    assert not ok and "group size 16 is not a multiple of 32" in why
    k48 = IntWeight(torch.zeros(N, 48, dtype=torch.int8), torch.ones(N, 1), 8, 48)
    ok, why = CpuNativeIntKernel.can_implement(LinearSpec(k48, WEIGHT_ONLY, torch.float32), plat)
    assert not ok and "K=48 is not a multiple of 32" in why
    act = ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8)
    ok, why = CpuNativeIntKernel.can_implement(LinearSpec(_weight(8, "sym", 32), act, torch.float32), plat)
    assert not ok and "weight-only" in why
    # an unavailable extension: its reason surfaces in can_implement and in the selection's explanation
    monkeypatch.setattr(cpu_ext, "_loaded", False)
    monkeypatch.setattr(cpu_ext, "_reason", "no C++ compiler: `c++` is not on PATH (install g++ or set CXX)")
    spec = LinearSpec(_weight(4, "offset", 32), WEIGHT_ONLY, torch.float32)
    ok, why = CpuNativeIntKernel.can_implement(spec, plat)
    assert not ok and why == ("native CPU extension unavailable: no C++ compiler: `c++` is not on PATH "
                              "(install g++ or set CXX)")
    choice = select_linear_kernel(spec, plat)
    assert choice.kernel is not CpuNativeIntKernel and "cpu_native_int: native CPU extension unavailable" \
        in choice.explain()


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setenv("QUANTRT_DISABLE_CPU_EXT", "1")
    assert cpu_ext._precheck() == "disabled by QUANTRT_DISABLE_CPU_EXT=1"
    monkeypatch.delenv("QUANTRT_DISABLE_CPU_EXT")
    monkeypatch.setattr(cpu_ext._pyplatform, "machine", lambda: "aarch64")
    assert "aarch64 is not x86-64" in cpu_ext._precheck()
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert cpu_ext._precheck() == "no C++ compiler: `no-such-compiler-xyz` is not on PATH (install g++ or set CXX)"
    err = RuntimeError("Error building extension 'quantrt_cpu_ext'")
    err.output = "int_gemm.cpp:12:3: error: 'foo' was not declared in this scope\nninja: build stopped"
    assert cpu_ext._summarize(err).startswith("build failed: ")
    assert "'foo' was not declared" in cpu_ext._summarize(err)


def test_env_says_whether_the_extension_loaded(monkeypatch):
    d = CpuPlatform().describe()                          # what `quantrt env` prints for the CPU platform
    assert d["native_extension"].startswith("loaded (") and d["int_kernel"].startswith("cpu_native_int")
    assert d["linear_kernels"].index("cpu_native_int") < d["linear_kernels"].index("cpu_int4_packed")
    monkeypatch.setattr(cpu_ext, "_loaded", False)
    monkeypatch.setattr(cpu_ext, "_reason", "disabled by QUANTRT_DISABLE_CPU_EXT=1")
    d = CpuPlatform().describe()
    assert d["native_extension"] == "unavailable: disabled by QUANTRT_DISABLE_CPU_EXT=1"
    assert d["int_kernel"] == "torch packed int4/int8 ops (cpu_native_int unavailable)"


def test_a_stale_build_lock_is_dropped(tmp_path):
    import os

    lock = tmp_path / "lock"
    lock.write_text("")
    cpu_ext._drop_stale_lock(lock)
    assert lock.exists()                                  # a build may be running: wait for it
    os.utime(lock, (0, 0))
    cpu_ext._drop_stale_lock(lock)
    assert not lock.exists()                              # left by a killed build: removed
    cpu_ext._drop_stale_lock(lock)                        # and no lock at all is fine


def test_op_rejects_bad_inputs():
    op = torch.ops.quantrt_cpu.int_gemm
    qs, s = torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8, got 5"):
        op(torch.randn(1, 64), qs, s, None, 5, None)
    with pytest.raises(RuntimeError, match="K=48 is not a multiple of 32"):
        op(torch.randn(1, 48), qs, s, None, 4, None)
    with pytest.raises(RuntimeError, match=r"qs must be contiguous \[N, K\*bits/8\] int8"):
        op(torch.randn(1, 64), qs, s, None, 8, None)
    with pytest.raises(RuntimeError, match="scales must be contiguous float32/float16"):
        op(torch.randn(1, 64), qs, torch.ones(8, 3), None, 4, None)
    with pytest.raises(RuntimeError, match="x dtype must be float32, bfloat16 or float16"):
        op(torch.randn(1, 64).double(), qs, s, None, 4, None)


@pytest.mark.slow
def test_smollm2_gguf_logits_match_the_torch_path(monkeypatch):
    """The real demo GGUF (Q4_1 linears, Q8_0 tied head): every linear and the head on cpu_native_int vs the
    same engine with the extension switched off (fp32: weights dequantized once to fp32 and a dense head;
    bf16: torch's int4-pack op and a per-row int8 head). 48 prompt positions, full-vocabulary log-probs."""
    from quantrt.demo_model import default_model_path
    from quantrt.engine.engine import Engine
    from quantrt.layers.linear import QuantLinear
    from tests.helpers_smollm2 import full_logits, kl_rows

    ids = list(range(1000, 1048))
    out = {}
    for native in (True, False):
        if not native:
            monkeypatch.setattr(cpu_ext, "_loaded", False)
            monkeypatch.setattr(cpu_ext, "_reason", "switched off by the test")
        for dtype in ("float32", "bfloat16"):
            eng = Engine(model_path=default_model_path(), dtype=dtype, max_total_tokens=256, random_seed=0)
            try:
                kernels = {m.kernel_desc.split()[0] for m in eng.model.modules()
                           if isinstance(m, QuantLinear) and m.is_quantized}
                assert (kernels == {"cpu_native_int"}) == native, kernels
                assert isinstance(eng.model.tied_head, CpuNativeIntKernel) == native
                out[native, dtype] = torch.log_softmax(full_logits(eng, ids).double(), -1)
            finally:
                eng.shutdown()
    ref = out[False, "float32"]                      # the exact dequantized fp32 path
    diff = float((out[True, "float32"] - ref).abs().max())
    assert diff <= 5e-4, diff                        # fp32: equal up to summation order (measured 6e-5)
    assert torch.equal(out[True, "float32"].argmax(-1), ref.argmax(-1))
    # bf16: ours keeps activations, scales and the Q8_0 head exact in fp32 inside the op, so it is at least
    # as close to fp32 as torch's bf16 path (bf16 activations/scales, per-row int8 head)
    kl_native = float(kl_rows(ref, out[True, "bfloat16"]).mean())
    kl_torch = float(kl_rows(ref, out[False, "bfloat16"]).mean())
    print(f"KL to fp32: native bf16 {kl_native:.5f}, torch bf16 {kl_torch:.5f}")
    assert kl_native <= kl_torch and kl_native < 0.01, (kl_native, kl_torch)


@pytest.mark.slow
def test_portable_scalar_path_vs_float64(tmp_path_factory):
    """csrc/int_gemm.cpp built without -mavx2 (what a CPU without AVX2/FMA/F16C gets) under a test namespace:
    the scalar C++ path must give the same results as the float64 reference. Builds once (~30 s)."""
    from torch.utils import cpp_extension

    src = cpu_ext.CSRC / "int_gemm.cpp"
    cpp_extension.load(name="quantrt_int_gemm_scalar_test", sources=[str(src)],
                       extra_cflags=["-O1", "-DQRT_LIBRARY=quantrt_cpu_scalar"],
                       build_directory=str(tmp_path_factory.mktemp("scalar_ext")), is_python_module=False)
    ns = torch.ops.quantrt_cpu_scalar
    assert ns.int_gemm_simd() == 0
    for bits, kind, group in ((4, "offset", 32), (4, "zero", 64), (8, "sym", 32), (5, "zero", K), (8, "plain", 64)):
        w = _weight(bits, kind, group)
        k = CpuNativeIntKernel.prepare(LinearSpec(w, WEIGHT_ONLY, torch.float32), current_platform())
        for m, dtype in ((1, torch.float32), (3, torch.bfloat16), (20, torch.float32)):
            x = torch.randn(m, K).to(dtype)
            y = ns.int_gemm(x, k.qs, k.scales, k.mins, k.bits, None)
            ref = x.double() @ w.dequantize(torch.float64).T
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            assert err <= (2e-6 if dtype == torch.float32 else 8e-3), (bits, kind, m, dtype, err)
