"""CPU emulation of the aiter ops in AiterOps (written from aiter's documented Python semantics), and an
emulated MI300X platform (name "rocm", arch gfx942, e4m3fnuz, tensors on CPU) so the aiter kernels run end
to end in CI. EMULATED: it checks layouts, dtypes and scale conventions, not CK kernels' rounding or speed.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from quantrt.platform.checks import ROCM_ALLOWED_QUANTIZATION
from quantrt.platforms.rocm.aiter_layers import AiterLayerOps
from quantrt.platforms.xpu.cpu_platform import CpuPlatform

_FP8 = (torch.float8_e4m3fnuz, torch.float8_e4m3fn)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"[emulated aiter] {msg}")


def _shuffle_dims(shape: torch.Size, elem: int, layout: tuple[int, int]) -> tuple[int, int, int, int, int]:
    bn, bk = layout[0], layout[1] * 2
    pack = 16 // elem
    n, k = shape[-2], shape[-1]
    _check(n % bn == 0 and k % bk == 0, f"shuffle needs N % {bn} == 0 and K % {bk} == 0, got {tuple(shape)}")
    return n // bn, bn, k // bk, bk // pack, pack


def unpack_int4_aiter(w: torch.Tensor) -> torch.Tensor:
    """int32 [..., K/8] (SGLang's pack_int4_to_int32: nibble i holds element [0, 2, 4, 6, 1, 3, 5, 7][i] of each
    group of 8) -> signed int4 values as int8 [..., K]."""
    nib = (w.to(torch.int64)[..., None] >> (4 * torch.arange(8, dtype=torch.int64, device=w.device))) & 0xF
    nib = torch.where(nib >= 8, nib - 16, nib)                                   # [..., K/8, 8] by nibble
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7], device=w.device)             # element held by nibble i
    out = torch.empty_like(nib)
    out[..., order] = nib
    return out.reshape(*w.shape[:-1], -1).to(torch.int8)


def pack_int4_aiter(q: torch.Tensor) -> torch.Tensor:
    """Inverse of unpack_int4_aiter: int4 values [..., K] -> int32 [..., K/8] (nibble i = element order[i])."""
    _check(q.shape[-1] % 8 == 0, f"int4 packing needs K % 8 == 0, got {q.shape[-1]}")
    v = (q.to(torch.int64) & 0xF).reshape(*q.shape[:-1], -1, 8)
    v = v[..., [0, 2, 4, 6, 1, 3, 5, 7]]
    word = (v << (4 * torch.arange(8, dtype=torch.int64, device=q.device))).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unshuffle_weight(x: torch.Tensor, layout: tuple[int, int] = (16, 16)) -> torch.Tensor:
    """Inverse of shuffle_weight (what a bpreshuffle GEMM reads back)."""
    nb, bn, kb, kp, p = _shuffle_dims(x.shape, x.element_size(), layout)
    v = x.reshape(-1, nb, kb, kp, bn, p).permute(0, 1, 4, 2, 3, 5)
    return v.contiguous().reshape(x.shape)


class EmulatedAiterLinearOps:
    """aiter's quant / shuffle / GEMM / RMSNorm ops on CPU; GEMMs dequantize exactly (fp8/int8 values are exact in fp32) and sum in fp32."""

    def pertoken_quant(self, x: torch.Tensor, quant_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        _check(quant_dtype in (*_FP8, torch.int8), f"quant_dtype {quant_dtype}")
        xf = x.to(torch.float32)
        qmax = 127.0 if quant_dtype == torch.int8 else float(torch.finfo(quant_dtype).max)
        scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax        # [M, 1]
        y = (xf / scale).clamp(-qmax, qmax)
        return (y.round().to(torch.int8) if quant_dtype == torch.int8 else y.to(quant_dtype)), scale

    def shuffle_weight(self, x: torch.Tensor, layout: tuple[int, int] = (16, 16)) -> torch.Tensor:
        nb, bn, kb, kp, p = _shuffle_dims(x.shape, x.element_size(), layout)
        v = x.reshape(-1, nb, bn, kb, kp, p).permute(0, 1, 3, 4, 2, 5)
        return v.contiguous().reshape(x.shape)

    def gemm_a8w8(self, XQ: torch.Tensor, WQ: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        _check(XQ.dtype == WQ.dtype and XQ.dtype in (*_FP8, torch.int8), f"operands {XQ.dtype}/{WQ.dtype}")
        _check(XQ.shape[-1] == WQ.shape[-1], f"K mismatch {tuple(XQ.shape)} vs {tuple(WQ.shape)}")
        _check(x_scale.shape == (XQ.shape[0], 1) and w_scale.shape == (1, WQ.shape[0]), "scale shapes")
        _check(dtype in (torch.bfloat16, torch.float16), f"output dtype {dtype}")
        y = (XQ.to(torch.float32) @ WQ.to(torch.float32).T) * x_scale.float() * w_scale.float()
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(dtype)

    def gemm_a8w8_bpreshuffle(self, XQ: torch.Tensor, WQ: torch.Tensor, x_scale: torch.Tensor,
                              w_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.gemm_a8w8(XQ, unshuffle_weight(WQ), x_scale, w_scale, None, dtype)

    def rmsnorm2d_fwd(self, x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon) * weight.to(torch.float32)
        return y.to(x.dtype)

    def rmsnorm2d_fwd_with_add(self, out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                               residual_out: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
        residual_out.copy_(x + residual)
        out.copy_(self.rmsnorm2d_fwd(residual_out, weight, epsilon))


def _scale_value(s: float | torch.Tensor, what: str) -> float:
    if isinstance(s, torch.Tensor):
        _check(s.numel() == 1, f"{what} must be one value (per tensor), got shape {tuple(s.shape)}")
        return float(s.reshape(()))
    return float(s)


class EmulatedAiterAttentionOps:
    """aiter's paged_attention_rocm on CPU: fp32 scores, softmax and P.V per 256-key partition, then combined."""

    fp8_dtype: torch.dtype = torch.float8_e4m3fnuz

    def paged_attention_rocm(self, out: torch.Tensor, exp_sums: torch.Tensor, max_logits: torch.Tensor,
                             tmp_out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                             value_cache: torch.Tensor, num_kv_heads: int, scale: float, block_tables: torch.Tensor,
                             context_lens: torch.Tensor, block_size: int, max_context_len: int,
                             alibi_slopes: torch.Tensor | None, kv_cache_dtype: str,
                             k_scale: float | torch.Tensor, v_scale: float | torch.Tensor,
                             fp8_out_scale: torch.Tensor | None = None, partition_size: int = 256) -> None:
        """query [B, H, D] bf16/fp16; key_cache [nb, Hkv, D/x, bs, x], value_cache [nb, Hkv, D, bs] (x = 16 bytes /
        element size); block_tables int32 [B, max_blocks]; context_lens int32 [B]; kv_cache_dtype "auto" (cache
        in query's dtype) or "fp8"/"fp8_e4m3" (uint8 bits of the arch's fp8, times k_scale / v_scale). Writes out
        [B, H, D] and, per partition of `partition_size` keys, max_logits / exp_sums [B, H, P] (fp32) and the
        partition's normalized output tmp_out [B, H, P, D]. Head h reads KV head h // (H / Hkv)."""
        b, h, d = query.shape
        _check(query.dtype in (torch.bfloat16, torch.float16), f"query dtype {query.dtype}")
        _check(alibi_slopes is None and fp8_out_scale is None, "alibi_slopes / fp8_out_scale are not emulated")
        _check(kv_cache_dtype in ("auto", "fp8", "fp8_e4m3"), f"kv_cache_dtype {kv_cache_dtype!r} not in auto, fp8, "
               "fp8_e4m3")
        _check(block_size in (16, 32), f"block_size {block_size} not in 16, 32")
        _check(d in (64, 128), f"head_size {d} not in 64, 128")
        _check(h % num_kv_heads == 0 and h // num_kv_heads <= 16, f"GQA ratio {h}/{num_kv_heads} must be 1..16")
        fp8 = kv_cache_dtype != "auto"
        if fp8:
            _check(key_cache.dtype == torch.uint8 and value_cache.dtype == torch.uint8, "fp8 caches are uint8 bits")
        else:
            _check(key_cache.dtype == query.dtype and value_cache.dtype == query.dtype,
                   f"kv_cache_dtype auto needs caches in {query.dtype}, got {key_cache.dtype}")
        x = 16 // key_cache.element_size()
        nb = key_cache.shape[0]
        _check(tuple(key_cache.shape) == (nb, num_kv_heads, d // x, block_size, x),
               f"key_cache must be [num_blocks, {num_kv_heads}, {d // x}, {block_size}, {x}], got {tuple(key_cache.shape)}")
        _check(tuple(value_cache.shape) == (nb, num_kv_heads, d, block_size),
               f"value_cache must be [num_blocks, {num_kv_heads}, {d}, {block_size}], got {tuple(value_cache.shape)}")
        _check(block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32, "block_tables / context_lens "
               "must be int32")
        parts = -(-max_context_len // partition_size)
        _check(tuple(exp_sums.shape) == (b, h, parts) and tuple(tmp_out.shape) == (b, h, parts, d),
               f"exp_sums/max_logits [B, H, {parts}] and tmp_out [B, H, {parts}, D] for max_context_len "
               f"{max_context_len}")

        def values(t: torch.Tensor, s: float | torch.Tensor, what: str) -> torch.Tensor:
            if not fp8:
                return t.to(torch.float32)
            return t.view(self.fp8_dtype).to(torch.float32) * _scale_value(s, what)

        keys = values(key_cache, k_scale, "k_scale").permute(0, 3, 1, 2, 4).reshape(nb * block_size, num_kv_heads, d)
        vals = values(value_cache, v_scale, "v_scale").permute(0, 3, 1, 2).reshape(nb * block_size, num_kv_heads, d)
        g = h // num_kv_heads
        for i in range(b):
            n = int(context_lens[i])
            _check(0 < n <= max_context_len, f"context_lens[{i}] = {n} outside 1..{max_context_len}")
            j = torch.arange(n)
            rows = block_tables[i].long()[j // block_size] * block_size + j % block_size
            k = keys[rows].transpose(0, 1).repeat_interleave(g, 0)                     # [H, n, D]
            v = vals[rows].transpose(0, 1).repeat_interleave(g, 0)
            s = (query[i].to(torch.float32)[:, None, :] @ k.transpose(1, 2))[:, 0] * scale     # [H, n] fp32
            o = torch.zeros(h, d)
            m_all = s.amax(-1, keepdim=True)
            total = torch.zeros(h, 1)
            for p in range(-(-n // partition_size)):
                sp, vp = s[:, p * partition_size:(p + 1) * partition_size], v[:, p * partition_size:(p + 1) * partition_size]
                m = sp.amax(-1, keepdim=True)
                e = (sp - m).exp()
                max_logits[i, :, p], exp_sums[i, :, p] = m[:, 0], e.sum(-1)
                tmp_out[i, :, p] = ((e[:, None, :] @ vp)[:, 0] / e.sum(-1, keepdim=True)).to(tmp_out.dtype)
                w = e.sum(-1, keepdim=True) * (m - m_all).exp()                        # the partition's share
                o += w * (e[:, None, :] @ vp)[:, 0] / e.sum(-1, keepdim=True)
                total += w
            out[i] = (o / total).to(out.dtype)


class EmulatedAiterOps(EmulatedAiterAttentionOps, EmulatedAiterLinearOps):
    """Every AiterOps op on CPU (EMULATED): the linear ops above plus rope, routing, fused_moe, block-scale GEMM.
    `fp8_dtype`: aiter's `dtypes.fp8` for the emulated arch (e4m3fnuz on gfx942), the activation dtype of
    fused_moe when the weights are not fp8 themselves (int4 upcast)."""

    def __init__(self, fp8_dtype: torch.dtype = torch.float8_e4m3fnuz):
        self.fp8_dtype = fp8_dtype

    def rope_cached_positions_2c_fwd_inplace(self, input_x: torch.Tensor, input_y: torch.Tensor, cos: torch.Tensor,
                                             sin: torch.Tensor, positions: torch.Tensor, rotate_style: int,
                                             reuse_freqs_front_part: bool, nope_first: bool) -> None:
        """x, y: [S, B, H, D] rotated in place; cos/sin: [P, 1, 1, D/2] (reuse_freqs_front_part) or D;
        positions: [S, B]; rotate_style 0 = NEOX (rotate halves), 1 = GPT-J (interleaved pairs)."""
        _check(input_x.dim() == 4 and input_y.dim() == 4, "inputs are [s, b, h, d]")
        _check(rotate_style in (0, 1) and not nope_first, f"rotate_style {rotate_style}, nope_first {nope_first}")
        d = input_x.shape[-1]
        c = cos.reshape(cos.shape[0], -1).to(torch.float32)[positions.long()]        # [S, B, D/2 or D]
        sn = sin.reshape(sin.shape[0], -1).to(torch.float32)[positions.long()]
        if reuse_freqs_front_part:
            _check(c.shape[-1] == d // 2, f"cos/sin last dim {c.shape[-1]} != d/2 = {d // 2}")
        for t in (input_x, input_y):
            tf = t.to(torch.float32)
            if rotate_style == 0:
                x1, x2 = tf[..., : d // 2], tf[..., d // 2:]
                cc, ss = (c, sn) if reuse_freqs_front_part else (c[..., : d // 2], sn[..., : d // 2])
                cc, ss = cc[:, :, None, :], ss[:, :, None, :]
                out = torch.cat([x1 * cc - x2 * ss, x2 * cc + x1 * ss], -1)
            else:
                x1, x2 = tf[..., 0::2], tf[..., 1::2]
                cc, ss = (c, sn) if reuse_freqs_front_part else (c[..., 0::2], sn[..., 0::2])
                cc, ss = cc[:, :, None, :], ss[:, :, None, :]
                out = torch.stack([x1 * cc - x2 * ss, x2 * cc + x1 * ss], -1).flatten(-2)
            t.copy_(out.to(t.dtype))

    @staticmethod
    def _fill(topk_weights: torch.Tensor, topk_ids: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> None:
        _check(topk_weights.dtype == torch.float32 and topk_ids.dtype == torch.int32, "outputs are fp32 / int32")
        topk_weights.copy_(w)
        topk_ids.copy_(ids.to(torch.int32))

    def topk_softmax(self, topk_weights: torch.Tensor, topk_indices: torch.Tensor,
                     token_expert_indices: torch.Tensor, gating_output: torch.Tensor, renormalize: bool) -> None:
        """Softmax over experts, top-k (outputs filled in place); renormalize: weights sum to 1."""
        k = topk_weights.shape[-1]
        p = gating_output.to(torch.float32).softmax(-1)
        w, ids = p.topk(k, -1)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
        self._fill(topk_weights, topk_indices, w, ids)
        t = gating_output.shape[0]
        token_expert_indices.copy_((torch.arange(k)[None, :] * t + torch.arange(t)[:, None]).to(torch.int32))

    def _grouped(self, scores: torch.Tensor, choice: torch.Tensor, k: int, groups: int, topk_group: int,
                 group_score: str) -> tuple[torch.Tensor, torch.Tensor]:
        t, e = choice.shape
        g = choice.view(t, groups, e // groups)
        gs = g.topk(2, -1).values.sum(-1) if group_score == "top2" else g.amax(-1)      # [T, G]
        keep = torch.zeros_like(gs).scatter_(1, gs.topk(topk_group, -1).indices, 1.0).bool()
        masked = choice.masked_fill(~keep.repeat_interleave(e // groups, 1), float("-inf"))
        ids = masked.topk(k, -1).indices
        return scores.gather(1, ids), ids

    def grouped_topk(self, gating_output: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     num_expert_group: int, topk_group: int, need_renorm: bool, scoring_func: str = "softmax",
                     routed_scaling_factor: float = 1.0) -> None:
        """Groups ranked by their best expert's score; top-k inside the kept groups."""
        _check(scoring_func in ("softmax", "sigmoid"), f"scoring_func {scoring_func}")
        x = gating_output.to(torch.float32)
        scores = x.softmax(-1) if scoring_func == "softmax" else x.sigmoid()
        w, ids = self._grouped(scores, scores, topk_weights.shape[-1], num_expert_group, topk_group, "max")
        if need_renorm:
            w = w / w.sum(-1, keepdim=True)
        self._fill(topk_weights, topk_ids, w * routed_scaling_factor, ids)

    def biased_grouped_topk(self, gating_output: torch.Tensor, correction_bias: torch.Tensor,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_expert_group: int,
                            topk_group: int, need_renorm: bool, routed_scaling_factor: float = 1.0) -> None:
        """DeepSeek-V3: sigmoid scores + bias choose (groups by their top-2 sum); weights are unbiased scores."""
        scores = gating_output.to(torch.float32).sigmoid()
        choice = scores + correction_bias.to(torch.float32)[None, :]
        w, ids = self._grouped(scores, choice, topk_weights.shape[-1], num_expert_group, topk_group, "top2")
        if need_renorm:
            w = w / w.sum(-1, keepdim=True)
        self._fill(topk_weights, topk_ids, w * routed_scaling_factor, ids)

    def _moe_weight(self, w: torch.Tensor) -> torch.Tensor:
        """A shuffled fused_moe weight [E, N, K'] -> fp32 values [E, N, K] (int32 = 8 packed int4 along K)."""
        if w.shape[-2] % 16 == 0 and w.shape[-1] % 32 == 0:
            w = unshuffle_weight(w)
        return (unpack_int4_aiter(w) if w.dtype == torch.int32 else w).to(torch.float32)

    def fused_moe(self, hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weight: torch.Tensor,
                  topk_ids: torch.Tensor, expert_mask: torch.Tensor | None = None, activation_method: int = 0,
                  quant_method: int = 0, doweight_stage1: bool = False, w1_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, a1_scale: torch.Tensor | None = None,
                  a2_scale: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H]; w1 [E, 2I, H] (gate rows first) and w2 [E, H, I], preshuffled with (16, 16), bf16/fp16
        (QuantType.No = 0) or fp8 / int4-in-int32 (QuantType.per_Token = 2: activations quantized per token to
        the weight's fp8 dtype, int4 weights upcast exactly to fp8); w*_scale [E, N, 1] multiply each GEMM's
        output channels; topk_ids int32. Silu (ActivationType 0) only. Output in hidden's dtype."""
        _check(activation_method == 0 and not doweight_stage1 and expert_mask is None, "Silu, weights after stage 2")
        _check(quant_method in (0, 2), f"quant_method {quant_method} (emulated: No = 0, per_Token = 2)")
        _check(topk_ids.dtype == torch.int32, f"topk_ids must be int32, got {topk_ids.dtype}")
        _check(a1_scale is None and a2_scale is None, "static activation scales are not emulated")
        x = hidden_states
        _check(x.dtype in (torch.bfloat16, torch.float16), f"hidden_states dtype {x.dtype}")
        fp8 = w1.dtype if w1.dtype in _FP8 else self.fp8_dtype
        w1f, w2f = self._moe_weight(w1), self._moe_weight(w2)                       # [E, 2I, H], [E, H, I]
        if quant_method == 0:
            _check(w1.dtype == x.dtype and w1_scale is None, "QuantType.No takes weights in hidden's dtype")
        else:
            _check(w1_scale is not None and w2_scale is not None, "per_Token needs w1_scale / w2_scale")
        out = torch.zeros(x.shape, dtype=torch.float32)
        ids = topk_ids.long()

        def act(v: torch.Tensor) -> torch.Tensor:
            if quant_method == 0:
                return v.to(x.dtype).to(torch.float32)
            q, s = self.pertoken_quant(v, fp8)
            return q.to(torch.float32) * s

        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            gu = act(x[tok].to(torch.float32)) @ w1f[e].T                             # [n, 2I]
            if w1_scale is not None:
                gu = gu * w1_scale[e].reshape(1, -1).to(torch.float32)
            g, u = gu.chunk(2, -1)
            h = torch.nn.functional.silu(g) * u
            y = act(h) @ w2f[e].T
            if w2_scale is not None:
                y = y * w2_scale[e].reshape(1, -1).to(torch.float32)
            out.index_add_(0, tok, y * topk_weight[tok, slot, None].to(torch.float32))
        return out.to(x.dtype)

    def gemm_a8w8_blockscale(self, XQ: torch.Tensor, WQ: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                             dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """XQ [M, K] fp8 with x_scale [M, K/128] (per 1x128 token group); WQ [N, K] fp8 with w_scale
        [N/128, K/128] (per 128x128 block): y = sum over K-blocks of (XQ_b @ WQ_b^T) * x_scale * w_scale."""
        m, k = XQ.shape
        n = WQ.shape[0]
        _check(XQ.dtype == WQ.dtype and XQ.dtype in _FP8, f"operands {XQ.dtype}/{WQ.dtype}")
        kb, nb = -(-k // 128), -(-n // 128)
        _check(tuple(x_scale.shape) == (m, kb) and tuple(w_scale.shape) == (nb, kb),
               f"scales {tuple(x_scale.shape)}/{tuple(w_scale.shape)}, expected {(m, kb)}/{(nb, kb)}")
        _check(dtype in (torch.bfloat16, torch.float16), f"output dtype {dtype}")
        xs = x_scale.to(torch.float32).repeat_interleave(128, 1)[:, :k]
        ws = w_scale.to(torch.float32).repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        return ((XQ.to(torch.float32) * xs) @ (WQ.to(torch.float32) * ws).T).to(dtype)


class EmulatedPetitOps:
    """Petit's NVFP4 W4A16 ops on CPU (EMULATED; the repack keeps the checkpoint layout, Petit's is internal)."""

    def repack_nvfp4(self, qweight: torch.Tensor, size_n: int, size_k: int) -> torch.Tensor:
        _check(qweight.dtype == torch.int32 and tuple(qweight.shape) == (size_n, size_k // 8),
               f"qweight must be int32 [{size_n}, {size_k // 8}], got {qweight.dtype} {tuple(qweight.shape)}")
        return qweight.clone()

    def process_nvfp4_scales(self, scales: torch.Tensor, size_k: int, size_n: int) -> torch.Tensor:
        _check(scales.dtype == torch.float8_e4m3fn and tuple(scales.shape) == (size_n, size_k // 16),
               f"scales must be float8_e4m3fn [{size_n}, {size_k // 16}], got {scales.dtype} {tuple(scales.shape)}")
        return scales.clone()

    def mul_nvfp4_a16(self, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, global_scale: torch.Tensor,
                      size_m: int, size_n: int, size_k: int, solution_id: int = -1) -> torch.Tensor:
        """a [M, K] fp16/bf16 @ dequant(b)^T: b bytes hold element 2j in the low nibble; w = e2m1 * s * global."""
        from quantrt.quant.weights import e2m1_decode

        _check(a.dtype in (torch.float16, torch.bfloat16) and tuple(a.shape) == (size_m, size_k), "a shape/dtype")
        by = b.contiguous().view(torch.uint8)                                       # [N, K/2]
        codes = torch.stack([by & 0xF, by >> 4], -1).reshape(size_n, size_k)
        w = e2m1_decode(codes) * s.to(torch.float32).repeat_interleave(16, 1) * global_scale.to(torch.float32)
        return (a.to(torch.float32) @ w.T).to(a.dtype)


class EmulatedRocmPlatform(AiterLayerOps, CpuPlatform):
    """An MI300X (gfx942, fp8 e4m3fnuz) as quantrt's checks and kernels see it, with aiter on, on CPU."""

    name: ClassVar[str] = "rocm"
    allowed_quantization: ClassVar[frozenset[str] | None] = ROCM_ALLOWED_QUANTIZATION
    linear_kernels_ref: ClassVar[str | None] = "quantrt.platforms.rocm.kernels:ROCM_LINEAR_KERNELS"
    moe_kernels_ref: ClassVar[str | None] = "quantrt.platforms.rocm.aiter_moe:ROCM_MOE_KERNELS"
    decode_attention_ref: ClassVar[str | None] = "quantrt.platforms.rocm.aiter_attention:aiter_decode_attention"

    def arch(self) -> str:
        return "gfx942"

    def is_fp8_fnuz(self) -> bool:
        return True

    def fp8_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fnuz

    def aiter_ops(self) -> EmulatedAiterOps:
        return EmulatedAiterOps(self.fp8_dtype())

    def petit_ops(self) -> EmulatedPetitOps:
        return EmulatedPetitOps()

    def device_name(self) -> str:
        return "AMD Instinct MI300X (emulated on CPU, aiter emulated)"
