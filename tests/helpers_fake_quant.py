"""Independent definitions of quantization schemes as float64 fake quantization on transformers' Llama.

Used by tests/test_scheme_vs_fake_quant.py (our kernels vs these definitions) and
bench/fake_quant_reference.py (what each scheme costs SmolLM2, with no quantrt code involved).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import transformers.models.llama.modeling_llama as modeling_llama


def fq_rows(x: torch.Tensor, dtype: torch.dtype, group: int | None = None) -> torch.Tensor:
    """Symmetric fake quantization, one scale per last-dim row (or per `group` elements of it), in
    float64, to int8 (scale amax/127, round half to even, clamp +-127) or an fp8 dtype (scale amax/max)."""
    shape = x.shape
    xd = x.double() if group is None else x.double().reshape(*shape[:-1], shape[-1] // group, group)
    amax = xd.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    if dtype == torch.int8:
        s = amax / 127.0
        q = torch.round(xd / s).clamp(-127, 127) * s
    else:
        s = amax / torch.finfo(dtype).max
        q = (xd / s).to(dtype).double() * s
    return q.reshape(shape).to(x.dtype)


def fake_quant_linears(model, weight_dtype: torch.dtype | None, act_dtype: torch.dtype | None,
                       act_group: int | None = None, only: Callable[[str], bool] = lambda n: True) -> list:
    """In place: per-channel weights of every `*_proj` linear accepted by `only`, and a forward pre-hook
    quantizing its input per token (or per token-group). Returns the hook handles."""
    hooks = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not (isinstance(mod, torch.nn.Linear) and name.endswith("_proj") and only(name)):
                continue
            if weight_dtype is not None:
                mod.weight.copy_(fq_rows(mod.weight, weight_dtype))
            if act_dtype is not None:
                hooks.append(mod.register_forward_pre_hook(
                    lambda _m, args: (fq_rows(args[0], act_dtype, act_group),)))
    return hooks


@contextmanager
def fake_quant_kv(model, dtype: torch.dtype, scale: float = 1.0,
                  per_token_head: bool = False) -> Iterator[None]:
    """Round K (after rotary) and V through `dtype`: per-tensor `scale` (the KV-cache scheme) or, for
    comparison, a dynamic amax scale per token and head."""
    hd = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads

    def fq(t: torch.Tensor) -> torch.Tensor:
        # t: K [B, H, T, D] after rotary, or V [B, T, Hkv*D] out of v_proj
        if per_token_head:
            return fq_rows(t.unflatten(-1, (-1, hd)), dtype).flatten(-2)
        return ((t.float() / scale).to(dtype).float() * scale).to(t.dtype)

    orig = modeling_llama.apply_rotary_pos_emb

    def rope(q, k, cos, sin, *a, **kw):
        q, k = orig(q, k, cos, sin, *a, **kw)
        return q, fq(k)

    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda _m, _a, out: fq(out))
             for layer in model.model.layers]
    modeling_llama.apply_rotary_pos_emb = rope
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = orig
        for h in hooks:
            h.remove()
