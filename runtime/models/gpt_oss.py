"""gpt-oss (GptOssForCausalLM): attention with learned per-head sinks and q/k/v/o biases, alternating
sliding-window / full layers (`layer_types`), yarn rotary, and a MoE block in every layer (router with
bias, experts with biases and a clamped SwiGLU: quantrt.layers.moe.gpt_oss_block), bf16 or MXFP4
experts (quantrt.quant.formats.mxfp4). RMSNorms multiply by the weight in fp32, then cast, as
transformers' GptOssRMSNorm does.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from quantrt.engine.forward_batch import ForwardBatch
from quantrt.layers.moe.gpt_oss_block import GptOssMoE
from quantrt.layers.norm import RMSNorm
from quantrt.layers.rotary import RotaryEmbedding
from quantrt.models.decoder import Attention, CausalLM, DecoderSpec


class GptOssAttention(Attention):
    """The shared q/k/v Attention (biases from `attention_bias`, window from `layer_types`) plus
    `sinks` [H]: one learned logit per head in the softmax denominator (quantrt.layers.attention)."""

    def __init__(self, c: PretrainedConfig, i: int, rotary: RotaryEmbedding):
        super().__init__(c, DecoderSpec(), i, rotary)
        self.sinks = nn.Parameter(torch.zeros(self.h), requires_grad=False)

    def forward(self, x: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)                                  # [T, (H + 2Hkv) * D]
        q, k, v = qkv.split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q, k, v = q.view(t, self.h, self.d), k.view(t, self.hkv, self.d), v.view(t, self.hkv, self.d)
        key = ("rope", id(self.rotary))
        if key not in fb.cache:
            fb.cache[key] = self.rotary.tables(fb.positions)
        q, k = self.rotary(fb.cache[key], q, k)
        return self.o_proj(self.attn(q, k, v, fb, sinks=self.sinks))


class GptOssRMSNorm(RMSNorm):
    """y = (w * (x / rms(x)))  in fp32, then cast to x's dtype."""

    def finish_loading(self, dtype: torch.dtype, platform=None) -> None:
        # fp32 weight on the platform's device; the platform's fused norm (which casts first) is not used
        dev = platform.device() if platform is not None else self.weight.device
        self._scale = self.weight.data.to(dev).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [T, D] same dtype
        xf = x.float()
        return (self._scale * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def gpt_oss_moe_block(c: PretrainedConfig, i: int) -> GptOssMoE:
    """swiglu_alpha is not in every transformers version's config (nor in gpt-oss's config.json): 1.702."""
    return GptOssMoE(f"model.layers.{i}.mlp", c.hidden_size, c.intermediate_size, c.num_local_experts,
                     c.num_experts_per_tok, alpha=getattr(c, "swiglu_alpha", 1.702),
                     limit=getattr(c, "swiglu_limit", 7.0))


class GptOssForCausalLM(CausalLM):
    spec = DecoderSpec(attention=GptOssAttention, moe=gpt_oss_moe_block)

    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__(config, max_positions)
        eps, h = config.rms_norm_eps, config.hidden_size
        for layer in self.model.layers:
            layer.input_layernorm = GptOssRMSNorm(h, eps)
            layer.post_attention_layernorm = GptOssRMSNorm(h, eps)
        self.model.norm = GptOssRMSNorm(h, eps)

    def finish_loading(self, dtype: torch.dtype, platform) -> None:
        """The shared steps, then the sinks onto the platform's device (fp32; cast where attention runs)."""
        super().finish_loading(dtype, platform)
        for layer in self.model.layers:
            sinks = layer.self_attn.sinks
            sinks.data = sinks.data.to(device=platform.device(), dtype=torch.float32)
