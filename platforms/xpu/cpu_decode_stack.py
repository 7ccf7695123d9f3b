"""The whole decoder stack of a CPU decode step in one native call (`quantrt_cpu::decode_stack`).

At batch 1 a SmolLM2-sized layer does ~10 Python-level calls (modules, kernels, hooks), each a few
microseconds of interpreter and dispatcher time: 30 layers cost milliseconds a step, as much as
llama.cpp's whole step. `CpuDecodeStack` runs the same computation (the ops of csrc/decode_ops.cpp and the
linears' own `quantrt_cpu::int_gemm`, in the same order with the same roundings, so the result is
identical to the layer-by-layer path with the native ops) from one call per step.

It serves plain Llama-style decoders only and declines (once, with the reason; the layers then run one by
one) everything else: sandwich/Gemma norms, qk-norm, MLA, MoE, biased or offset norms, a platform rotary op,
any linear not on a single unpermuted `cpu_native_int` kernel, GELU MLPs. Per step it declines batches it
cannot take: fp4 or MLA KV pools, batches without the decode slot table.
"""

from __future__ import annotations

import logging

import torch

from quantrt.platforms.xpu import cpu_layer_ops

log = logging.getLogger(__name__)
_EMPTY = torch.empty(0)


def _linear_parts(lin, dtype: torch.dtype) -> tuple[list[torch.Tensor], int] | str:
    """(qs, scales, mins|empty, bias|empty), bits of a QuantLinear on one cpu_native_int kernel, else why not."""
    from quantrt.platforms.xpu.cpu_native_kernels import CpuNativeIntKernel

    if len(lin.kernels) != 1 or not isinstance(lin.kernels[0], CpuNativeIntKernel):
        return f"{lin.parent or 'linear'} runs {lin.kernel_desc}, not one cpu_native_int kernel"
    k = lin.kernels[0]
    if k.perm is not None or k.out_dtype != dtype:
        return f"{lin.parent}: act-order or a {k.out_dtype} output"
    bias = lin.bias if lin.bias is not None else _EMPTY
    if bias.numel() and bias.dtype != dtype:
        return f"{lin.parent}: bias in {bias.dtype}"
    return [k.qs, k.scales, k.mins if k.mins is not None else _EMPTY, bias], int(k.bits)


class CpuDecodeStack:
    """Callable (x [B, hidden], fb) -> the final norm's output [B, hidden], or None (the layers run)."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder      # quantrt.models.decoder.DecoderModel
        self.reason: str | None = None
        self._args: tuple | None = None
        self._pool = None
        self._caches: tuple[list[torch.Tensor], list[torch.Tensor], int] | None = None

    def _build(self) -> tuple | str:
        """(weights, meta, fmeta, cos, sin) from the loaded model, or why the stack cannot serve it."""
        from quantrt.layers.norm import RMSNorm
        from quantrt.models.decoder import Attention, Mlp

        dec = self.decoder
        if not cpu_layer_ops.available() or not hasattr(torch.ops.quantrt_cpu, "int_gemm"):
            return f"native ops unavailable: {cpu_layer_ops.unavailable_reason() or 'no int_gemm op'}"
        if dec.embed_scale is not None or len(dec.rotaries) != 1:
            return "Gemma-style decoder (scaled embeddings, per-layer-type rotary)"
        rot = dec.rotaries[0]
        if rot._op is not None:
            return "the platform has its own rotary op"
        dtype = dec.norm._scale.dtype if dec.norm._scale is not None else None
        weights, meta, fmeta = [], [], []
        first = dec.layers[0].self_attn if len(dec.layers) else None
        if not isinstance(first, Attention):
            return "the attention is not quantrt's standard q/k/v Attention (MLA or custom)"
        for i, layer in enumerate(dec.layers):
            att, mlp = layer.self_attn, layer.mlp
            if layer.sandwich or not isinstance(att, Attention) or not isinstance(mlp, Mlp):
                return f"layer {i}: sandwich norms, custom attention or an MoE block"
            if att.qk_norm or mlp.gelu or (att.h, att.hkv, att.d) != (first.h, first.hkv, first.d):
                return f"layer {i}: qk-norm, a GELU MLP or a different head layout"
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(not isinstance(n, RMSNorm) or n.offset or n._bias is not None or n._scale.dtype != dtype
                   for n in norms):
                return f"layer {i}: offset or biased norms"
            weights += [norms[0]._scale, norms[1]._scale]
            bits = []
            for lin in (att.qkv_proj, att.o_proj, mlp.gate_up_proj, mlp.down_proj):
                parts = _linear_parts(lin, dtype)
                if isinstance(parts, str):
                    return f"layer {i}: {parts}"
                weights += parts[0]
                bits.append(parts[1])
            meta += bits + [int(att.attn.window or 0)]
            fmeta += [norms[0].eps, norms[1].eps, att.attn.scale, att.attn.k_scale, att.attn.v_scale]
        if dec.norm.offset or dec.norm._bias is not None:
            return "offset or biased final norm"
        weights.append(dec.norm._scale)
        fmeta.append(dec.norm.eps)
        mlp0 = dec.layers[0].mlp
        meta = [len(dec.layers), first.h, first.hkv, first.d, mlp0.n] + meta
        half = rot.cos.shape[-1] // 2
        cos, sin = rot.cos[:, :half], rot.sin[:, :half]   # [P, D/2] views: both neox halves are equal
        if cos.dtype != dtype:
            return f"rotary tables in {cos.dtype}, activations in {dtype}"
        return weights, meta, fmeta, cos, sin

    def _pool_caches(self, pool) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
        if pool is not self._pool:
            kind = cpu_layer_ops.pool_kind(pool)
            self._pool = pool
            self._caches = None if kind is None or kind == 3 else (pool.k, pool.v, kind)
        return self._caches

    def __call__(self, x: torch.Tensor, fb) -> torch.Tensor | None:
        # x: [B, hidden] embedding rows of a decode batch -> [B, hidden] after the final norm, or None
        if self.reason is not None:
            return None
        if self._args is None:
            built = self._build()
            if isinstance(built, str):
                self.reason = built
                log.info("CPU decode stack off: %s (layers run one by one)", built)
                return None
            self._args = built
        caches = self._pool_caches(fb.kv_pool)
        if caches is None or fb.kv_slots is None or x.dim() != 2 or x.dtype != self._args[3].dtype:
            return None
        weights, meta, fmeta, cos, sin = self._args
        lens = fb.kv_lens_t if fb.kv_lens_t is not None else torch.tensor(fb.kv_lens, dtype=torch.long)
        return torch.ops.quantrt_cpu.decode_stack(x, weights, meta, fmeta, fb.positions, fb.out_slots, fb.kv_slots,
                                                  lens, cos, sin, caches[0], caches[1], caches[2])
