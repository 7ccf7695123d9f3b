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


class EmulatedNpuOps:
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
    dist_backend: ClassVar[str] = "gloo"

    def npu_ops(self) -> EmulatedNpuOps:
        return EmulatedNpuOps()

    def device_name(self) -> str:
        return "Ascend NPU (emulated on CPU)"
