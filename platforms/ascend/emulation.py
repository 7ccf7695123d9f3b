"""CPU emulation of the torch_npu ops in NpuOps, written from their documented semantics (torch_npu API
reference and the CANN aclnn pages: shapes, dtypes, scale/offset conventions), plus an emulated Ascend
platform (name "npu", tensors on CPU) so the NPU kernels run end to end in CI. Emulated: not a substitute
for running on an Ascend NPU (NZ layouts, int64 deq_scale packing and real rounding are not modelled).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from quantrt.platforms.xpu.cpu_platform import CpuPlatform

_HALF = (torch.float16, torch.bfloat16)
_OUT = (torch.float16, torch.bfloat16, torch.int8)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"[emulated torch_npu] {msg}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values [..., C] (held in any int dtype) -> int32 [..., C/8], element j in bits 4j..4j+3."""
    _check(q.shape[-1] % 8 == 0, f"int4 packing needs the last dim divisible by 8, got {q.shape[-1]}")
    nib = (q.to(torch.int64) & 0xF).reshape(*q.shape[:-1], -1, 8)
    word = (nib << (4 * torch.arange(8, dtype=torch.int64))).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int4(w: torch.Tensor) -> torch.Tensor:
    """int32 [..., C/8] -> signed int4 values as int8 [..., C] (inverse of pack_int4)."""
    nib = (w.to(torch.int64)[..., None] >> (4 * torch.arange(8, dtype=torch.int64))) & 0xF
    return torch.where(nib >= 8, nib - 16, nib).reshape(*w.shape[:-1], -1).to(torch.int8)


def _int_operand(t: torch.Tensor) -> torch.Tensor:
    """x1/x2 of npu_quant_matmul: int8 as is, int32 = 8 packed int4 along the last dim."""
    _check(t.dtype in (torch.int8, torch.int32), f"quant matmul operands are int8 or int32, got {t.dtype}")
    return unpack_int4(t) if t.dtype == torch.int32 else t


_NO_LIMIT = 2147483647
_LAYOUTS = ("BSH", "BSND", "BNSD", "TND")


def _ints(lengths: Any) -> list[int]:
    return [int(v) for v in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]


def _per_seq_q(q: torch.Tensor, layout: str, n: int, lens: list[int] | None) -> list[torch.Tensor]:
    """query in `layout` -> per sequence [N, Sq_b, D] (rows past actual_seq_lengths dropped)."""
    if layout == "TND":
        _check(q.dim() == 3 and q.shape[1] == n, f"TND query must be [T, num_heads={n}, D], got {tuple(q.shape)}")
        _check(lens is not None, "TND needs actual_seq_lengths (cumulative ends)")
        starts = [0, *lens[:-1]]
        return [q[a:e].transpose(0, 1) for a, e in zip(starts, lens)]
    if layout == "BSH":
        _check(q.dim() == 3 and q.shape[2] % n == 0, f"BSH query must be [B, S, num_heads*D], got {tuple(q.shape)}")
        q4 = q.view(q.shape[0], q.shape[1], n, -1).transpose(1, 2)
    elif layout == "BSND":
        _check(q.dim() == 4 and q.shape[2] == n, f"BSND query must be [B, S, {n}, D], got {tuple(q.shape)}")
        q4 = q.transpose(1, 2)
    else:
        _check(q.dim() == 4 and q.shape[1] == n, f"BNSD query must be [B, {n}, S, D], got {tuple(q.shape)}")
        q4 = q
    lens = lens if lens is not None else [q4.shape[2]] * q4.shape[0]
    _check(len(lens) == q4.shape[0] and max(lens) <= q4.shape[2], "actual_seq_lengths do not fit the query")
    return [q4[b, :, :s] for b, s in enumerate(lens)]


def _per_seq_kv(x: torch.Tensor, layout: str, nkv: int, d: int, lens: list[int] | None, bt: torch.Tensor | None,
                bs: int, batch: int) -> list[torch.Tensor]:
    """key/value -> per sequence [Nkv, Skv_b, D]. Paged (block_table): x is (blocknum, blocksize, Nkv*D) or
    (blocknum, Nkv, blocksize, D); token j of sequence b is row j % bs of block block_table[b, j // bs]."""
    if bt is not None:
        _check(bt.dtype == torch.int32 and bt.dim() == 2 and bt.shape[0] == batch,
               f"block_table must be int32 [B={batch}, max_blocks], got {bt.dtype} {tuple(bt.shape)}")
        _check(bs > 0 and bs % 16 == 0, f"block_size must be a positive multiple of 16, got {bs}")
        _check(lens is not None, "paged attention (block_table) needs actual_seq_lengths_kv")
        if x.dim() == 3:
            _check(x.shape[1] == bs and x.shape[2] == nkv * d, f"paged cache must be (blocknum, {bs}, {nkv * d}), "
                   f"got {tuple(x.shape)}")
            rows = x.view(x.shape[0], bs, nkv, d)
        else:
            _check(x.dim() == 4 and x.shape[1:] == (nkv, bs, d), f"paged cache must be (blocknum, {nkv}, {bs}, {d})"
                   f", got {tuple(x.shape)}")
            rows = x.transpose(1, 2)
        flat = rows.reshape(-1, nkv, d)                                          # [blocknum*bs, Nkv, D]
        out = []
        for b, s in enumerate(lens):
            _check(s <= bt.shape[1] * bs, f"sequence {b}: {s} keys exceed its {bt.shape[1]} blocks of {bs}")
            j = torch.arange(s)
            blocks = bt[b].long()[j // bs]
            _check(bool((blocks >= 0).all() and (blocks < x.shape[0]).all()), f"block_table[{b}] out of range")
            out.append(flat[blocks * bs + j % bs].transpose(0, 1))
        return out
    return _per_seq_q(x, layout, nkv, lens)


def _allowed(mode: int, sq: int, skv: int, mask: torch.Tensor | None, b: int, pre: int, nxt: int
             ) -> torch.Tensor:
    """[N or 1, Sq, Skv] bool: True where query i may attend key j (atten_mask: 1/True = masked)."""
    i, j = torch.arange(sq)[:, None], torch.arange(skv)[None, :]
    if mode == 0:
        _check(pre == _NO_LIMIT and nxt == _NO_LIMIT, "pre_tokens/next_tokens with sparse_mode 0 are not emulated")
        if mask is None:
            return torch.ones(1, sq, skv, dtype=torch.bool)
        m = mask.bool()
        if m.dim() == 4:
            m = m[b]                                                             # [N|1, Sq', Skv']
        elif m.dim() == 3:
            m = m[b][None]
        else:
            m = m[None]
        _check(m.shape[-2] >= sq and m.shape[-1] >= skv, f"atten_mask {tuple(mask.shape)} is smaller than "
               f"[{sq}, {skv}]")
        return ~m[..., :sq, :skv]
    _check(mode in (2, 3, 4), f"sparse_mode {mode} is not emulated (0, 2 leftUpCausal, 3 rightDownCausal, 4 band)")
    _check(mask is not None and tuple(mask.shape) == (2048, 2048) and
           torch.equal(mask.bool(), torch.ones(2048, 2048, dtype=torch.bool).triu(1)),
           f"sparse_mode {mode} takes the compressed 2048x2048 upper-triangular atten_mask")
    off = 0 if mode == 2 else skv - sq
    if mode in (2, 3):
        return (j <= i + off)[None]
    return ((j >= i + off - pre) & (j <= i + off + nxt))[None]


class EmulatedNpuAttentionOps:
    """torch_npu's fused attention and MoE gating ops on CPU (fp32 scores, fp32 softmax, fp32 P.V)."""

    def npu_fused_infer_attention_score(
            self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
            atten_mask: torch.Tensor | None = None, actual_seq_lengths: Any = None,
            actual_seq_lengths_kv: Any = None, block_table: torch.Tensor | None = None, num_heads: int = 1,
            scale: float = 1.0, pre_tokens: int = _NO_LIMIT, next_tokens: int = _NO_LIMIT,
            input_layout: str = "BSH", num_key_value_heads: int = 0, sparse_mode: int = 0,
            inner_precise: int = 0, block_size: int = 0, softmax_lse_flag: bool = False,
            **others: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_out in query's layout and dtype, softmax_lse [B, N, Sq, 1] fp32 (TND: [T, N, 1]) when
        softmax_lse_flag, else a [1] zero). TND: actual_seq_lengths are cumulative ends; actual_seq_lengths_kv
        too for contiguous K/V, per sequence for a paged cache (how vllm-ascend calls it). Quantization, pse,
        shared prefix and rope inputs are not emulated."""
        given = sorted(k for k, v in others.items() if v is not None)
        _check(not given, f"npu_fused_infer_attention_score inputs not emulated: {', '.join(given)}")
        _check(input_layout in _LAYOUTS, f"input_layout {input_layout!r} not in {', '.join(_LAYOUTS)}")
        _check(query.dtype in _HALF and key.dtype == query.dtype and value.dtype == query.dtype,
               f"query/key/value must share float16/bfloat16, got {query.dtype}/{key.dtype}/{value.dtype}")
        _check(inner_precise in (0, 1), f"inner_precise {inner_precise}")
        n = num_heads
        nkv = num_key_value_heads or n
        _check(n % nkv == 0, f"num_heads {n} is not a multiple of num_key_value_heads {nkv}")
        q_lens = None if actual_seq_lengths is None else _ints(actual_seq_lengths)
        kv_lens = None if actual_seq_lengths_kv is None else _ints(actual_seq_lengths_kv)
        qs = _per_seq_q(query, input_layout, n, q_lens)
        d = qs[0].shape[-1]
        ks = _per_seq_kv(key, input_layout, nkv, d, kv_lens, block_table, block_size, len(qs))
        vs = _per_seq_kv(value, input_layout, nkv, d, kv_lens, block_table, block_size, len(qs))
        _check(len(ks) == len(qs), f"{len(qs)} query sequences but {len(ks)} key sequences")
        outs, lses = [], []
        for b, (qb, kb, vb) in enumerate(zip(qs, ks, vs)):
            kb = kb.to(torch.float32).repeat_interleave(n // nkv, 0)            # [N, Skv, D] (head h -> h // G)
            vb = vb.to(torch.float32).repeat_interleave(n // nkv, 0)
            s = (qb.to(torch.float32) @ kb.transpose(1, 2)) * scale             # [N, Sq, Skv] fp32
            ok = _allowed(sparse_mode, qb.shape[1], kb.shape[1], atten_mask, b, pre_tokens, next_tokens)
            s = s.masked_fill(~ok, float("-inf"))
            lse = torch.logsumexp(s, -1, keepdim=True)                           # [N, Sq, 1]
            p = torch.where(ok, (s - lse).exp(), 0.0)                            # fully masked rows: zeros
            outs.append((p @ vb).to(query.dtype))                                # [N, Sq, D]
            lses.append(lse)
        if input_layout == "TND":
            out = torch.cat([o.transpose(0, 1) for o in outs])                   # [T, N, D]
            lse_out = torch.cat([x.transpose(0, 1) for x in lses])
        else:
            s_max = query.shape[1] if input_layout != "BNSD" else query.shape[2]
            o4 = torch.zeros(len(outs), n, s_max, d, dtype=query.dtype)
            l4 = torch.zeros(len(outs), n, s_max, 1)
            for b, (o, x) in enumerate(zip(outs, lses)):
                o4[b, :, : o.shape[1]], l4[b, :, : o.shape[1]] = o, x
            out = {"BNSD": o4, "BSND": o4.transpose(1, 2).contiguous(),
                   "BSH": o4.transpose(1, 2).reshape(len(outs), s_max, n * d)}[input_layout]
            lse_out = l4
        return out, (lse_out if softmax_lse_flag else torch.zeros(1))

    def npu_moe_gating_top_k_softmax(self, x: torch.Tensor, finished: torch.Tensor | None = None, k: int = 1
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, E] -> (y [T, k] = top-k of softmax(x) in x's dtype (softmax in fp32, not renormalized),
        expert_idx [T, k] int32, row_idx [T, k] int32 = j * T + i)."""
        _check(x.dim() == 2 and x.dtype in (*_HALF, torch.float32), f"x must be 2-D float, got {x.dtype} {x.dim()}-D")
        _check(finished is None, "finished rows are not emulated")
        _check(0 < k <= x.shape[1], f"k {k} must be in [1, {x.shape[1]}]")
        y, idx = x.to(torch.float32).softmax(-1).topk(k, -1)
        t = x.shape[0]
        row = (torch.arange(k)[None, :] * t + torch.arange(t)[:, None]).to(torch.int32)
        return y.to(x.dtype), idx.to(torch.int32), row

    def npu_moe_gating_top_k(self, x: torch.Tensor, k: int, *, bias: torch.Tensor | None = None, k_group: int = 1,
                             group_count: int = 1, group_select_mode: int = 0, renorm: int = 0,
                             norm_type: int = 0, out_flag: bool = False, routed_scaling_factor: float = 1.0,
                             eps: float = 1e-20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """norm = softmax (norm_type 0) | sigmoid (1) of x in fp32; choice = norm + bias; groups ranked by their
        max (group_select_mode 0) or top-2 sum (1) of choice, k_group kept; top-k of choice inside them;
        y = norm at those experts / (sum + eps) * routed_scaling_factor, in x's dtype; expert_idx int32;
        third output: norm when out_flag."""
        _check(x.dim() == 2 and x.dtype in (*_HALF, torch.float32), f"x must be 2-D float, got {x.dtype}")
        e = x.shape[1]
        _check(e <= 2048 and e % group_count == 0, f"{e} experts must be <= 2048 and divisible by {group_count}")
        _check(0 < k_group <= group_count, f"k_group {k_group} must be in [1, group_count={group_count}]")
        _check(0 < k <= e // group_count * k_group, f"k {k} must be in [1, {e // group_count * k_group}]")
        _check(renorm == 0 and norm_type in (0, 1) and group_select_mode in (0, 1),
               f"renorm {renorm} / norm_type {norm_type} / group_select_mode {group_select_mode}")
        _check(bias is None or (bias.shape == (e,) and bias.dtype == x.dtype), "bias must be [E] in x's dtype")
        norm = x.to(torch.float32).softmax(-1) if norm_type == 0 else x.to(torch.float32).sigmoid()
        choice = norm if bias is None else norm + bias.to(torch.float32)[None, :]
        if group_count > 1:
            g = choice.view(x.shape[0], group_count, -1)
            score = g.amax(-1) if group_select_mode == 0 else g.topk(2, -1).values.sum(-1)
            keep = torch.zeros_like(score).scatter_(1, score.topk(k_group, -1).indices, 1.0).bool()
            choice = choice.masked_fill(~keep.repeat_interleave(e // group_count, 1), float("-inf"))
        idx = choice.topk(k, -1).indices
        y = norm.gather(1, idx)
        y = y / (y.sum(-1, keepdim=True) + eps) * routed_scaling_factor
        return y.to(x.dtype), idx.to(torch.int32), (norm if out_flag else torch.zeros(0))


class EmulatedNpuOps(EmulatedNpuAttentionOps):
    """NpuOps on CPU. Integer products are exact (float64 GEMM below 2^53, else int64); scaling is fp32."""

    def npu_quantize(self, x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                     dtype: torch.dtype, axis: int = -1, div_mode: bool = True) -> torch.Tensor:
        _check(dtype in (torch.qint8, torch.int8), f"npu_quantize emulation supports qint8, got {dtype}")
        xf = x.to(torch.float32)
        y = xf / scales.to(torch.float32) if div_mode else xf * scales.to(torch.float32)
        if zero_points is not None:
            y = y + zero_points.to(torch.float32)
        return y.round().clamp(-128, 127).to(torch.int8)

    def npu_dynamic_quant(self, x: torch.Tensor, *, smooth_scales: torch.Tensor | None = None,
                          dst_type: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        _check(x.dtype in _HALF, f"npu_dynamic_quant takes float16/bfloat16, got {x.dtype}")
        _check(x.dim() > 1, "npu_dynamic_quant needs x with more than one dimension")
        int4 = dst_type == torch.quint4x2
        _check(dst_type in (None, torch.int8) or int4, f"dst_type must be int8 or quint4x2, got {dst_type}")
        xf = x.to(torch.float32)
        if smooth_scales is not None:
            xf = xf * smooth_scales.to(torch.float32)
        qmax = 7.0 if int4 else 127.0
        scale = xf.abs().amax(dim=-1).clamp(min=1e-12) / qmax                  # [...] fp32
        q = (xf / scale[..., None]).round().clamp(-qmax, qmax).to(torch.int8)
        return (pack_int4(q) if int4 else q), scale

    def npu_quant_matmul(self, x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *,
                         offset: torch.Tensor | None = None, pertoken_scale: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None,
                         output_dtype: torch.dtype | None = None) -> torch.Tensor:
        a, b = _int_operand(x1), _int_operand(x2)                              # [M, K], [K, N]
        _check(x1.dtype == x2.dtype, "x1 and x2 must share a dtype")
        _check(a.shape[-1] == b.shape[-2], f"K mismatch: {tuple(a.shape)} @ {tuple(b.shape)}")
        _check(scale.dim() == 1 and scale.numel() in (1, b.shape[-1]), "scale must be 1-D (1,) or (n,)")
        _check(scale.dtype in (torch.float32, torch.bfloat16), f"scale dtype {scale.dtype} (int64 not emulated)")
        out_dtype = output_dtype or torch.int8
        _check(out_dtype in _OUT, f"output_dtype {out_dtype} not in int8/float16/bfloat16")
        if a.shape[-1] <= 2 ** 38:  # |acc| <= K * 128^2 < 2^53: float64 GEMM is exact, and BLAS-fast
            acc = (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int64)  # exact [M, N]
        else:
            acc = a.to(torch.int64) @ b.to(torch.int64)
        float_bias = bias is not None and bias.dtype != torch.int32
        if bias is not None and not float_bias:
            acc = acc + bias.to(torch.int64)
        y = acc.to(torch.float32) * scale.to(torch.float32)
        if pertoken_scale is not None:
            _check(pertoken_scale.shape == a.shape[:-1], "pertoken_scale must be (m,)")
            y = y * pertoken_scale.to(torch.float32)[..., None]
        if offset is not None:
            _check(not float_bias and pertoken_scale is None, "offset only without pertoken/float bias")
            y = y + offset.to(torch.float32)
        if float_bias:
            y = y + bias.to(torch.float32)
        if out_dtype == torch.int8:
            return y.round().clamp(-128, 127).to(torch.int8)
        return y.to(out_dtype)

    def npu_weight_quant_batchmatmul(self, x: torch.Tensor, weight: torch.Tensor,
                                     antiquant_scale: torch.Tensor,
                                     antiquant_offset: torch.Tensor | None = None,
                                     quant_scale: torch.Tensor | None = None,
                                     quant_offset: torch.Tensor | None = None,
                                     bias: torch.Tensor | None = None,
                                     antiquant_group_size: int = 0) -> torch.Tensor:
        _check(x.dtype in _HALF, f"x must be float16/bfloat16, got {x.dtype}")
        _check(antiquant_scale.dtype == x.dtype, "antiquant_scale must have x's dtype")
        _check(quant_scale is None and antiquant_group_size == 0, "only per-channel, unquantized output emulated")
        w = _int_operand(weight).to(torch.float32)                              # [K, N]
        if antiquant_offset is not None:
            w = w + antiquant_offset.to(torch.float32).reshape(1, -1)
        w = (w * antiquant_scale.to(torch.float32).reshape(1, -1)).to(x.dtype)  # dequantized in x's dtype
        y = x.to(torch.float32) @ w.to(torch.float32)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype)

    def npu_grouped_matmul(self, x: list[torch.Tensor], weight: list[torch.Tensor], *,
                           bias: list[torch.Tensor] | None = None, scale: list[torch.Tensor] | None = None,
                           per_token_scale: list[torch.Tensor] | None = None, group_list: Any = None,
                           split_item: int = 0, group_type: int | None = None, group_list_type: int = 0,
                           output_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """x split along M by `group_list` (group_type 0; group_list_type 0: cumulative row ends, 1: counts), or
        lists of x. weight: a list of [K, N] per group, or one [E, K, N] stacked tensor. Float x: x @ w.
        Quantized x (int8, or int32 = 8 packed int4) with int weights: exact integer products, then
        * scale [E, N] (per channel) or per K-group [E, K/G, N] (each K-group's partial product scaled),
        * per_token_scale [M], + bias, cast to output_dtype (float16/bfloat16)."""
        if len(weight) == 1 and weight[0].dim() == 3:
            weight = list(weight[0].unbind(0))
        if len(x) == 1 and len(weight) > 1:
            _check(group_list is not None and group_type == 0, "one x with many weights needs group_list")
            sizes = [int(v) for v in group_list]
            ends = sizes if group_list_type == 0 else torch.tensor(sizes).cumsum(0).tolist()
            _check(group_list_type in (0, 1), f"group_list_type {group_list_type}")
            _check(len(ends) == len(weight) and ends[-1] <= x[0].shape[0], "group_list does not fit x / weight")
            xs = list(torch.tensor_split(x[0], ends[:-1]))[: len(weight)]
            xs[-1] = xs[-1][: ends[-1] - (ends[-2] if len(ends) > 1 else 0)]
            pts = (list(torch.tensor_split(per_token_scale[0], ends[:-1]))[: len(weight)]
                   if per_token_scale is not None else None)
        else:
            xs, pts = x, per_token_scale
        _check(len(xs) == len(weight), "x and weight lists differ in length")
        quant = xs[0].dtype in (torch.int8, torch.int32)
        if not quant:
            ys = [xi.to(torch.float32) @ wi.to(torch.float32) for xi, wi in zip(xs, weight)]
            out_dt = [xi.dtype for xi in xs]
        else:
            _check(scale is not None and pts is not None, "quantized x needs scale and per_token_scale")
            _check(output_dtype in _HALF, f"output_dtype {output_dtype} for quantized grouped matmul")
            sc = list(scale[0].unbind(0)) if len(scale) == 1 and len(weight) > 1 else scale
            ys = []
            for xi, wi, si, ti in zip(xs, weight, sc, pts):
                a, b = _int_operand(xi).to(torch.float64), _int_operand(wi).to(torch.float64)   # exact
                _check(a.shape[-1] == b.shape[0], f"K mismatch {tuple(a.shape)} @ {tuple(b.shape)}")
                si = si.to(torch.float32)
                if si.dim() == 1:                                                # [N] per channel
                    y = (a @ b).to(torch.float32) * si
                else:                                                            # [K/G, N] per K-group
                    g = b.shape[0] // si.shape[0]
                    parts = [(a[:, j * g:(j + 1) * g] @ b[j * g:(j + 1) * g]).to(torch.float32) * si[j]
                             for j in range(si.shape[0])]
                    y = torch.stack(parts).sum(0) if parts else torch.zeros(a.shape[0], b.shape[1])
                ys.append(y * ti.to(torch.float32)[:, None])
            out_dt = [output_dtype] * len(ys)
        if bias is not None:
            bs = list(bias[0].unbind(0)) if len(bias) == 1 and len(weight) > 1 else bias
            ys = [y + b.to(torch.float32) for y, b in zip(ys, bs)]
        ys = [y.to(d) for y, d in zip(ys, out_dt)]
        return [torch.cat(ys)] if split_item in (2, 3) else ys

    def npu_convert_weight_to_int4pack(self, weight: torch.Tensor) -> torch.Tensor:
        _check(weight.dtype == torch.int32 and weight.dim() == 2, "weight must be 2-D int32 holding int4")
        _check(bool(((weight >= -8) & (weight <= 7)).all()), "values must be int4 (-8..7)")
        return pack_int4(weight)


class EmulatedAscendPlatform(CpuPlatform):
    """Ascend as far as quantrt's checks and kernels see it (name "npu"), computing on CPU via EmulatedNpuOps."""

    name: ClassVar[str] = "npu"
    linear_kernels_ref: ClassVar[str | None] = "quantrt.platforms.ascend.kernels:NPU_LINEAR_KERNELS"
    moe_kernels_ref: ClassVar[str | None] = "quantrt.platforms.ascend.moe_kernels:NPU_MOE_KERNELS"
    decode_attention_ref: ClassVar[str | None] = "quantrt.platforms.ascend.attention:npu_decode_attention"
    extend_attention_ref: ClassVar[str | None] = "quantrt.platforms.ascend.attention:npu_extend_attention"
    dist_backend: ClassVar[str] = "gloo"

    def npu_ops(self) -> EmulatedNpuOps:
        return EmulatedNpuOps()

    def topk_op(self) -> Any:
        from quantrt.platforms.ascend.attention import NpuTopK

        return NpuTopK(self.npu_ops())

    def device_name(self) -> str:
        return "Ascend NPU (emulated on CPU)"
