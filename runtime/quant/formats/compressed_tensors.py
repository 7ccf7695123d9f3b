"""compressed-tensors checkpoints (llm-compressor output, FORMATS.md §2.5) -> canonical weights.

| format                          | tensors                                              | canonical      |
|---------------------------------|------------------------------------------------------|----------------|
| float-/naive-quantized FP8      | weight e4m3 [N,K], weight_scale [1]/[N,1]/[nb,kb]     | FloatWeight    |
| int-/naive-quantized INT8       | weight int8 [N,K], weight_scale [1]/[N,1]             | IntWeight 8b   |
| pack-quantized W4A16 / W8A16    | weight_packed int32 [N,K·b/32], weight_scale [N,K/G], | IntWeight      |
|                                 | weight_shape, weight_zero_point [N·b/32,K/G] (asym),  |                |
|                                 | weight_g_idx [K] (act-order)                          |                |
| nvfp4-pack-quantized (NVFP4A16) | weight_packed u8 [N,K/2], weight_scale e4m3 [N,K/16], | MicroWeight 16 |
|                                 | weight_global_scale [1]                               |                |

Activations: dynamic per-token, dynamic per-group (FP8_BLOCK), static per-tensor (`input_scale`) or none.
KV-cache scales (`kv_cache_scheme`; `k_proj/v_proj.output_scale`) are kept in `kv_scales` for the
KV cache to read; quantizing the cache is the KV cache's business.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from quantrt.errors import CheckpointError, ConfigError, NotSupportedYet
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.formats.ct_config import BUILT_FORMATS, CtConfig, CtScheme
from quantrt.quant.formats.fp8 import _check_scale
from quantrt.quant.formats.gptq import split_partial_groups
from quantrt.quant.weights import (
    WEIGHT_ONLY,
    ActKind,
    ActScheme,
    FloatWeight,
    IntWeight,
    MicroWeight,
    QuantizedWeight,
    ScaleGranularity,
)

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs


def unpack_int32(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """[R, W] int32 densely packed LSB-first along dim 1 (element i at bit i·bits of the row's bitstream)
    -> [R, count] uint8 (compressed-tensors pack_to_int32; widths like 3 cross word boundaries)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF                               # [R, W]
    shifts = torch.arange(32, dtype=torch.int64)
    stream = ((words[..., None] >> shifts) & 1).reshape(packed.shape[0], -1)  # [R, W*32] bits
    need = count * bits
    if stream.shape[1] < need:
        raise CheckpointError(f"packed tensor holds {stream.shape[1] // bits} values, expected {count}")
    vals = stream[:, :need].reshape(packed.shape[0], count, bits)
    return (vals << torch.arange(bits, dtype=torch.int64)).sum(-1).to(torch.uint8)


def _fp8_act(a) -> torch.dtype:
    return torch.float8_e4m3fn if a.type == "float" else torch.int8


@register_format
class CompressedTensorsFormat(QuantFormat):
    name = "compressed-tensors"

    def __init__(self, cfg: CtConfig):
        self.cfg = cfg
        self.kv_scales: dict[str, torch.Tensor] = {}      # "model.layers.0.self_attn.k_proj" -> scalar
        self._input_scales: dict[str, torch.Tensor] = {}
        for _, s in cfg.schemes:
            self._check_supported(s)

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> CompressedTensorsFormat:
        if not qcfg:
            raise ConfigError("compressed-tensors reads quantized checkpoints; it has no online mode")
        return cls(CtConfig.parse(qcfg))

    def describe(self) -> str:
        return "compressed-tensors (" + "; ".join(s.describe() for _, s in self.cfg.schemes) + ")"

    @staticmethod
    def _check_supported(s: CtScheme) -> None:
        w, a = s.weights, s.inputs
        if s.format not in BUILT_FORMATS:
            raise NotSupportedYet(f"compressed-tensors format {s.format!r} (config group {s.group!r}) is "
                                  f"recognised but not supported yet (supported: {', '.join(BUILT_FORMATS)})")
        if s.format == "nvfp4-pack-quantized":
            if a is not None:
                raise NotSupportedYet(f"compressed-tensors NVFP4 with fp4 activations (W4A4, group {s.group!r}) "
                                      f"is recognised but not supported yet; NVFP4A16 is")
            return
        if s.format == "pack-quantized":
            if w.type != "int" or w.num_bits > 8 or a is not None:
                raise NotSupportedYet(f"compressed-tensors pack-quantized group {s.group!r} must be integer "
                                      f"weight-only (W4A16/W8A16)")
            return
        if w.num_bits != 8 or not w.symmetric:
            raise NotSupportedYet(f"compressed-tensors {s.format} group {s.group!r}: only symmetric 8-bit "
                                  f"weights are supported (got {w.num_bits}-bit, symmetric={w.symmetric})")
        if a is not None and not a.symmetric:
            raise NotSupportedYet(f"compressed-tensors group {s.group!r}: asymmetric activations "
                                  f"(input_zero_point) are recognised but not supported yet")

    def scheme(self, prefix: str) -> CtScheme | None:
        return self.cfg.scheme_for(prefix)

    def is_quantized(self, prefix: str) -> bool:
        return self.scheme(prefix) is not None

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        s = self.scheme(prefix)
        assert s is not None
        opt = {"output_scale"} if self.cfg.kv_cache_scheme and prefix.endswith(("k_proj", "v_proj")) else set()
        if s.format == "pack-quantized":
            req = {"weight_packed", "weight_scale", "weight_shape"}
            if not s.weights.symmetric:
                req.add("weight_zero_point")
            return frozenset(req), frozenset(opt | {"weight_g_idx"})
        if s.format == "nvfp4-pack-quantized":
            return frozenset({"weight_packed", "weight_scale", "weight_global_scale"}), frozenset(opt)
        req = {"weight", "weight_scale"}
        if s.inputs is not None and not s.inputs.dynamic:
            req.add("input_scale")
        return frozenset(req), frozenset(opt | {"weight_zero_point"})

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor],
                    shape: tuple[int, int]) -> QuantizedWeight:
        s = self.scheme(prefix)
        assert s is not None
        if "output_scale" in tensors:
            self.kv_scales[prefix] = _check_scale(prefix, "output_scale", tensors["output_scale"], ())
        if s.format == "pack-quantized":
            return self._packed(prefix, s, tensors, shape)
        if s.format == "nvfp4-pack-quantized":
            return self._nvfp4(prefix, tensors, shape)
        return self._w8(prefix, s, tensors, shape)

    # ---- per format ------------------------------------------------------------------------------
    def _w8(self, prefix: str, s: CtScheme, t: dict[str, torch.Tensor], shape: tuple[int, int]) -> QuantizedWeight:
        w, n, k = t["weight"], shape[0], shape[1]
        want = torch.float8_e4m3fn if s.weights.type == "float" else torch.int8
        if w.dtype != want or tuple(w.shape) != shape:
            raise CheckpointError(f"{prefix}.weight is {w.dtype} {tuple(w.shape)}; this {s.format} scheme "
                                  f"stores {want} {shape}")
        if "weight_zero_point" in t and bool(t["weight_zero_point"].any()):
            raise CheckpointError(f"{prefix}.weight_zero_point is non-zero but the scheme is symmetric")
        strat = s.weights.strategy
        if s.inputs is not None and not s.inputs.dynamic:
            xs = _check_scale(prefix, "input_scale", t["input_scale"], ())
            if xs.item() == 0:
                raise CheckpointError(f"{prefix}.input_scale is 0")
            self._input_scales[prefix] = xs
        if strat == "block":
            bn, bk = s.weights.block_structure or (128, 128)
            sc = _check_scale(prefix, "weight_scale", t["weight_scale"], (-(-n // bn), -(-k // bk)))
            if want == torch.int8:
                raise NotSupportedYet(f"{prefix}: block-scaled INT8 is recognised but not supported yet")
            return FloatWeight(w, sc, ScaleGranularity.BLOCK, (bn, bk))
        per_row = strat == "channel"
        sc = _check_scale(prefix, "weight_scale", t["weight_scale"], (n, 1) if per_row else ())
        if want == torch.int8:
            return IntWeight(w, sc.reshape(n, 1) if per_row else sc.reshape(1, 1).expand(n, 1).contiguous(),
                             bits=8, group_size=k)
        if per_row:
            return FloatWeight(w, sc.reshape(n), ScaleGranularity.CHANNEL)
        return FloatWeight(w, sc, ScaleGranularity.TENSOR)

    def _packed(self, prefix: str, s: CtScheme, t: dict[str, torch.Tensor], shape: tuple[int, int]) -> IntWeight:
        n, k = shape
        b = s.weights.num_bits
        packed = t["weight_packed"]
        if packed.dtype != torch.int32 or packed.shape[0] != n or packed.shape[1] != -(-k * b // 32):
            raise CheckpointError(f"{prefix}.weight_packed is {packed.dtype} {tuple(packed.shape)}; expected "
                                  f"int32 {(n, -(-k * b // 32))}")
        ws = t["weight_shape"].reshape(-1).tolist()
        if [int(v) for v in ws] != [n, k]:
            raise CheckpointError(f"{prefix}.weight_shape is {ws}, expected {[n, k]}")
        gs = k if s.weights.strategy == "channel" else (s.weights.group_size or k)
        g = -(-k // gs)                                         # a partial last group when gs does not divide K
        # integer weights may have negative scales: auto-round's symmetric quantizer divides by the signed
        # largest-magnitude value (its llm_compressor export writes them); w = (q - z) * s holds either way
        raw = t["weight_scale"]
        mag = _check_scale(prefix, "weight_scale", raw.abs(), (n, g))
        scale = torch.where(raw.reshape(n, g) < 0, -mag, mag)
        codes = unpack_int32(packed, b, k)                                    # [N, K] uint8, zero 2^(b-1)
        if s.weights.symmetric:
            zero = torch.full((n, g), 1 << (b - 1), dtype=torch.int32)
        else:
            zp = t["weight_zero_point"]
            if zp.dtype != torch.int32 or tuple(zp.shape) != (-(-n * b // 32), g):
                raise CheckpointError(f"{prefix}.weight_zero_point is {zp.dtype} {tuple(zp.shape)}; expected "
                                      f"int32 {(-(-n * b // 32), g)} (packed along N)")
            zero = unpack_int32(zp.t().contiguous(), b, n).t().to(torch.int32)  # [N, G], offset 2^(b-1)
        g_idx = t.get("weight_g_idx")
        if g_idx is not None:
            g_idx = g_idx.to(torch.int64).reshape(-1)
            if g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= g:
                raise CheckpointError(f"{prefix}.weight_g_idx must be [K]={k} group indices in [0, {g})")
            if torch.equal(g_idx, torch.arange(k) // gs):
                g_idx = None  # trivial act-order: plain groups
            elif k % gs:
                raise CheckpointError(f"{prefix}: act-order (weight_g_idx) with a partial last group (G={gs}, K={k}) "
                                      f"is not supported")
        gs, (scale, zero) = split_partial_groups(k, gs, scale, zero)
        return IntWeight(codes, scale, bits=b, group_size=gs, zero=zero, g_idx=g_idx)

    def _nvfp4(self, prefix: str, t: dict[str, torch.Tensor], shape: tuple[int, int]) -> MicroWeight:
        n, k = shape
        packed, sc = t["weight_packed"], t["weight_scale"]
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2):
            raise CheckpointError(f"{prefix}.weight_packed is {packed.dtype} {tuple(packed.shape)}; expected "
                                  f"uint8 {(n, k // 2)}")
        if sc.dtype != torch.float8_e4m3fn or tuple(sc.shape) != (n, k // 16):
            raise CheckpointError(f"{prefix}.weight_scale is {sc.dtype} {tuple(sc.shape)}; expected "
                                  f"float8_e4m3fn {(n, k // 16)}")
        gs = _check_scale(prefix, "weight_global_scale", t["weight_global_scale"], ())
        if gs.item() == 0:
            raise CheckpointError(f"{prefix}.weight_global_scale is 0")
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(n, k)  # even element low nibble
        # compressed-tensors divides first (scale / global_scale), then multiplies: same fp32 product
        return MicroWeight(codes, sc.to(torch.float32) / gs, 16)

    def act_scheme(self, prefix: str) -> ActScheme:
        s = self.scheme(prefix)
        if s is None or s.inputs is None:
            return WEIGHT_ONLY
        a, dtype = s.inputs, _fp8_act(s.inputs)
        if not a.dynamic:
            if prefix not in self._input_scales:
                raise CheckpointError(f"{prefix}: act_scheme asked before its input_scale was loaded")
            return ActScheme(ActKind.STATIC_TENSOR, dtype, scale=self._input_scales[prefix])
        if a.strategy == "group":
            return ActScheme(ActKind.DYNAMIC_GROUP, dtype, group=a.group_size or 128)
        if a.strategy == "tensor":
            return ActScheme(ActKind.DYNAMIC_TENSOR, dtype)
        return ActScheme(ActKind.DYNAMIC_TOKEN, dtype)
