"""Canonical weights: validation errors, dequantize vs float64 hand computation, concat_n exactness."""

import pytest
import torch

from quantrt.errors import CheckpointError
from quantrt.quant.merge import concat_n, merge_act_schemes
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import (
    ActKind,
    ActScheme,
    CodebookWeight,
    DenseWeight,
    FloatWeight,
    IntWeight,
    MicroWeight,
    ScaleGranularity,
)

E4 = torch.float8_e4m3fn


def _fp8(n: int, k: int) -> torch.Tensor:
    return (torch.randn(n, k) * 50).clamp(-448, 448).to(E4)


def test_int_weight_validation_errors() -> None:
    codes = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(CheckpointError, match="bits=9"):
        IntWeight(codes, torch.ones(4, 2), 9, 4)
    with pytest.raises(CheckpointError, match="group size 3 does not divide K=8"):
        IntWeight(codes, torch.ones(4, 2), 4, 3)
    with pytest.raises(CheckpointError, match=r"scale shape \(4, 3\) != expected \(4, 2\)"):
        IntWeight(codes, torch.ones(4, 3), 4, 4)
    with pytest.raises(CheckpointError, match="not both"):
        IntWeight(codes, torch.ones(4, 2), 4, 4, zero=torch.zeros(4, 2), offset=torch.zeros(4, 2))
    with pytest.raises(CheckpointError, match="g_idx shape"):
        IntWeight(codes, torch.ones(4, 2), 4, 4, g_idx=torch.zeros(7))


def test_float_weight_validation_errors() -> None:
    with pytest.raises(CheckpointError, match="must be an fp8 dtype"):
        FloatWeight(torch.zeros(4, 8), torch.tensor(1.0), ScaleGranularity.TENSOR)
    with pytest.raises(CheckpointError, match=r"channel scale shape \(3,\) != expected \(4,\)"):
        FloatWeight(_fp8(4, 8), torch.ones(3), ScaleGranularity.CHANNEL)
    with pytest.raises(CheckpointError, match="needs block"):
        FloatWeight(_fp8(4, 8), torch.ones(1, 1), ScaleGranularity.BLOCK)
    with pytest.raises(CheckpointError, match=r"block scale shape \(1, 1\) != expected \(2, 1\)"):
        FloatWeight(_fp8(130, 8), torch.ones(1, 1), ScaleGranularity.BLOCK, (128, 128))


def test_other_weight_validation_errors() -> None:
    with pytest.raises(CheckpointError, match="fp4 scale shape"):
        MicroWeight(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 3), 16)
    with pytest.raises(CheckpointError, match="absmax has 3 entries; expected 2"):
        CodebookWeight(torch.zeros(2, 64, dtype=torch.uint8), torch.zeros(16), torch.ones(3), 64)


def test_dequantize_matches_float64_hand_computation() -> None:
    torch.manual_seed(0)
    # IntWeight, uint4 with zero point, group 4
    codes = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    scale, zero = torch.rand(3, 2) + 0.1, torch.randint(0, 16, (3, 2))
    iw = IntWeight(codes, scale, 4, 4, zero=zero)
    want = torch.empty(3, 8, dtype=torch.float64)
    for n in range(3):
        for k in range(8):
            want[n, k] = (float(codes[n, k]) - float(zero[n, k // 4])) * float(scale[n, k // 4])
    torch.testing.assert_close(iw.dequantize(torch.float64), want, rtol=1e-6, atol=1e-6)
    # FloatWeight block 2x4 with partial blocks (N=3, K=6)
    data = _fp8(3, 6)
    bs = torch.rand(2, 2) + 0.5
    fw = FloatWeight(data, bs, ScaleGranularity.BLOCK, (2, 4))
    want = torch.empty(3, 6, dtype=torch.float64)
    for n in range(3):
        for k in range(6):
            want[n, k] = float(data[n, k].float()) * float(bs[n // 2, k // 4])
    torch.testing.assert_close(fw.dequantize(torch.float64), want, rtol=1e-6, atol=0)


def _assert_concat_exact(ws: list) -> None:
    merged = concat_n(ws)
    assert merged is not None
    assert torch.equal(merged.dequantize(), torch.cat([w.dequantize() for w in ws]))


def test_concat_dense_and_float() -> None:
    _assert_concat_exact([DenseWeight(torch.randn(4, 8)), DenseWeight(torch.randn(2, 8))])
    # per-tensor, same scale -> stays TENSOR
    d1, d2 = _fp8(4, 8), _fp8(2, 8)
    same = [FloatWeight(d1, torch.tensor(0.5), ScaleGranularity.TENSOR),
            FloatWeight(d2, torch.tensor(0.5), ScaleGranularity.TENSOR)]
    assert concat_n(same).granularity is ScaleGranularity.TENSOR
    _assert_concat_exact(same)
    # per-tensor, different scales -> exact per-channel expansion
    diff = [FloatWeight(d1, torch.tensor(0.5), ScaleGranularity.TENSOR),
            FloatWeight(d2, torch.tensor(0.031), ScaleGranularity.TENSOR)]
    m = concat_n(diff)
    assert m.granularity is ScaleGranularity.CHANNEL and m.scale.shape == (6,)
    _assert_concat_exact(diff)
    # channel + tensor
    _assert_concat_exact([quantize_fp8(torch.randn(4, 8), "channel"), diff[1]])


def test_concat_block() -> None:
    w = [quantize_fp8(torch.randn(n, 260), "block", (128, 128)) for n in (256, 128, 128)]
    _assert_concat_exact(w)
    odd = [quantize_fp8(torch.randn(n, 260), "block", (128, 128)) for n in (256, 100)]
    assert concat_n(odd) is None  # the 100-row shard's block would straddle into the next shard
    assert concat_n([w[0], quantize_fp8(torch.randn(4, 260), "channel")]) is None


def test_concat_int() -> None:
    def iw(n: int, g_idx: torch.Tensor | None = None, zero: bool = True, bits: int = 4) -> IntWeight:
        z = torch.randint(0, 16, (n, 2), dtype=torch.uint8) if zero else None
        return IntWeight(torch.randint(0, 16, (n, 8), dtype=torch.uint8), torch.rand(n, 2), bits, 4,
                         zero=z, g_idx=g_idx)
    _assert_concat_exact([iw(3), iw(5)])
    gi = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    _assert_concat_exact([iw(3, gi), iw(5, gi.clone())])
    assert concat_n([iw(3, gi), iw(5, gi.flip(0))]) is None
    assert concat_n([iw(3, gi), iw(5)]) is None
    assert concat_n([iw(3), iw(5, zero=False)]) is None
    assert concat_n([iw(3), iw(5, bits=8)]) is None


def test_concat_micro_codebook_mixed() -> None:
    mw = [MicroWeight(torch.randint(0, 16, (n, 32), dtype=torch.uint8), torch.rand(n, 2), 16,
                      torch.tensor(2.0)) for n in (2, 3)]
    _assert_concat_exact(mw)
    cb = torch.linspace(-1, 1, 16)
    cw = [CodebookWeight(torch.randint(0, 16, (n, 64), dtype=torch.uint8), cb, torch.rand(n), 64)
          for n in (2, 3)]
    _assert_concat_exact(cw)
    assert concat_n([DenseWeight(torch.randn(2, 32)), mw[0]]) is None


def test_merge_act_schemes() -> None:
    tok = ActScheme(ActKind.DYNAMIC_TOKEN, E4)
    assert merge_act_schemes([tok, ActScheme(ActKind.DYNAMIC_TOKEN, E4)]) is tok
    assert merge_act_schemes([tok, ActScheme(ActKind.DYNAMIC_TOKEN, torch.int8)]) is None
    s = [ActScheme(ActKind.STATIC_TENSOR, E4, scale=torch.tensor(v)) for v in (0.5, 2.0, 1.0)]
    m = merge_act_schemes(s)
    assert m.kind is ActKind.STATIC_TENSOR and m.scale.item() == 2.0
