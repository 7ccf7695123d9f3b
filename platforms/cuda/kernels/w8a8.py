"""`TritonW8A8Kernel`: FP8 W8A8 (per-tensor, per-channel x per-token, 128x128 block x per-token-group),
FP8 weight-only, and INT8 W8A8 per-channel x per-token, with activation quantization fused in.

Paths by batch rows M (H100 sweep, docs/PERFORMANCE.md): M = 1 -> `gemv_w8.gemv_w8` (every fp8 mode and int8
W8A8, on CUDA, K a multiple of 64: "Sixth pass"), else M = 1 fp8 -> the GEMV `skinny_fp8.skinny_fp8` (not
128-group activations); M = 2..RING_MAX_M of e4m3 / int8 per-token or static x tensor / channel scales on Hopper
where `ring_w8._TILES` has the shape (measured faster there; fp8 from 2 rows, int8 from 3) -> the activation codes
into `ring_w8` (weight and code tiles streamed by TMA, wgmma from shared memory; sixteenth session), except that
bf16 rows (no codes handed over: the o projection after attention) go to the row GEMV where it has a tile, since it
quantizes inside and the ring would need a code launch first (the plan is per M and whether codes come with x);
other M = 2..16 of e4m3 / int8 per-token or static x tensor / channel scales where the row GEMV's tile table has
the shape (`gemv_w8_rows.tile_for`: 2 rows, int8 up to 4 at 4096x6144; thirteenth session) -> `gemv_w8_rows` (the
GEMV's structure, all rows per weight load, activations quantized inside); other M = 2..16 of e4m3 / int8
per-token or static x tensor / channel scales on the shapes of `frag_w8._TILES` (measured faster there; Gluon,
sm_89+ / sm_80+) -> the activation codes into `frag_w8` (mma.sync on fragments loaded straight from memory, ninth
session);
M <= SWAP_MAX_M with quantized activations -> `swap_fp8` (tensor cores, operands swapped; 128-group activations
from M = 1: 8192² 29.4 vs 32.4 us in the GEMV); M = 9..256 of e4m3 / int8 per-token or static x tensor / channel
scales on the shapes where it measured faster than the path before (`codes_mm.tile_for`) -> the activation codes
into `codes_mm` (split-K Triton, wgmma on K-major 8-bit operands); large batches of per-tensor/per-channel FP8 ->
cuBLASLt through `torch._scaled_mm` (activations quantized per token by one Triton launch, `act_quant_triton`);
M >= 64 int8 elsewhere -> `int8_mm` (cuBLASLt int8), fp8 128x128 blocks x 128-group activations -> `block_fp8_mm`
(cuBLASLt blockwise); other M = 17..256 -> `swap_fp8` with BM-row tiles (fp8 weight-only too); everything else ->
the tiled `w8a8_triton` kernel.

The paths on codes (`ring_w8`, `frag_w8`, `codes_mm`, `_scaled_mm`, `int8_mm`) take them from `row_codes` /
`QuantizedRows` when the op that produced x made them (the fused residual-add + RMSNorm, act * mul: one launch
fewer per linear).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrt.platforms.cuda.kernels._common import (
    check_runtime,
    gluon_available,
    interpret_mode,
    ring_device_why,
)
from quantrt.quant.kernel import LinearKernel, LinearSpec, QuantizedRows, RowCodes
from quantrt.quant.quantize import FP8_DTYPES, qmax, quantize_act_static
from quantrt.quant.weights import ActKind, FloatWeight, IntWeight, ScaleGranularity

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform

SCALED_MM_MIN_M = 64
SKINNY_MAX_M = 1  # up to here fp8 weights go to the GEMV in skinny_fp8 (H100 8192²: M=4 47 us vs 33 tiled)
GEMV_W8 = True    # M = 1: `gemv_w8.gemv_w8` (dense-GEMV structure) where it takes the shape; False: as before
SWAP_MAX_M = 16   # up to here quantized activations go to swap_fp8 (8192², per token, M=16: 31 us vs 45 tiled)
RING_MAX_M = 32   # 2..this: `ring_w8` (TMA ring on codes, Hopper) where its tile table has the shape
ROW_TILE_MAX_M = 256  # SWAP_MAX_M < M <= this (and not cuBLASLt): swap_fp8 with BM-row tiles, weight-only too
BLOCK_MM_MIN_M = 64   # from here fp8 128x128 blocks x 128-group activations: cuBLASLt blockwise (`block_fp8_mm`)
INT_MM_MIN_M = 64     # from here int8 W8A8 goes to cuBLASLt int8 (`int8_mm`; 8192², M=64: swap_fp8 57 us, bf16 49)
FRAG_MAX_M = 32       # 2..this: `frag_w8` (mma.sync on fragments loaded from memory) where its tile table has the shape
_CODE_PATHS = ("ring", "frag", "codes", "scaled_mm", "int_mm")  # the paths that run on codes made beforehand
# dynamic per-tensor activations run the static paths (2) with the scale of each call's x (`_tensor_scale`)
_ACT = {ActKind.DYNAMIC_TOKEN: 0, ActKind.DYNAMIC_GROUP: 1, ActKind.STATIC_TENSOR: 2, ActKind.DYNAMIC_TENSOR: 2,
        ActKind.NONE: 3}
_WSCALE = {ScaleGranularity.TENSOR: 0, ScaleGranularity.CHANNEL: 1, ScaleGranularity.BLOCK: 2}


def _why_not(spec: LinearSpec) -> str:
    """'' when the weight/activation pair is one this kernel computes, else the reason."""
    w, act = spec.weight, spec.act
    if isinstance(w, IntWeight):
        if w.bits != 8 or w.codes.dtype != torch.int8 or w.zero is not None or w.offset is not None:
            return "int weights must be symmetric signed int8 for W8A8"
        if w.group_size != w.shape[1] or w.g_idx is not None:
            return "int8 W8A8 needs per-channel weight scales"
        if act.kind not in (ActKind.DYNAMIC_TOKEN, ActKind.STATIC_TENSOR) or act.dtype != torch.int8:
            return f"int8 weights need int8 per-token or static activations, not {act}"
        if act.zero is not None:
            return "asymmetric static activations (an input zero point) are not supported: symmetric only"
        return ""
    if not isinstance(w, FloatWeight):
        return f"weight is {type(w).__name__}, not FloatWeight/IntWeight"
    if w.data.dtype not in FP8_DTYPES:
        return f"weight dtype {w.data.dtype} is not fp8"
    if act.kind is not ActKind.NONE and act.dtype != w.data.dtype:
        return f"activation dtype {act.dtype} differs from weight dtype {w.data.dtype}"
    block = w.granularity is ScaleGranularity.BLOCK
    if block and w.block != (128, 128):
        return f"block scales {w.block}: only 128x128 is supported"
    if act.kind is ActKind.DYNAMIC_GROUP and (not block or act.group != 128):
        return "per-token-group activations need 128x128 block weights and group 128"
    if block and act.kind in (ActKind.DYNAMIC_TOKEN, ActKind.STATIC_TENSOR, ActKind.DYNAMIC_TENSOR):
        return f"block-scaled weights with {act} activations are not supported"
    return ""


class TritonW8A8Kernel(LinearKernel):
    """W8A8 through Triton (small M) or `torch._scaled_mm` (fp8 tensor/channel, M >= 64)."""

    name = "triton_w8a8"

    def __init__(self, spec: LinearSpec, data: torch.Tensor, w_scale: torch.Tensor) -> None:
        self.compute_dtype = spec.compute_dtype  # the spec's canonical weight is not kept
        self.data = data            # [N, K] fp8/int8, K contiguous
        self.w_scale = w_scale      # fp32: [1] tensor, [N] channel, [N/128, K/128] block
        w = spec.weight
        self.wscale = 1 if isinstance(w, IntWeight) else _WSCALE[w.granularity]
        self.act = _ACT[spec.act.kind]
        self.dyn_tensor = spec.act.kind is ActKind.DYNAMIC_TENSOR
        self.qmax = qmax(data.dtype) if spec.act.kind is not ActKind.NONE else 1.0
        self.act_scale = (spec.act.scale.to(data.device, torch.float32).reshape(1)
                          if spec.act.scale is not None else None)
        self.use_scaled_mm = (data.dtype in FP8_DTYPES and self.wscale in (0, 1) and self.act in (0, 2)
                              and data.device.type == "cuda" and not interpret_mode()
                              and hasattr(torch, "_scaled_mm"))
        n, k = data.shape
        self._gemv_reason: str | None = None
        self._frag_reason: str | None = None
        self._plans: dict[int, tuple[str, object]] = {}     # M -> (path, tile), see `_plan`
        self.use_int_mm = (data.dtype == torch.int8 and self.act in (0, 2) and k % 8 == 0 and n % 8 == 0
                           and hasattr(torch, "_int_mm"))
        self.use_block_mm = (data.dtype in FP8_DTYPES and self.wscale == 2 and self.act == 1 and k % 128 == 0
                             and n % 128 == 0 and data.device.type == "cuda" and not interpret_mode()
                             and hasattr(torch, "_scaled_mm"))
        self.ring_why = self._ring_why(data)
        if self.use_scaled_mm:  # rowwise cuBLASLt needs [1, N] weight scales
            self._sb = w_scale.reshape(1, -1).expand(1, data.shape[0]).contiguous()

    @classmethod
    def can_implement(cls, spec: LinearSpec, platform: Platform) -> tuple[bool, str]:
        why = _why_not(spec)
        if why:
            return False, why
        w = spec.weight
        t = w.codes if isinstance(w, IntWeight) else w.data
        cap = platform.capability()
        if t.device.type == "cuda" and cap is not None and platform.name == "cuda" and cap.to_int() < 89 \
                and t.dtype != torch.int8 and spec.act.kind is not ActKind.NONE:
            return False, f"fp8 tensor cores need sm_89+, this GPU is sm_{cap.to_int()}"
        return check_runtime(t, spec.compute_dtype)

    @classmethod
    def prepare(cls, spec: LinearSpec, platform: Platform) -> TritonW8A8Kernel:
        w = spec.weight
        if isinstance(w, IntWeight):
            return cls(spec, w.codes.contiguous(), w.scale.to(torch.float32).reshape(-1).contiguous())
        assert isinstance(w, FloatWeight)
        return cls(spec, w.data.contiguous(), w.scale.to(torch.float32).reshape(-1 if w.scale.dim() < 2
                                                                               else w.scale.shape).contiguous())

    def _ring_why(self, data: torch.Tensor) -> str:
        """'' when M = 2..RING_MAX_M may go to `ring_w8` (Gluon, sm_90; whether it does depends on its measured
        tile table), else why it does not."""
        if data.dtype not in (torch.float8_e4m3fn, torch.int8) or self.act not in (0, 2) or self.wscale not in (0, 1):
            return "ring_w8 takes e4m3 / int8 weights, per-token/static activations and tensor/channel weight scales"
        if data.shape[1] % 128:
            return f"K={data.shape[1]} is not a multiple of 128"
        if interpret_mode() or not gluon_available():
            return "ring_w8 is a Gluon kernel: it needs a GPU and triton >= 3.5"
        return ring_device_why(data.device)

    def _gemv_why(self) -> str:
        """Why the M = 1 GEMV `gemv_w8` cannot take this weight ('' when it can); found once."""
        if self._gemv_reason is None and torch.version.hip is not None:
            self._gemv_reason = "ROCm: the GEMV was only built and measured for CUDA (PTX widening)"
        if self._gemv_reason is None:
            from quantrt.platforms.cuda.kernels.gemv_w8 import gemv_w8_why_not

            self._gemv_reason = gemv_w8_why_not(*self.data.shape, self.act, self.wscale, self.data.dtype == torch.int8)
        return self._gemv_reason

    def rows_why(self, m: int) -> str:
        """Why the row GEMV `gemv_w8_rows` (M = 2..16 on `gemv_w8`'s structure) cannot take these rows ('' when it
        can; whether it does depends on its measured tile table)."""
        if torch.version.hip is not None:
            return "ROCm: the row GEMV was only built and measured for CUDA (PTX widening, dp4a)"
        if self.data.dtype not in (torch.float8_e4m3fn, torch.int8):
            return f"the row GEMV takes e4m3 or int8 codes, not {self.data.dtype}"
        from quantrt.platforms.cuda.kernels.gemv_w8_rows import DEFAULT_TILE, config, gemv_w8_rows_why_not

        return gemv_w8_rows_why_not(m, *self.data.shape, self.act, self.wscale, self.data.dtype == torch.int8,
                                    config(DEFAULT_TILE, self.data.shape[1]))   # K steps shortened to divide K

    def frag_why(self, m: int) -> str:
        """Why `frag_w8` (M = 2..32 on mma.sync fragments) cannot take these rows ('' when it can; whether it
        does depends on its measured tile table)."""
        if not 2 <= m <= FRAG_MAX_M:
            return f"M={m} is outside 2..{FRAG_MAX_M}"
        if self._frag_reason is None:
            if self.act not in (0, 2) or self.wscale not in (0, 1):
                self._frag_reason = "frag_w8 takes per-token/static activations and tensor/channel weight scales"
            elif interpret_mode() or not gluon_available():
                self._frag_reason = "frag_w8 is a Gluon kernel: it needs a GPU and triton >= 3.5"
            else:
                from quantrt.platforms.cuda.kernels.frag_w8 import frag_why_not

                self._frag_reason = frag_why_not(2, self.data.shape[1], self.data.dtype, self.data.dtype,
                                                 self.data.device)
        return self._frag_reason

    def _codes(self, x2: torch.Tensor, act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Activation codes [M, K] and their scales [M, 1] fp32: per-token launch, or the one scale."""
        if self.act == 0:
            from quantrt.platforms.cuda.kernels.act_quant_triton import quant_rows

            return quant_rows(x2, self.data.dtype, self.qmax)
        sa = act_scale.reshape(1, 1).expand(x2.shape[0], 1).contiguous()
        return quantize_act_static(x2, act_scale, self.data.dtype), sa

    def _tensor_scale(self, x2: torch.Tensor) -> torch.Tensor:
        """[1] fp32 on the device: the static scale, or for dynamic per-tensor activations max(amax(x), 1e-12) /
        qmax of this call's x (`quant.quantize.fake_quantize_act`'s), found on the device without a host sync."""
        if not self.dyn_tensor:
            return self.act_scale
        return (x2.abs().amax().to(torch.float32).clamp(min=1e-12) / self.qmax).reshape(1)

    def _plan(self, m: int, codes: bool = True) -> tuple[str, object]:
        """(path, its tile) that `apply` takes at M rows (module docstring), with the codes handed over (`codes`,
        what `row_codes` answers for) or from bf16 rows; found once per (M, codes)."""
        plan = self._plans.get((m, codes))
        if plan is None:
            plan = self._plans[(m, codes)] = self._find_plan(m, codes)
        return plan

    def _find_plan(self, m: int, codes: bool = True) -> tuple[str, object]:
        n, k = self.data.shape
        rows = None
        if m >= 2 and self.rows_why(m) == "":
            from quantrt.platforms.cuda.kernels.gemv_w8_rows import tile_for as rows_tile

            rows = rows_tile(m, k, n, self.data.dtype == torch.int8)
        # the ring on codes, unless x comes as bf16 rows that the row GEMV quantizes inside (the ring would need a
        # code launch first: the o projection after attention at 2 rows)
        if 2 <= m <= RING_MAX_M and not self.ring_why and (codes or rows is None):
            from quantrt.platforms.cuda.kernels.ring_w8 import tile_for as ring_tile

            cfg = ring_tile(m, k, n, self.data.dtype == torch.int8)
            if cfg is not None:
                return "ring", cfg
        if rows is not None:
            return "rows", rows
        if 2 <= m <= FRAG_MAX_M and self.frag_why(m) == "":
            from quantrt.platforms.cuda.kernels.frag_w8 import tile_for as frag_tile

            cfg = frag_tile(m, k, n, self.data.dtype == torch.int8)
            if cfg is not None:
                return "frag", cfg
        if self.use_scaled_mm or self.use_int_mm:
            from quantrt.platforms.cuda.kernels.codes_mm import tile_for

            cfg = tile_for(m, k, n, self.data.dtype == torch.int8)
            if cfg is not None:
                return "codes", cfg
        if self.use_scaled_mm and m >= SCALED_MM_MIN_M:
            return "scaled_mm", None
        if self.use_block_mm and m >= BLOCK_MM_MIN_M:
            return "block_mm", None
        if self.use_int_mm and m >= INT_MM_MIN_M:
            return "int_mm", None
        if m == 1 and GEMV_W8 and self._gemv_why() == "":
            return "gemv", None
        if m <= SKINNY_MAX_M and self.data.dtype in FP8_DTYPES and self.act != 1:
            return "skinny", None
        if m <= SWAP_MAX_M and self.act != 3 or SWAP_MAX_M < m <= ROW_TILE_MAX_M:
            return "swap", None
        return "tiled", None

    def row_codes(self, m: int) -> RowCodes | None:
        """The codes this kernel makes of its M input rows before its GEMM (per-token or static), which the op
        that produces x may hand over instead (`QuantizedRows`); None where the path at M quantizes inside."""
        if self.act not in (0, 2) or self.dyn_tensor or self._plan(m)[0] not in _CODE_PATHS:
            return None
        return RowCodes(self.data.dtype, self.qmax, self.act_scale if self.act == 2 else None)

    def apply(self, x: torch.Tensor | QuantizedRows, bias: torch.Tensor | None) -> torch.Tensor:
        from quantrt.platforms.cuda.kernels.w8a8_triton import w8a8_matmul

        n, k = self.data.shape
        lead = x.shape[:-1]
        pre = isinstance(x, QuantizedRows)
        if pre:
            xq, sa = x.codes.reshape(-1, k), x.scale.reshape(-1, 1)            # made by the producing op
            m = xq.shape[0]
        else:
            x2 = x.reshape(-1, k).to(self.compute_dtype)                       # [M, K]
            m = x2.shape[0]
        path, cfg = self._plan(m, pre)
        act_scale = None if pre else self._tensor_scale(x2)
        if pre and (path not in _CODE_PATHS or xq.dtype != self.data.dtype):
            raise ValueError(f"{self.name}: activation codes {xq.dtype} were handed over at M={m}, where this "
                             f"layer takes {self.data.dtype} codes on the paths {', '.join(_CODE_PATHS)} (its path "
                             f"is {path}): ask row_codes(M) first")
        if path in _CODE_PATHS and not pre:
            xq, sa = self._codes(x2, act_scale)                                # [M, K] codes, [M, 1] fp32
        if path == "ring":
            from quantrt.platforms.cuda.kernels.ring_w8 import ring_w8

            y = ring_w8(xq, sa, self.data, self.w_scale, self.compute_dtype, cfg)
        elif path == "frag":
            from quantrt.platforms.cuda.kernels.frag_w8 import frag_w8

            y = frag_w8(xq, sa, self.data, self.w_scale, self.compute_dtype, cfg)
        elif path == "codes":
            from quantrt.platforms.cuda.kernels.codes_mm import codes_mm

            y = codes_mm(xq, sa, self.data, self.w_scale, self.compute_dtype, cfg)
        elif path == "scaled_mm":
            y = torch._scaled_mm(xq, self.data.t(), scale_a=sa, scale_b=self._sb, out_dtype=self.compute_dtype)
        elif path == "int_mm":
            from quantrt.platforms.cuda.kernels.int8_mm import int8_mm

            y = int8_mm(xq, sa, self.data, self.w_scale, self.compute_dtype)
        elif path == "block_mm":
            from quantrt.platforms.cuda.kernels.block_fp8_mm import block_fp8_mm

            y = block_fp8_mm(x2, self.data, self.w_scale, self.qmax)
        elif path == "gemv":
            from quantrt.platforms.cuda.kernels.gemv_w8 import gemv_w8

            y = gemv_w8(x2, self.data, self.w_scale, self.act, self.wscale, self.qmax, act_scale,
                        release_early=self.release_early)
        elif path == "rows":
            from quantrt.platforms.cuda.kernels.gemv_w8_rows import gemv_w8_rows

            y = gemv_w8_rows(x2, self.data, self.w_scale, self.act, self.wscale, self.qmax, act_scale, cfg)
        elif path == "skinny":
            from quantrt.platforms.cuda.kernels.skinny_fp8 import skinny_fp8

            y = skinny_fp8(x2, self.data, self.w_scale, self.act, self.wscale, self.qmax, act_scale)
        elif path == "swap":
            from quantrt.platforms.cuda.kernels.swap_fp8 import swap_fp8

            y = swap_fp8(x2, self.data, self.w_scale, self.act, self.wscale, self.qmax, act_scale)
        else:
            y = w8a8_matmul(x2, self.data, self.w_scale, self.act, self.wscale, self.qmax, act_scale)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, n)
