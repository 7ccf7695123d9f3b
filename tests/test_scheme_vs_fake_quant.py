"""Our W8A8 and fp8-KV paths against an independent definition of the same schemes.

The reference is transformers' own Llama with float64 fake quantization inserted by hooks: per-output-
channel symmetric weights, per-token symmetric dynamic activations on the input of every `*_proj`
linear (W8A8), and K (after rotary) / V rounded to fp8 with a per-tensor scale of 1.0 (KV cache). If
our kernels, activation quantizers or KV pages implemented anything other than the named scheme, the
prompt log-probabilities would drift from this reference by far more than float rounding; each test
also checks that the scheme itself moves the model by much more than the tolerance (so it can fail).
"""

from __future__ import annotations

import pytest
import torch

from quantrt.engine.engine import Engine
from tests.helpers_fake_quant import fake_quant_kv, fake_quant_linears
from tests.helpers_models import dense_prompt_logprobs

IDS = list(range(5, 45))


def _copy(hf_model):
    ref = type(hf_model)(hf_model.config).eval()
    ref.load_state_dict(hf_model.state_dict())
    return ref


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V] float64 log-probabilities of the next token at positions 0..len-2."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)


def _max_diff_to_engine(ref_logprobs: torch.Tensor, **engine_kw) -> float:
    """Largest |log p| difference over every prompt position and vocabulary entry."""
    eng = Engine(max_total_tokens=1024, **engine_kw)
    try:
        out = eng.generate(input_ids=IDS, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                           logprob_start_len=0, top_logprobs_num=eng.config.vocab_size)
    finally:
        eng.shutdown()
    ours = dense_prompt_logprobs(out, ref_logprobs.shape[-1])
    return float((ours - ref_logprobs[: len(ours)]).abs().max())


@pytest.mark.parametrize(("method", "dtype"), [("w8a8_int8", torch.int8), ("w8a8_fp8", torch.float8_e4m3fn)])
def test_w8a8_equals_float64_fake_quant_in_transformers(tiny_models, method, dtype):
    path, hf = tiny_models["llama"]
    ref_model = _copy(hf)
    fake_quant_linears(ref_model, dtype, dtype)
    ref = _logprobs(ref_model, IDS)
    moved = float((ref - _logprobs(hf, IDS)).abs().max())
    diff = _max_diff_to_engine(ref, model_path=str(path), quantization=method)
    # fp8 activations: a value exactly between two fp8 codes may round differently after the fp32
    # (ours) vs float64 (reference) division by the scale; int8 rounding is far coarser than that.
    print(method, diff, moved)
    assert diff < 2e-3 if dtype == torch.int8 else diff < 5e-3, (diff, moved)
    assert moved > 10 * diff, (diff, moved)


@pytest.mark.parametrize(("kv", "dtype"), [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_kv_cache_equals_fake_quant_kv_in_transformers(tiny_models, kv, dtype):
    path, hf = tiny_models["llama"]
    ref = _copy(hf)
    with fake_quant_kv(ref, dtype):
        want = _logprobs(ref, IDS)
    moved = float((want - _logprobs(hf, IDS)).abs().max())
    diff = _max_diff_to_engine(want, model_path=str(path), kv_cache_dtype=kv)
    assert diff < 1e-4, (diff, moved)
    assert moved > 10 * diff, (diff, moved)
