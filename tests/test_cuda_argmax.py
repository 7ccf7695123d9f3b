"""`argmax_triton.row_argmax` (the decode graphs' greedy tokens) against torch.argmax: first index of the maximum,
NaN above everything, +-0 equal, -inf rows, several chunks per row (the last program combines). Triton's
interpreter without a GPU (small blocks, so rows split into many chunks); `-m accelerator` at the Llama vocab."""

from __future__ import annotations

import pytest
import torch

from tests._cuda_env import DEV, NEEDS_TRITON

pytestmark = NEEDS_TRITON


def _cases(v: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(v)
    x = torch.randn(9, v, generator=g)
    x[1, [5, v // 2, v - 1]] = 7.0                       # ties across chunks: the first wins
    x[2, v - 1] = 9.0                                     # the last element
    x[3, [3, v // 3]] = float("nan")                      # NaN wins, the first one
    x[4] = float("-inf")                                  # all -inf: index 0
    x[5] = 0.0
    x[5, : v // 2] = -0.0                                 # +-0 are equal: index 0
    x[6, v // 4] = float("inf")
    x[6, v // 2] = float("nan")
    x[7] = -torch.rand(v, generator=g) - 1.0              # all negative
    x[8, 0] = 3.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("v,block", [(1000, 64), (4099, 128), (64, 1024)])
def test_row_argmax_equals_torch(dtype, v, block):
    from quantrt.platforms.cuda.kernels.argmax_triton import row_argmax

    x = _cases(v, dtype).to(DEV)
    assert torch.equal(row_argmax(x, block=block), torch.argmax(x, dim=-1))
    assert torch.equal(row_argmax(x, block=block), torch.argmax(x, dim=-1))   # counters were reset
    out = torch.full((9,), -1, dtype=torch.int64, device=DEV)
    assert row_argmax(x[:, :-1], out=out, block=block) is out                  # strided rows
    assert torch.equal(out, torch.argmax(x[:, :-1], dim=-1))


def test_row_argmax_rejects_bad_shapes():
    from quantrt.platforms.cuda.kernels.argmax_triton import row_argmax

    with pytest.raises(ValueError, match=r"row_argmax takes logits \[B, V\] with V > 0, got \(3, 0\)"):
        row_argmax(torch.zeros(3, 0, device=DEV))
    with pytest.raises(ValueError, match=r"got \(5,\)"):
        row_argmax(torch.zeros(5, device=DEV))


@pytest.mark.accelerator
@pytest.mark.parametrize("b", [1, 7, 64])
def test_row_argmax_llama_vocab_native(b):
    from quantrt.platforms.cuda.kernels.argmax_triton import row_argmax

    x = (torch.randn(b, 128256, device="cuda") * 3).bfloat16()     # bf16: many exact ties at the top
    x[0, 100000] = float("nan") if b > 1 else x[0, 100000]
    assert torch.equal(row_argmax(x), torch.argmax(x, dim=-1))
