"""GGUF linears on the CUDA W4A16/W8A16 kernels against the `gguf` package's own dequantization.

Random blocks of every GGML type quantrt decodes into an `IntWeight` (Q4_0 ... Q8_0, Q2_K ... Q6_K: symmetric,
float offsets (mins), 16- and 32-row groups) go through `TritonWNA16Kernel` at every path of its dispatch (the
GEMV at one row, tensor-core tiles with multi-group K steps, dequantize + GEMM above 256 rows) and are compared
with x @ gguf.quants.dequantize(raw) in float64. Under TRITON_INTERPRET=1 at a small shape; `-m accelerator` at a
Llama-sized one natively.
"""

from __future__ import annotations

import gguf
import pytest
import torch

from quantrt.quant.formats.gguf_blocks import decode_blocks
from quantrt.quant.kernel import LinearSpec
from quantrt.quant.weights import WEIGHT_ONLY, IntWeight
from tests._cuda_env import DEV, NEEDS_TRITON, PLATFORM
from tests.test_gguf_native import FP16_AT, random_blocks

pytestmark = NEEDS_TRITON

# the GGML types quantrt decodes into an IntWeight (IQ4_NL is a codebook weight)
INT_TYPES = sorted(t for t in FP16_AT if t != "IQ4_NL")


def _run(name: str, n: int, k: int, m: int, seed: int) -> tuple[float, object]:
    from quantrt.platforms.cuda.kernels import TritonWNA16Kernel

    raw = random_blocks(name, seed, n, k)
    qw = decode_blocks(torch.from_numpy(raw), name, (n, k))
    assert isinstance(qw, IntWeight)
    qw = IntWeight(qw.codes.to(DEV), qw.scale.to(DEV), qw.bits, qw.group_size,
                   zero=None if qw.zero is None else qw.zero.to(DEV),
                   offset=None if qw.offset is None else qw.offset.to(DEV))
    spec = LinearSpec(qw, WEIGHT_ONLY, torch.bfloat16)
    ok, why = TritonWNA16Kernel.can_implement(spec, PLATFORM)
    assert ok, why
    kern = TritonWNA16Kernel.prepare(spec, PLATFORM)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    y = kern.apply(x.to(DEV), None).double().cpu()
    ref = x.double() @ torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])).double().t()
    return float((y - ref).norm() / ref.norm()), kern


@pytest.mark.parametrize("name", INT_TYPES)
@pytest.mark.parametrize("m", [1, 7, 70])
def test_gguf_types_on_the_cuda_kernels(name, m):
    err, kern = _run(name, 48, 512, m, m)
    assert err < 1e-2, (name, m, err)
    assert kern.raw_offset == (name in ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"))


@pytest.mark.accelerator
@pytest.mark.parametrize("name", INT_TYPES)
@pytest.mark.parametrize("m", [1, 2, 16, 64, 300])
def test_gguf_types_on_the_cuda_kernels_native(name, m):
    err, _ = _run(name, 4096, 4096, m, m)
    assert err < 1e-2, (name, m, err)
