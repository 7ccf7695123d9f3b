"""A decoder-only transformer assembled from shared layers; each architecture file picks its options.

Module names mirror the Hugging Face layout (model.layers.N.self_attn.q_proj ...) so checkpoint tensors
route by name; q/k/v and gate/up are fused QuantLinears whose shards keep the checkpoint names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from quantrt.engine.forward_batch import ForwardBatch
from quantrt.engine.kv_pool import KVGeometry
from quantrt.errors import CheckpointError
from quantrt.layers.attention import PagedAttention
from quantrt.layers.linear import QuantLinear
from quantrt.layers.moe.layer import FusedMoE
from quantrt.layers.norm import PostNormed, RMSNorm
from quantrt.layers.qkv_prologue import QKVPrologue
from quantrt.layers.rotary import RotaryEmbedding
from quantrt.quant.kernel import LinearSpec, QuantizedRows, select_linear_kernel
from quantrt.quant.pending import GELU_MUL, RESIDUAL_ADD, SILU_MUL, PendingActMul, PendingRows, SummedRows
from quantrt.quant.weights import WEIGHT_ONLY, DenseWeight


@dataclass(frozen=True)
class DecoderSpec:
    """What differs between the families we run."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False          # Qwen3, Gemma3: RMSNorm over head_dim on q and k before rotary
    gemma: bool = False            # (1 + w) norms, sandwich norms, scaled embeddings, gelu-tanh MLP
    moe: Callable[[PretrainedConfig, int], nn.Module | None] | None = None  # layer i's MoE block (None: dense)
    # layer i's self-attention module (None: the standard q/k/v Attention), e.g. DeepSeek's MLA
    attention: Callable[[PretrainedConfig, int, RotaryEmbedding], nn.Module] | None = None


def _head_dim(c: PretrainedConfig) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _window(c: PretrainedConfig, i: int) -> int | None:
    types = getattr(c, "layer_types", None)
    if types is not None:
        return c.sliding_window if types[i] == "sliding_attention" else None
    return getattr(c, "sliding_window", None)


class Attention(nn.Module):
    def __init__(self, c: PretrainedConfig, spec: DecoderSpec, i: int, rotary: RotaryEmbedding):
        super().__init__()
        p = f"model.layers.{i}.self_attn"
        self.h, self.hkv, self.d = c.num_attention_heads, c.num_key_value_heads, _head_dim(c)
        bias = spec.qkv_bias or getattr(c, "attention_bias", False)
        self.qkv_proj = QuantLinear(p, [("q_proj", self.h * self.d), ("k_proj", self.hkv * self.d),
                                        ("v_proj", self.hkv * self.d)], c.hidden_size, bias=bias)
        self.qkv_proj.release_early = True    # the decode attention comes next, and reads before it waits
        self.o_proj = QuantLinear(p, [("o_proj", c.hidden_size)], self.h * self.d,
                                  bias=spec.o_bias or getattr(c, "attention_bias", False))
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.d, c.rms_norm_eps, offset=spec.gemma)
            self.k_norm = RMSNorm(self.d, c.rms_norm_eps, offset=spec.gemma)
        self.qk_norm = spec.qk_norm
        scale = c.query_pre_attn_scalar ** -0.5 if spec.gemma else self.d ** -0.5
        self.attn = PagedAttention(i, self.h, self.hkv, self.d, scale, _window(c, i))
        self.rotary = rotary
        self._prologue: QKVPrologue | None = None

    def input_linear(self) -> QuantLinear:
        """The linear reading this block's input: the norm before may make its activation codes
        (`row_codes`) or leave it the norm's work (`quant.pending`)."""
        return self.qkv_proj

    def output_linear(self) -> QuantLinear:
        """The linear making this block's output (it may add the residual itself: `forward(residual=)`)."""
        return self.o_proj

    def prologue(self) -> QKVPrologue | None:
        """The bias and q/k norms between the projection and the rotary (None without either), once loaded."""
        if self._prologue is None and (self.qkv_proj.bias is not None or self.qk_norm):
            b = self.qkv_proj.bias
            split = tuple(b.split([self.h * self.d, self.hkv * self.d, self.hkv * self.d])) if b is not None else None
            self._prologue = QKVPrologue(split, *((self.q_norm, self.k_norm) if self.qk_norm else ()))
        return self._prologue

    def forward(self, x: torch.Tensor | QuantizedRows | PendingRows, fb: ForwardBatch,
                residual: torch.Tensor | None = None) -> torch.Tensor | SummedRows:
        """x [T, D] -> the attention output [T, D]; with `residual`, residual + it (`SummedRows`)."""
        t = x.shape[0]
        self.qkv_proj.release_next(self.attn.small_decode(fb, t, fb.positions.device))
        pre = self.prologue()
        if pre is not None and not self.attn.takes_prologue(fb, fb.positions.device, pre):
            pre = None          # the layers' own ops below; else the decode op adds the bias and norms q and k
        qkv = self.qkv_proj(x, add_bias=pre is None)            # [T, (H + 2Hkv) * D]
        q, k, v = qkv.split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q, k, v = q.view(t, self.h, self.d), k.view(t, self.hkv, self.d), v.view(t, self.hkv, self.d)
        if self.qk_norm and pre is None:
            q, k = self.q_norm(q), self.k_norm(k)
        o = self.attn.rotary_forward(self.rotary, q, k, v, fb, pre=pre)
        return self.o_proj(o) if residual is None else self.o_proj.forward_residual(o, residual)


class Mlp(nn.Module):
    def __init__(self, c: PretrainedConfig, spec: DecoderSpec, i: int):
        super().__init__()
        p = f"model.layers.{i}.mlp"
        n = c.intermediate_size
        bias = getattr(c, "mlp_bias", False)
        self.gate_up_proj = QuantLinear(p, [("gate_proj", n), ("up_proj", n)], c.hidden_size, bias=bias)
        self.down_proj = QuantLinear(p, [("down_proj", c.hidden_size)], n, bias=bias)
        self.n = n
        self.gelu = spec.gemma
        self._act_mul = None  # the platform's act(gate) * up (Platform.act_mul_op)
        self._act_mul_codes = None  # the same making down_proj's activation codes (Platform.act_mul_codes_op)

    def finish_loading(self, platform) -> None:
        self._act_mul = platform.act_mul_op()
        self._act_mul_codes = platform.act_mul_codes_op() if self._act_mul is not None else None

    def input_linear(self) -> QuantLinear:
        """The linear reading this block's input: the norm before may make its activation codes
        (`row_codes`) or leave it the norm's work (`quant.pending`)."""
        return self.gate_up_proj

    def output_linear(self) -> QuantLinear:
        """The linear making this block's output (it may add the residual itself: `forward(residual=)`)."""
        return self.down_proj

    def forward(self, x: torch.Tensor | QuantizedRows | PendingRows, residual: torch.Tensor | None = None
                ) -> torch.Tensor | SummedRows:
        """x [T, D] -> the MLP output [T, D]; with `residual`, residual + it (`SummedRows`)."""
        gu = self.gate_up_proj(x)                               # [T, 2I]
        down = self.down_proj if residual is None else partial(self.down_proj.forward_residual, residual=residual)
        if self._act_mul is not None and gu.dim() == 2:
            if self.down_proj.takes_pending(gu.shape[0], GELU_MUL if self.gelu else SILU_MUL):
                return down(PendingActMul(gu, self.gelu, self._act_mul))   # act * mul in down's load
            codes = self.down_proj.row_codes(gu.shape[0]) if self._act_mul_codes is not None else None
            if codes is not None:
                return down(self._act_mul_codes(gu, self.gelu, codes))
            return down(self._act_mul(gu, self.gelu))
        g, u = gu[..., : self.n], gu[..., self.n:]
        a = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return down(a * u)


class DecoderLayer(nn.Module):
    def __init__(self, c: PretrainedConfig, spec: DecoderSpec, i: int, rotary: RotaryEmbedding):
        super().__init__()
        eps, off = c.rms_norm_eps, spec.gemma
        self.self_attn = spec.attention(c, i, rotary) if spec.attention else Attention(c, spec, i, rotary)
        block = spec.moe(c, i) if spec.moe is not None else None
        self.mlp = block if block is not None else Mlp(c, spec, i)
        self.input_layernorm = RMSNorm(c.hidden_size, eps, off)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps, off)
        self.sandwich = spec.gemma
        if spec.gemma:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, eps, off)

    def forward(self, x: torch.Tensor, fb: ForwardBatch, delta: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream [T, D]; delta: the previous layer's output not yet added to it (None for the
        first layer) -> (x, this layer's output): each residual add runs inside the next norm (add_forward)."""
        t = x.shape[0]
        h, x = self.input_layernorm.add_forward(x, delta, _reader(self.self_attn))
        if self.sandwich:   # each output's own norm runs in the next norm's kernel where the platform can (PostNormed)
            h, x = self.pre_feedforward_layernorm.add_forward(
                x, PostNormed(self.self_attn(h, fb), self.post_attention_layernorm), _reader(self.mlp))
            return x, PostNormed(self.mlp(h), self.post_feedforward_layernorm)
        attn = self.self_attn(h, fb, residual=x) if _adds_residual(self.self_attn, t) else self.self_attn(h, fb)
        h, x = self.post_attention_layernorm.add_forward(x, attn, _reader(self.mlp))
        return x, self.mlp(h, residual=x) if _adds_residual(self.mlp, t) else self.mlp(h)


def _reader(block: nn.Module) -> QuantLinear | None:
    """The linear reading the block's input, for blocks that say (Attention, Mlp); None for others (MoE, MLA),
    whose input stays a tensor."""
    f = getattr(block, "input_linear", None)
    return f() if f is not None else None


def _adds_residual(block: nn.Module, t: int) -> bool:
    """Whether the block's last linear adds the residual to T output rows in its kernel (`quant.pending`
    RESIDUAL_ADD; Attention and Mlp then take `residual=`): the next norm then reads partial sums of squares."""
    f = getattr(block, "output_linear", None)
    return f is not None and f().takes_pending(t, RESIDUAL_ADD)


class DecoderModel(nn.Module):
    """The `model.` subtree: embeddings, layers, final norm."""

    def __init__(self, c: PretrainedConfig, spec: DecoderSpec, max_positions: int):
        super().__init__()
        # filled from the checkpoint; empty storage avoids a random init of vocab x hidden
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size,
                                         _weight=torch.empty(c.vocab_size, c.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        d = _head_dim(c)
        types = getattr(c, "layer_types", None) if spec.gemma else None
        ropes = {t: RotaryEmbedding(c, d, max_positions, t) for t in set(types)} if types else None
        shared = None if ropes else RotaryEmbedding(c, d, max_positions)
        self.rotaries = list(ropes.values()) if ropes else [shared]
        self.layers = nn.ModuleList(
            DecoderLayer(c, spec, i, ropes[types[i]] if ropes else shared) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, spec.gemma)
        self.embed_scale = c.hidden_size ** 0.5 if spec.gemma else None
        self.decode_stack = None  # the platform's whole-stack decode step (Platform.decode_stack_op), set at load

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(fb.input_ids)                     # [T, D]
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if fb.is_decode and self.decode_stack is not None and (h := self.decode_stack(x, fb)) is not None:
            return h                                            # every layer + final norm in one platform call
        delta = None
        for layer in self.layers:
            x, delta = layer(x, fb, delta)
        return self.norm.add_forward(x, delta)[0]


class CausalLM(nn.Module):
    """model + lm_head. forward returns fp32 logits for the rows fb.logits_rows: [S, V]."""

    spec = DecoderSpec()

    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, self.spec, max_positions)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else QuantLinear("", [("lm_head", config.vocab_size)], config.hidden_size)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.fp32_lm_head = False
        self.embedding_stored_quantized = False   # set by loaders whose checkpoint stores it quantized

    def kv_geometry(self) -> KVGeometry:
        """The KV rows one token needs per layer (the engine sizes and builds the pool from it):
        num_key_value_heads x head_dim for K and for V."""
        c = self.config
        return KVGeometry(c.num_hidden_layers, c.num_key_value_heads, _head_dim(c))

    def enable_norm_biases(self, prefixes: Iterable[str]) -> None:
        """Before loading: give the named RMSNorms a bias the checkpoint must fill (msModelSlim anti-outlier
        `*.norm.bias`). A name that is not an RMSNorm of this model is a CheckpointError."""
        mods = dict(self.named_modules())
        for p in sorted(prefixes):
            m = mods.get(p)
            if not isinstance(m, RMSNorm):
                raise CheckpointError(f"checkpoint declares a norm bias {p}.bias, but {p} is not an RMSNorm "
                                      f"of {type(self).__name__}")
            m.enable_bias()

    def finish_loading(self, dtype: torch.dtype, platform) -> None:
        """Cast plain parameters, precompute rotary tables and prepare the tied head once every tensor
        has arrived."""
        device = platform.device()
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.finish_loading(dtype, platform)
            elif isinstance(m, FusedMoE):
                m.finish_loading(dtype, device, platform)
            elif isinstance(m, (PagedAttention, Mlp)):
                m.finish_loading(platform)
        emb = self.model.embed_tokens.weight.data                # before the cast: a quantized head starts from it
        self.model.embed_tokens.weight.data = emb.to(device=device, dtype=dtype)
        for r in self.model.rotaries:
            r.to(dtype, device, platform)
        self.model.decode_stack = platform.decode_stack_op(self.model)
        if self.lm_head is None:  # tied: the embedding matrix, prepared by the platform's dense kernel
            head_dtype = torch.float32 if self.fp32_lm_head else dtype
            # when the checkpoint itself stores the tied embedding quantized (GGUF Q8_0 token_embd), the
            # platform may run the head quantized too (CPU bf16: int8 per row); otherwise the exact dense
            # head (an int8 head on an unquantized embedding costs KL ~0.0013 on SmolLM2: QUALITY.md)
            hook = getattr(platform, "tied_head_weight", None) if self.embedding_stored_quantized else None
            qw = hook(emb, head_dtype) if hook is not None else None
            spec = LinearSpec(qw if qw is not None else DenseWeight(self.model.embed_tokens.weight.data),
                              WEIGHT_ONLY, head_dtype)
            self.tied_head = select_linear_kernel(spec, platform).kernel.prepare(spec, platform)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        # h: [S, D] -> [S, V] fp32
        if self.fp32_lm_head:
            h = h.float()
        logits = self.tied_head.apply(h, None) if self.lm_head is None else self.lm_head(h)
        logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        h = self.model(fb)
        # logits_rows are ascending and distinct, so as many rows as h has is every row (each decode step)
        return self.compute_logits(h if fb.logits_rows.shape[0] == h.shape[0] else h[fb.logits_rows])
