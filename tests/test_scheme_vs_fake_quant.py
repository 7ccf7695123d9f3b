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
import transformers.models.llama.modeling_llama as modeling_llama

from quantrt.engine.engine import Engine

IDS = list(range(5, 45))


def _fq_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric fake quantization with one scale per last-dim row, in float64: int8 or an fp8 dtype."""
    xd = x.double()
    amax = xd.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    if dtype == torch.int8:
        s = amax / 127.0
        return (torch.round(xd / s).clamp(-127, 127) * s).to(x.dtype)
    s = amax / torch.finfo(dtype).max
    return ((xd / s).to(dtype).double() * s).to(x.dtype)


def _quantized_reference(hf_model, dtype: torch.dtype):
    """A copy of `hf_model` with fake-quantized weights and per-token activation hooks."""
    ref = type(hf_model)(hf_model.config).eval()
    ref.load_state_dict(hf_model.state_dict())
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith("_proj"):
                mod.weight.copy_(_fq_rows(mod.weight, dtype))
                mod.register_forward_pre_hook(lambda _m, args: (_fq_rows(args[0], dtype),))
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
    worst = 0.0
    for pos, tops in enumerate(out["meta_info"]["input_top_logprobs"][1:]):
        ours = torch.full_like(ref_logprobs[pos], float("nan"))
        for lp, tok, _ in tops:
            ours[tok] = lp
        worst = max(worst, float((ours - ref_logprobs[pos]).abs().max()))
    return worst


@pytest.mark.parametrize(("method", "dtype"), [("w8a8_int8", torch.int8), ("w8a8_fp8", torch.float8_e4m3fn)])
def test_w8a8_equals_float64_fake_quant_in_transformers(tiny_models, method, dtype):
    path, hf = tiny_models["llama"]
    ref = _logprobs(_quantized_reference(hf, dtype), IDS)
    moved = float((ref - _logprobs(hf, IDS)).abs().max())
    diff = _max_diff_to_engine(ref, model_path=str(path), quantization=method)
    # fp8 activations: a value exactly between two fp8 codes may round differently after the fp32
    # (ours) vs float64 (reference) division by the scale; int8 rounding is far coarser than that.
    print(method, diff, moved)
    assert diff < 2e-3 if dtype == torch.int8 else diff < 5e-3, (diff, moved)
    assert moved > 10 * diff, (diff, moved)


@pytest.fixture
def fp8_kv_reference(monkeypatch):
    """Patch transformers' Llama so K (after rotary) and V are rounded through `state['dtype']`."""
    state: dict[str, torch.dtype | None] = {"dtype": None}
    orig = modeling_llama.apply_rotary_pos_emb

    def rope(q, k, cos, sin, *a, **kw):
        q, k = orig(q, k, cos, sin, *a, **kw)
        dt = state["dtype"]
        return q, (k if dt is None else k.to(dt).to(k.dtype))

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", rope)
    return state


@pytest.mark.parametrize(("kv", "dtype"), [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_kv_cache_equals_fake_quant_kv_in_transformers(tiny_models, fp8_kv_reference, kv, dtype):
    path, hf = tiny_models["llama"]
    ref = type(hf)(hf.config).eval()
    ref.load_state_dict(hf.state_dict())
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda _m, _a, out: out.to(dtype).to(out.dtype))
             for layer in ref.model.layers]
    fp32 = _logprobs(hf, IDS)
    fp8_kv_reference["dtype"] = dtype
    try:
        want = _logprobs(ref, IDS)
        moved = float((want - fp32).abs().max())
        diff = _max_diff_to_engine(want, model_path=str(path), kv_cache_dtype=kv)
    finally:
        for h in hooks:
            h.remove()
    assert diff < 1e-4, (diff, moved)
    assert moved > 10 * diff, (diff, moved)
