"""The M = 1 W8A8 / fp8 weight-only GEMV on the dense-GEMV structure (`gemv_w8.gemv_w8`) and its dispatch in
`TritonW8A8Kernel`, vs a float64 quantize-then-matmul reference (activation codes and scales from
`quant.quantize`, times the dequantized weight in float64).

Under TRITON_INTERPRET=1 (no GPU): int8 W8A8 and fp8 weight-only at tiny shapes, with and without split-K (Triton
3.6's interpreter does not round fp32 -> fp8 to nearest, so fp8-activation cases run natively only). Natively
(`-m accelerator`): every scheme at the Llama-3.1-8B shapes, both widening paths (inline PTX and Triton casts),
and every fp8 / int8 code through the inline-PTX widening.
"""

from __future__ import annotations

import pytest
import torch

from quantrt.quant.kernel import LinearSpec
from quantrt.quant.quantize import fake_quantize_act, quantize_fp8
from quantrt.quant.weights import ActKind, ActScheme, IntWeight
from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM
from tests.test_cuda_kernels import rel_err

pytestmark = NEEDS_TRITON
FP8 = torch.float8_e4m3fn
NATIVE = DEV == "cuda"
LLAMA = [(8192, 8192), (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N)


def _spec(scheme: str, n: int, k: int, seed: int, gran: str = "channel") -> LinearSpec:
    """scheme: tok (fp8 per token), grp (fp8 128x128 blocks x 128-groups), static (fp8 static tensor), wo (fp8
    weight-only), i8 / i8s (int8 per channel x per token / static tensor). Random weights made on DEV."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    if scheme.startswith("i8"):
        codes = torch.randint(-127, 128, (n, k), generator=gen, device=DEV, dtype=torch.int8)
        w = IntWeight(codes, torch.rand(n, 1, generator=gen, device=DEV) * 0.01 + 1e-3, 8, k)
        act = (ActScheme(ActKind.STATIC_TENSOR, torch.int8, scale=torch.tensor(0.03)) if scheme == "i8s"
               else ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8))
        return LinearSpec(w, act, torch.bfloat16)
    if scheme == "grp":
        gran = "block"
    w = quantize_fp8(torch.randn(n, k, generator=gen, device=DEV), gran, (128, 128) if gran == "block" else None)
    act = {"tok": ActScheme(ActKind.DYNAMIC_TOKEN, FP8), "grp": ActScheme(ActKind.DYNAMIC_GROUP, FP8, group=128),
           "static": ActScheme(ActKind.STATIC_TENSOR, FP8, scale=torch.tensor(0.02)), "wo": ActScheme()}[scheme]
    return LinearSpec(w, act, torch.bfloat16)


def _x(k: int, seed: int, mul: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(device=DEV).manual_seed(seed + 1)
    return (torch.randn(1, k, generator=gen, device=DEV) * mul).to(torch.bfloat16)


def _ref64(spec: LinearSpec, x: torch.Tensor) -> torch.Tensor:
    """float64 (x quantized as `fake_quantize_act`) @ dequantized weight^T."""
    return fake_quantize_act(x, spec.act).double() @ spec.weight.dequantize().double().t()


def _kernel(spec: LinearSpec):
    from quantrt.platforms.cuda.kernels.w8a8 import TritonW8A8Kernel

    ok, why = TritonW8A8Kernel.can_implement(spec, PLATFORM)
    assert ok, why
    return TritonW8A8Kernel.prepare(spec, PLATFORM)


def _gemv(kern, x, cfg=None):
    from quantrt.platforms.cuda.kernels.gemv_w8 import gemv_w8

    return gemv_w8(x, kern.data, kern.w_scale, kern.act, kern.wscale, kern.qmax, kern.act_scale, cfg)



@pytest.mark.parametrize("scheme,gran", [("i8", None), ("i8s", None), ("wo", "tensor"), ("wo", "channel"),
                                         ("wo", "block")])
@pytest.mark.parametrize("waves", [2, 64])  # 64 programs per SM: split K (several K slices summed in-launch)
def test_gemv_w8_tiny_matches_float64(scheme, gran, waves):
    from quantrt.platforms.cuda.kernels.gemv_w8 import GemvW8Config

    spec = _spec(scheme, 144, 512, waves, gran or "channel")                 # N: 9 tiles of 16
    kern = _kernel(spec)
    x = _x(512, waves, 2.0)
    y = _gemv(kern, x, GemvW8Config(16, 128, waves, 4, 1 if NATIVE else 0, 256))
    assert y.shape == (1, 144) and y.dtype == torch.bfloat16
    assert rel_err(y, _ref64(spec, x)) < 5e-3


def test_gemv_w8_tiles_env_overrides_entries_and_names_a_bad_one(monkeypatch):
    """QUANTRT_CUDA_GEMV_W8_TILES (A/B runs) replaces the named (scheme, K, N) entries only; a malformed entry is
    an error that shows the expected form."""
    from quantrt.platforms.cuda.kernels.gemv_w8 import gemv_w8_config

    plain = gemv_w8_config(4096, 14336, 0, 1)
    monkeypatch.setenv("QUANTRT_CUDA_GEMV_W8_TILES", "tok:18944:3584=8:2048:8+i8:4096:4096=32:256:8")
    tile = lambda c: (c.block_n, c.block_k, c.num_warps)                     # noqa: E731
    assert tile(gemv_w8_config(3584, 18944, 0, 1)) == (8, 512, 8)             # block_k shortened to divide K
    assert tile(gemv_w8_config(4096, 4096, 0, 1, True)) == (32, 256, 8)
    assert tile(gemv_w8_config(4096, 4096, 0, 1)) == (8, 2048, 8)             # tok keeps its entry
    assert gemv_w8_config(4096, 14336, 0, 1) == plain
    for bad in ("tok:18944:3584=16:512", "fp8:4096:4096=8:1024:4", "tok:4096=8:1024:4", "tok:4096:4096=8:x:4"):
        monkeypatch.setenv("QUANTRT_CUDA_GEMV_W8_TILES", bad)
        with pytest.raises(ValueError, match=r"QUANTRT_CUDA_GEMV_W8_TILES entry .* is not "
                                             r"'tok\|blk\|wo\|i8:K:N=block_n:block_k:warps'"):
            gemv_w8_config(4096, 4096, 0, 1)


def test_gemv_w8_ragged_n_and_dispatch():
    """N not a multiple of the row tile: the clamped rows are not stored; the dispatch picks the GEMV at M = 1."""
    spec = _spec("i8", 100, 256, 3)
    kern = _kernel(spec)
    assert kern._gemv_why() == ""
    x = _x(256, 3)
    assert rel_err(kern.apply(x, None), _ref64(spec, x)) < 5e-3


def test_gemv_w8_rejections_name_the_problem():
    """Shapes the GEMV cannot take say why (the dispatch then keeps `skinny_fp8`, still correct)."""
    from quantrt.platforms.cuda.kernels.gemv_w8 import GemvW8Config, gemv_w8_why_not

    spec = _spec("wo", 32, 1100, 4)                                           # K = 1100: not a multiple of 64
    kern = _kernel(spec)
    assert "K=1100 is not a multiple of 64" in kern._gemv_why()
    x = _x(1100, 4)
    assert rel_err(kern.apply(x, None), _ref64(spec, x)) < 5e-3
    assert "block_n dividing 128" in gemv_w8_why_not(256, 256, 1, 2, False, GemvW8Config(48, 128))
    assert "block_k=512" in gemv_w8_why_not(256, 768, 3, 1, False, GemvW8Config(16, 512))
    with pytest.raises(ValueError, match="M=2"):
        _gemv(_kernel(_spec("i8", 32, 256, 5)), torch.randn(2, 256).to(DEV, torch.bfloat16))


# ---- native (the H100): fp8 activations, Llama shapes, the inline-PTX widening ---------------------------------

@pytest.mark.accelerator
@pytest.mark.parametrize("k,n", LLAMA)
@pytest.mark.parametrize("scheme", ["tok", "grp", "wo", "i8"])
def test_gemv_w8_llama_shapes_native(k, n, scheme):
    """The dispatch at M = 1 (the GEMV, the committed tile) for every scheme and Llama shape vs float64; the x
    outlier in the last K step sets the per-token / last-group amax."""
    spec = _spec(scheme, n, k, k + n)
    kern = _kernel(spec)
    assert kern._gemv_why() == ""
    x = _x(k, k + n)
    x[0, k - 3] = -40.0
    assert rel_err(kern.apply(x, None), _ref64(spec, x)) < 1e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("scheme,gran,widen,waves", [
    ("tok", "tensor", 1, 2), ("tok", "channel", 1, 2), ("static", "tensor", 1, 2), ("grp", None, 1, 2),
    ("wo", "block", 1, 2), ("i8", None, 1, 2), ("i8s", None, 1, 2),                   # inline PTX / dp4a
    ("tok", "channel", 0, 32), ("grp", None, 1, 32), ("i8", None, 1, 32),             # split K
    ("i8", None, 0, 2), ("wo", "block", 0, 2)])                                       # Triton's casts
def test_gemv_w8_modes_native(scheme, gran, widen, waves):
    """Every mode with the inline PTX (fp8 widening, int8 dp4a) and Triton's casts, unsplit and split-K."""
    from quantrt.platforms.cuda.kernels.gemv_w8 import GemvW8Config

    spec = _spec(scheme, 1024, 2048, widen + waves, gran or "channel")
    kern = _kernel(spec)
    x = _x(2048, widen + waves)
    y = _gemv(kern, x, GemvW8Config(16, 512, waves, 8, widen, 1024))
    assert rel_err(y, _ref64(spec, x)) < 1e-2


@pytest.mark.accelerator
@pytest.mark.parametrize("dtype", [FP8, torch.int8])
def test_inline_widening_every_code_native(dtype):
    """Row r holds code r in every column (fp8: the 254 finite codes; int8: -128..127); x = 1 over 1024 columns,
    weight-only, scale 1: y[r] must be exactly 1024 * value(code r) (bf16-rounded), both widening paths."""
    from quantrt.platforms.cuda.kernels.gemv_w8 import GemvW8Config, gemv_w8

    bits = torch.arange(256, dtype=torch.int32)
    if dtype == FP8:
        bits = bits[(bits & 0x7F) != 0x7F]                                     # drop the two NaN codes
    codes = bits.to(torch.uint8).view(dtype)                                  # [R]
    w = codes[:, None].expand(-1, 1024).contiguous().to(DEV)
    x = torch.ones(1, 1024, device=DEV, dtype=torch.bfloat16)
    want = (codes.to(torch.float64) * 1024).to(torch.bfloat16).to(DEV)
    for widen in (0, 1):
        y = gemv_w8(x, w, torch.ones(1, device=DEV), 3, 0, 1.0, None, GemvW8Config(16, 256, 2, 4, widen, 1024))
        assert torch.equal(y[0], want), widen


@pytest.mark.accelerator
def test_int8_dp4a_extreme_codes_native():
    """dp4a with signed extremes: weight codes -128 / 127 / -127 and activation codes +-127 (x at +-amax) and
    -85, summed exactly in int32 (|sum| up to 2048 * 128 * 127)."""
    from quantrt.platforms.cuda.kernels.gemv_w8 import GemvW8Config, gemv_w8
    from quantrt.quant.quantize import quantize_act_per_token

    k = 2048
    w = torch.full((48, k), 127, dtype=torch.int8, device=DEV)
    w[16:32] = -128
    w[32:, 1::2] = -127
    x = torch.full((1, k), 3.0, device=DEV, dtype=torch.bfloat16)
    x[0, k // 2:] = -2.0
    x[0, 5] = -3.0
    y = gemv_w8(x, w, torch.ones(48, device=DEV), 0, 1, 127.0, None, GemvW8Config(16, 512, 2, 4, 1, 1024))
    q, sx = quantize_act_per_token(x, torch.int8)
    ref = (q.double() * sx.double()) @ w.double().t()
    assert rel_err(y, ref) < 4e-3
