"""GGUF blocks decoded natively: bit-exact against gguf.quants.dequantize for every supported type
(random blocks, and blocks from the gguf package's own quantizer), bad inputs, and kernel choice."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quantrt.errors import CheckpointError, NotSupportedYet
from quantrt.platform.resolve import current_platform
from quantrt.platforms.xpu import cpu_ext
from quantrt.quant.format import get_format
from quantrt.quant.formats.gguf_blocks import BLOCKS, decode_blocks
from quantrt.quant.kernel import LinearSpec, select_linear_kernel
from quantrt.quant.weights import WEIGHT_ONLY

# byte offsets of the fp16 fields in each block (random bytes there could be NaN/inf)
FP16_AT = {"Q4_0": [0], "IQ4_NL": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
           "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
N, K = 16, 512


def random_blocks(name: str, seed: int = 0, n: int = N, k: int = K) -> np.ndarray:
    """[n, k / block elements * block bytes] uint8: random GGML blocks of `name` with finite fp16 fields."""
    be, bb = BLOCKS[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // be, bb), dtype=np.uint8)
    for o in FP16_AT[name]:
        raw[..., o:o + 2] = (rng.standard_normal((n, k // be, 1)) * 0.02).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_decode_bit_exact(name):
    raw = random_blocks(name)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]))
    assert torch.equal(decode_blocks(torch.from_numpy(raw), name, (N, K)).dequantize(), ref)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_gguf_quantizer_blocks(name):
    w = np.random.default_rng(1).standard_normal((N, K)).astype(np.float32)
    qt = gguf.GGMLQuantizationType[name]
    raw = gguf.quants.quantize(w, qt)
    fmt = get_format("gguf").from_config({})
    qw = fmt.make_weight("l", {"qweight": torch.from_numpy(raw), "qweight_type": torch.tensor(int(qt))}, (N, K))
    assert torch.equal(qw.dequantize(), torch.from_numpy(gguf.quants.dequantize(raw, qt)))


INT4 = "cpu_native_int" if cpu_ext.load() else "cpu_int4_packed"   # the native extension goes first


@pytest.mark.parametrize("name,kernel", [("Q4_0", INT4), ("Q4_1", INT4),
                                         ("Q4_K", INT4), ("IQ4_NL", "cpu_codebook_dequant_once")])
def test_kernel_choice_bf16(name, kernel):
    qw = decode_blocks(torch.from_numpy(random_blocks(name)), name, (N, K))
    spec = LinearSpec(qw, WEIGHT_ONLY, torch.bfloat16)
    choice = select_linear_kernel(spec, current_platform())
    assert choice.kernel.name == kernel, choice.explain()
    x = torch.randn(2, K)
    y = choice.kernel.prepare(spec, current_platform()).apply(x.bfloat16(), None).float()
    ref = x @ qw.dequantize().t()
    assert float((y - ref).norm() / ref.norm()) < 1e-2


def test_float_linear_stays_dense_and_bad_inputs():
    fmt = get_format("gguf").from_config({})
    w = torch.randn(N, K)
    dense = fmt.make_weight("l", {"weight": w, "qweight_type": torch.tensor(0)}, (N, K))
    assert torch.equal(dense.dequantize(), w)
    with pytest.raises(CheckpointError, match="unknown GGML type id 999"):
        fmt.make_weight("l", {"qweight": torch.zeros(1), "qweight_type": torch.tensor(999)}, (N, K))
    with pytest.raises(NotSupportedYet, match="IQ2_XXS is not supported natively"):
        fmt.make_weight("l", {"qweight": torch.zeros(1), "qweight_type": torch.tensor(16)}, (N, K))
    raw = torch.from_numpy(random_blocks("Q4_0"))[:, :-18]
    with pytest.raises(CheckpointError, match="bytes, expected"):
        fmt.make_weight("l", {"qweight": raw, "qweight_type": torch.tensor(2)}, (N, K))
    with pytest.raises(CheckpointError, match="not a multiple of the 256-element block"):
        decode_blocks(torch.zeros(N, 144, dtype=torch.uint8), "Q4_K", (N, 320))
