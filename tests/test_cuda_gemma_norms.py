"""Gemma's (1 + w) RMSNorms in the CUDA platform's norm kernels (`layer_ops.triton_rms_norm` /
`triton_add_rms_norm` with an fp32 weight), its sandwich norms folded into the next add + norm (`PostNormed`,
`pre=`), and which norms take which ops (`RMSNorm.finish_loading`), against RMSNorm's own torch math and float64.

Without a GPU the kernels run in Triton's CPU interpreter (CI); on the GPU machine the same tests run natively.
"""

from __future__ import annotations

import pytest
import torch

from quantrt.platform.interface import DeviceCapability
from quantrt.platforms.cuda.platform import CudaPlatform
from tests._cuda_env import DEV, NEEDS_TRITON
from tests.test_cuda_fused_layer import _row_codes

pytestmark = NEEDS_TRITON


def _here() -> CudaPlatform:
    """The H100's platform, its device this machine's (the interpreter's CPU tensors in CI)."""
    plat = CudaPlatform(capability=DeviceCapability(9, 0), device_name="test")
    plat.device = lambda: torch.device(DEV)
    return plat


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_kernels_make_gemmas_fp32_one_plus_w_norm(dtype) -> None:
    """Gemma's (1 + w) norms hand the kernels an fp32 weight: the fp32 product is rounded once, as
    RMSNorm(offset=True) computes it (equal to its torch math almost everywhere, within one rounding), and within
    the dtype's precision of float64; plain, and with the residual add (s bit-equal to torch's add)."""
    from quantrt.layers.norm import RMSNorm
    from quantrt.platforms.cuda.layer_ops import triton_add_rms_norm, triton_rms_norm

    gen = torch.Generator().manual_seed(3)
    x, delta = ((torch.randn(5, 640, generator=gen) * 4).to(DEV, dtype) for _ in range(2))
    norm = RMSNorm(640, 1e-6, offset=True)
    norm.weight.data = (torch.randn(640, generator=gen) * 0.5).to(DEV)       # scale 1 + w around 1, some < 0
    norm.finish_loading(dtype)                                               # no platform: the torch math
    assert norm._scale.dtype == torch.float32
    y1 = triton_rms_norm(x, norm._scale, norm.eps)
    y2, s = triton_add_rms_norm(x, delta, norm._scale, norm.eps)
    ref_y2, ref_s = norm.add_forward(x, delta)
    assert torch.equal(s, ref_s)
    for got, src, ref in ((y1, x, norm(x)), (y2, ref_s, ref_y2)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, ref, atol=0, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)
        assert (got != ref).float().mean() < 0.02
        sd = src.double().cpu()
        f64 = sd / sd.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + norm.weight.double().cpu())
        assert (got.double().cpu() - f64).abs().max() < 2e-2 * f64.abs().max()
    with pytest.raises(ValueError, match=r"RMSNorm weight torch.float16 must be x's dtype \(torch.bfloat16\) or "
                                         r"float32"):
        triton_rms_norm(x.bfloat16(), norm._scale.half(), 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_rms_norm_makes_the_deltas_own_norm_first(dtype) -> None:
    """Gemma's sandwich (`PostNormed`): pre_ff(x + post_attn(attn)) in one kernel, s bit-equal and y equal to the
    norms run one after the other (the triton norm, then the add + norm), for the fp32 (1 + w) weights with their
    own eps; with codes too; and RMSNorm.add_forward takes that path, or runs the delta's norm first where its op
    does not take it."""
    from quantrt.layers.norm import PostNormed, RMSNorm
    from quantrt.platforms.cuda.layer_ops import triton_add_rms_norm, triton_rms_norm

    gen = torch.Generator().manual_seed(4)
    x, attn = ((torch.randn(3, 384, generator=gen) * 3).to(DEV, dtype) for _ in range(2))
    here = _here()
    post, pre_ff = RMSNorm(384, 1e-6, offset=True), RMSNorm(384, 1e-5, offset=True)
    for n in (post, pre_ff):
        n.weight.data = (torch.randn(384, generator=gen) * 0.3).to(DEV)
        n.finish_loading(dtype, here)
    y, s = triton_add_rms_norm(x, attn, pre_ff._scale, pre_ff.eps, pre=(post._scale, post.eps))
    want_y, want_s = triton_add_rms_norm(x, triton_rms_norm(attn, post._scale, post.eps), pre_ff._scale, pre_ff.eps)
    if dtype == torch.float32:   # natively the two kernels may contract or order the fp32 sums differently
        for got, want in ((s, want_s), (y, want_y)):
            torch.testing.assert_close(got, want, atol=1e-6 * want.abs().max().item(), rtol=0)
    else:
        assert torch.equal(s, want_s) and torch.equal(y, want_y)
    got = pre_ff.add_forward(x, PostNormed(attn, post))
    assert torch.equal(got[0], y) and torch.equal(got[1], s)
    torch_post = RMSNorm(384, 1e-6, offset=True)                            # the torch math: no platform op
    torch_post.weight.data = post.weight.data
    torch_post.finish_loading(dtype)
    y2, s2 = pre_ff.add_forward(x, PostNormed(attn, torch_post))
    ref_s = x + torch_post(attn)
    assert torch.equal(s2, ref_s)
    tol = 2 ** -7 if dtype != torch.float32 else 1e-5                       # of the row's scale: x + delta cancels
    torch.testing.assert_close(s, ref_s, atol=tol * ref_s.abs().max().item(), rtol=0)
    if dtype == torch.bfloat16:
        codes = _row_codes(torch.int8, None)
        q, s3 = triton_add_rms_norm(x, attn, pre_ff._scale, pre_ff.eps, codes, pre=(post._scale, post.eps))
        q_ref, _ = triton_add_rms_norm(x, triton_rms_norm(attn, post._scale, post.eps), pre_ff._scale, pre_ff.eps,
                                       codes)
        assert torch.equal(s3, s) and torch.equal(q.codes.float(), q_ref.codes.float())
        assert torch.equal(q.scale, q_ref.scale)


def test_gemma_norms_take_the_platform_ops_that_say_they_take_fp32_weights() -> None:
    """RMSNorm(offset=True) runs the CUDA norm kernels (which take its fp32 1 + w: `fp32_weight`), not a platform
    op without that promise, never with its own bias; the linears that would make the norm in their own kernel
    (`takes_pending`, plain norms' rounding) are not asked."""
    from quantrt.layers.norm import RMSNorm
    from quantrt.platforms.cuda.layer_ops import triton_add_rms_norm, triton_rms_norm

    here = _here()
    norm = RMSNorm(64, 1e-6, offset=True)
    norm.finish_loading(torch.bfloat16, here)
    assert norm._op is triton_rms_norm and norm._add_op is triton_add_rms_norm

    class Plain:                       # a platform whose ops make only the plain norm (e.g. aiter, the CPU's)
        def device(self):
            return torch.device("cpu")

        def rms_norm_op(self):
            return lambda x, w, eps: x

        fused_add_rms_norm_op = fused_add_rms_norm_codes_op = rms_norm_op

    other = RMSNorm(64, 1e-6, offset=True)
    other.finish_loading(torch.bfloat16, Plain())
    assert other._op is None and other._add_op is None and other._codes_op is None
    plain = RMSNorm(64, 1e-6)
    plain.finish_loading(torch.bfloat16, Plain())
    assert plain._op is not None
    biased = RMSNorm(64, 1e-6, offset=True)
    biased.enable_bias()
    biased.finish_loading(torch.bfloat16, here)
    assert biased._op is None

    class Reader:                      # a linear that would take the norm into its own kernel
        asked = False

        def takes_pending(self, rows, kind):
            Reader.asked = True
            return True

        def row_codes(self, rows):
            return None

    x = torch.randn(2, 64, device=DEV).bfloat16()
    y, s = norm.add_forward(x, x.clone(), Reader())
    assert isinstance(y, torch.Tensor) and not Reader.asked
    torch.testing.assert_close(y, norm(s), atol=0, rtol=0)
