"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of compressed latents.

Per token the cache holds one row [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)], already
normalised (kv_a_layernorm) and rotated: that single "head" is the whole KV cost of MLA, stored in
the KV pool's K buffer (a pool without V, engine/kv_pool.KVGeometry has_v=False), quantized like any
K row (fp8 bits, or fp4 codes + block-16 scales) with the layer's k_scale.

Two equal ways to compute attention from the latents (W_UK, W_UV: the key/value halves of kv_b_proj):
- extend (prefill, chunks, prefix reuse): decompress every cached latent through kv_b_proj into
  per-head k_nope and v, then ordinary attention over [k_nope | k_pe];
- decode: absorbed — q_nope goes through W_UK into latent space, scores are q_lat.c_kv + q_pe.k_pe
  against the latent rows (one KV head shared by all query heads), the output leaves latent space
  through W_UV. Nothing is decompressed per step.

Rope covers the qk_rope_head_dim part only. DeepSeek's rope pairs adjacent dimensions (x0, x1),
(x2, x3) ... (`rope_interleave`, always on in V2); it equals the rotate-half rope applied to the
de-interleaved vector, and q and k are permuted alike, so dot products are unchanged.
Softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 for yarn (DeepSeek's rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from quantrt.engine.forward_batch import ForwardBatch
from quantrt.errors import ConfigError
from quantrt.layers.attention import PagedAttention
from quantrt.layers.linear import QuantLinear
from quantrt.layers.norm import RMSNorm
from quantrt.layers.rotary import RotaryEmbedding

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


def mla_softmax_scale(c: PretrainedConfig) -> float:
    """qk_head_dim^-0.5, times mscale^2 with mscale = 0.1 * mscale_all_dim * ln(factor) + 1 when a
    non-default rope scaling sets mscale_all_dim (and factor > 1)."""
    scale = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5
    params = getattr(c, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        factor = params["factor"]
        m = 1.0 if factor <= 1 else 0.1 * params["mscale_all_dim"] * math.log(factor) + 1.0
        scale *= m * m
    return scale


def check_mla_config(c: PretrainedConfig) -> None:
    """Clear errors for MLA fields a DeepSeek config must carry."""
    need = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    bad = [f"{n}={getattr(c, n, None)!r}" for n in need
           if not isinstance(getattr(c, n, None), int) or getattr(c, n) <= 0]
    if bad:
        raise ConfigError(f"MLA attention needs positive integers {', '.join(need)}; got {', '.join(bad)}")
    if c.qk_rope_head_dim % 2:
        raise ConfigError(f"MLA qk_rope_head_dim must be even (rope rotates pairs), got {c.qk_rope_head_dim}")
    q = getattr(c, "q_lora_rank", None)
    if q is not None and (not isinstance(q, int) or q <= 0):
        raise ConfigError(f"MLA q_lora_rank must be a positive integer or null (direct q_proj), got {q!r}")


class MLAPagedAttention(PagedAttention):
    """The paged core: one latent "KV head" of width kv_lora_rank + rope per token. k_scale scales the
    latent row of a quantized cache (v_scale is unused: there is no V)."""

    def __init__(self, layer_id: int, num_heads: int, kv_lora_rank: int, rope_dim: int, scale: float):
        super().__init__(layer_id, num_heads, 1, kv_lora_rank + rope_dim, scale)
        self.r = kv_lora_rank

    def write(self, fb: ForwardBatch, latent: torch.Tensor) -> None:
        # latent: [T, 1, R + P]
        fb.kv_pool.write(self.layer_id, fb.out_slots, latent, None, self.k_scale, self.v_scale)

    def latents(self, fb: ForwardBatch, slots: torch.Tensor) -> torch.Tensor:
        """slots [L] or [B, L] -> [..., 1, R + P] (storage dtype, or fp32 from a quantized cache)."""
        return fb.kv_pool.gather(self.layer_id, slots, self.k_scale, self.v_scale)[0]

    def decode(self, q_lat: torch.Tensor, q_pe: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        # q_lat: [B, H, R], q_pe: [B, H, P] -> o_lat: [B, H, R] (fp32 math over quantized pages)
        cdt = torch.float32 if fb.kv_pool.quantized else q_lat.dtype
        lat = self.latents(fb, fb.kv_slots).to(cdt).transpose(1, 2)                 # [B, 1, L, R+P]
        q = torch.cat([q_lat, q_pe], dim=-1).to(cdt).unsqueeze(2)                    # [B, H, 1, R+P]
        o = F.scaled_dot_product_attention(q, lat, lat[..., : self.r], attn_mask=fb.decode_mask(None),
                                           scale=self.scale, enable_gqa=True)       # [B, H, 1, R]
        return o.squeeze(2)

    def extend(self, q: torch.Tensor, fb: ForwardBatch, expand) -> torch.Tensor:
        # q: [T, H, Dn+P]; expand(latents [L, R+P]) -> (k [L, H, Dn+P], v [L, H, Dv]) -> [T, H, Dv]
        cdt = torch.float32 if fb.kv_pool.quantized else q.dtype
        outs, start = [], 0
        for i, n in enumerate(fb.q_lens):
            k, v = expand(self.latents(fb, fb.seq_slots[i])[:, 0])
            qq = q[start:start + n].transpose(0, 1).unsqueeze(0).to(cdt)           # [1, H, n, Dn+P]
            kk = k.transpose(0, 1).unsqueeze(0).to(cdt)                             # [1, H, L, Dn+P]
            vv = v.transpose(0, 1).unsqueeze(0).to(cdt)                             # [1, H, L, Dv]
            mask = fb.extend_mask(i, None)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None,
                                               scale=self.scale)
            outs.append(o.squeeze(0).transpose(0, 1).to(q.dtype))                   # [n, H, Dv]
            start += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class MLAttention(nn.Module):
    """`model.layers.i.self_attn` of DeepSeek-V2/V3, with the checkpoint's module names: q_proj (no
    q_lora_rank) or q_a_proj + q_a_layernorm + q_b_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj,
    o_proj. With q_lora_rank, q_a_proj and kv_a_proj_with_mqa read the same input and run fused."""

    def __init__(self, c: PretrainedConfig, i: int, rotary: RotaryEmbedding):
        super().__init__()
        check_mla_config(c)
        p = f"model.layers.{i}.self_attn"
        self.h, self.r, self.p = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
        self.dn, self.dv = c.qk_nope_head_dim, c.v_head_dim
        self.q_lora = getattr(c, "q_lora_rank", None)
        bias = bool(getattr(c, "attention_bias", False))
        qdim = self.h * (self.dn + self.p)
        if self.q_lora:
            self.qkv_a_proj = QuantLinear(p, [("q_a_proj", self.q_lora), ("kv_a_proj_with_mqa", self.r + self.p)],
                                          c.hidden_size, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora, LATENT_NORM_EPS)
            self.q_b_proj = QuantLinear(p, [("q_b_proj", qdim)], self.q_lora)
        else:
            self.q_proj = QuantLinear(p, [("q_proj", qdim)], c.hidden_size)
            self.kv_a_proj_with_mqa = QuantLinear(p, [("kv_a_proj_with_mqa", self.r + self.p)], c.hidden_size,
                                                  bias=bias)
        self.kv_a_layernorm = RMSNorm(self.r, LATENT_NORM_EPS)
        self.kv_b_proj = QuantLinear(p, [("kv_b_proj", self.h * (self.dn + self.dv))], self.r)
        self.o_proj = QuantLinear(p, [("o_proj", c.hidden_size)], self.h * self.dv, bias=bias)
        self.attn = MLAPagedAttention(i, self.h, self.r, self.p, mla_softmax_scale(c))
        self.interleave = bool(getattr(c, "rope_interleave", True))
        self.rotary = rotary
        self.w_uk: nn.Parameter | None = None   # [H, Dn, R]  q_nope -> latent (set after loading)
        self.w_uv: nn.Parameter | None = None   # [H, R, Dv]  latent -> v

    def finish_loading(self, dtype: torch.dtype, device: torch.device) -> None:
        """Split kv_b_proj into the absorbed W_UK / W_UV. The weight comes out of the loaded layer itself
        (kv_b_proj applied to the identity), so any checkpoint scheme (bf16, block fp8 ...) works."""
        with torch.inference_mode():
            wt = self.kv_b_proj(torch.eye(self.r, dtype=dtype, device=device))    # [R, H*(Dn+Dv)] = W^T
        wt = wt.view(self.r, self.h, self.dn + self.dv)
        # parameters (created after loading), so the engine's weight accounting sees their memory
        self.w_uk = nn.Parameter(wt[..., : self.dn].permute(1, 2, 0).contiguous(), requires_grad=False)  # [H, Dn, R]
        self.w_uv = nn.Parameter(wt[..., self.dn:].transpose(0, 1).contiguous(), requires_grad=False)    # [H, R, Dv]

    def _rope(self, fb: ForwardBatch, q_pe: torch.Tensor, k_pe: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        # q_pe: [T, H, P], k_pe: [T, 1, P]
        if self.interleave:  # pairs (2j, 2j+1) -> halves (j, P/2 + j), then rotate-half
            q_pe = torch.cat([q_pe[..., 0::2], q_pe[..., 1::2]], dim=-1)
            k_pe = torch.cat([k_pe[..., 0::2], k_pe[..., 1::2]], dim=-1)
        key = ("rope", id(self.rotary))
        if key not in fb.cache:
            fb.cache[key] = self.rotary.tables(fb.positions)
        return self.rotary(fb.cache[key], q_pe, k_pe)

    def _expand(self, lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # lat: [L, R+P] -> k: [L, H, Dn+P], v: [L, H, Dv]
        n = lat.shape[0]
        kv = self.kv_b_proj(lat[:, : self.r].to(self.w_uk.dtype)).view(n, self.h, self.dn + self.dv)
        k_pe = lat[:, None, self.r:].to(kv.dtype).expand(n, self.h, self.p)
        return torch.cat([kv[..., : self.dn], k_pe], dim=-1), kv[..., self.dn:]

    def forward(self, x: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        t = x.shape[0]
        if self.q_lora:
            qa, ckv = self.qkv_a_proj(x).split([self.q_lora, self.r + self.p], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(qa))                               # [T, H*(Dn+P)]
        else:
            q, ckv = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        q_nope, q_pe = q.view(t, self.h, self.dn + self.p).split([self.dn, self.p], dim=-1)
        c_kv, k_pe = ckv.split([self.r, self.p], dim=-1)                            # [T, R], [T, P]
        q_pe, k_pe = self._rope(fb, q_pe, k_pe.reshape(t, 1, self.p))
        latent = torch.cat([self.kv_a_layernorm(c_kv).unsqueeze(1), k_pe], dim=-1)  # [T, 1, R+P]
        self.attn.write(fb, latent)
        if fb.is_decode:
            q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)    # [B, H, R]
            o_lat = self.attn.decode(q_lat, q_pe, fb)                               # [B, H, R] cdt
            o = torch.bmm(o_lat.to(x.dtype).transpose(0, 1), self.w_uv).transpose(0, 1)  # [B, H, Dv]
        else:
            o = self.attn.extend(torch.cat([q_nope, q_pe], dim=-1), fb, self._expand)
        return self.o_proj(o.reshape(t, self.h * self.dv))
