"""GPTQ (AutoGPTQ / GPTQModel, FORMATS.md §2.3): bits 2/3/4/8, group size (−1 = per channel), sym and
asym, desc_act (g_idx), the v1 zero offset (stored z − 1) vs `checkpoint_format: gptq_v2`.
`gptq_marlin` / `marlin` are SGLang's fast-kernel spellings of the same checkpoint: here kernels are
chosen by the platform, so they load identically. Marlin-serialized checkpoints (AutoGPTQ
`checkpoint_format: marlin` / `is_marlin_format: true`: tensors `B` and `s`, 4-bit symmetric) are
un-permuted exactly to the same canonical IntWeight (marlin_layout.py); SGLang cannot load those.

Activations: SGLang's plain `gptq` kernel wants fp16; quantrt runs any float compute dtype (fp32 or
bf16 models need no `--dtype half`): CPU bf16 uses the packed int4 op, fp32 the exact dequantized path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from quantrt.errors import CheckpointError, ConfigError
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.formats import marlin_layout
from quantrt.quant.formats.packing import GPTQ_BITS, unpack_lsb
from quantrt.quant.weights import WEIGHT_ONLY, ActScheme, IntWeight

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs


def symmetric_or_zero(codes: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes, zero) -> (signed int8 codes, None) when every zero is 2^(bits−1) (exact), else unchanged."""
    mid = 1 << (bits - 1)
    if bool((zero == mid).all()):
        return (codes.to(torch.int16) - mid).to(torch.int8), None
    return codes, zero


def split_partial_groups(k: int, g: int, *cols: torch.Tensor | None) -> tuple[int, list[torch.Tensor | None]]:
    """A partial last group (G does not divide K; auto-round and compressed-tensors then write ceil(K/G)
    groups, the last one short) as the same dequantization with group size gcd(G, K): each [N, ceil(K/G)]
    scale/zero column is repeated G/gcd times. Exact; a no-op when G | K. -> (group size, columns)."""
    if k % g == 0:
        return g, list(cols)
    gg = math.gcd(g, k)
    idx = torch.arange(k // gg) * gg // g                                      # fine group -> disk group
    return gg, [None if c is None else c[:, idx].contiguous() for c in cols]


def skip_layer(prefix: str, ignored: tuple[str, ...], lm_head: bool) -> bool:
    """lm_head stays float unless quantized; ignore lists match as substrings (AWQ/GPTQ convention)."""
    if prefix.rsplit(".", 1)[-1] == "lm_head" and not lm_head:
        return True
    return any(ign and ign in prefix for ign in ignored)


class _GptqBase(QuantFormat):
    def __init__(self, bits: int, group_size: int, sym: bool, desc_act: bool, v2: bool,
                 ignored: tuple[str, ...] = (), lm_head: bool = False, marlin: bool = False):
        self.bits, self.group_size, self.sym, self.desc_act, self.v2 = bits, group_size, sym, desc_act, v2
        self.ignored, self.lm_head, self.marlin = ignored, lm_head, marlin

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> _GptqBase:
        if not qcfg:
            raise ConfigError(f"{cls.name} needs a GPTQ checkpoint (quantization_config with bits/group_size)")
        bits = int(qcfg.get("bits", 4))
        if bits not in GPTQ_BITS:
            raise ConfigError(f"GPTQ bits={bits} is not supported; supported bits: {GPTQ_BITS}")
        fmt = str(qcfg.get("checkpoint_format", "gptq")).lower()
        marlin = fmt == "marlin" or bool(qcfg.get("is_marlin_format"))
        if fmt not in ("gptq", "gptq_v2", "marlin"):
            raise ConfigError(f"GPTQ checkpoint_format {fmt!r} is not one of gptq, gptq_v2, marlin")
        ignored = tuple(qcfg.get("modules_to_not_convert") or ())
        group, sym, desc_act = int(qcfg.get("group_size", 128)), bool(qcfg.get("sym", True)), bool(qcfg.get("desc_act", False))
        if marlin:
            bad = [w for w, ok in (("bits=4", bits == 4), ("sym=true", sym), ("desc_act=false", not desc_act)) if not ok]
            if bad:
                raise ConfigError(f"a Marlin-format GPTQ checkpoint (checkpoint_format: marlin) must have "
                                  f"{', '.join(bad)}; got bits={bits}, sym={sym}, desc_act={desc_act}")
        return cls(bits, group, sym, desc_act, fmt == "gptq_v2", ignored, bool(qcfg.get("lm_head")), marlin)

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        if self.marlin:
            return f"{self.name} (w4a16 {g}, sym, Marlin-serialized B/s, un-permuted at load)"
        return (f"{self.name} (w{self.bits}a16 {g}, {'sym' if self.sym else 'asym'}"
                f"{', desc_act' if self.desc_act else ''}, {'v2' if self.v2 else 'v1'} zeros)")

    def is_quantized(self, prefix: str) -> bool:
        return not skip_layer(prefix, self.ignored, self.lm_head)

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        if self.marlin:
            return frozenset({"B", "s"}), frozenset()
        return frozenset({"qweight", "qzeros", "scales"}), frozenset({"g_idx"})

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> IntWeight:
        """qweight [K*b/32, N] int32, qzeros [G, N*b/32], scales [G, N], g_idx [K] -> IntWeight [N, K]."""
        if self.marlin:
            return self._make_marlin(prefix, tensors, shape)
        n, k = shape
        b = self.bits
        g = k if self.group_size == -1 else self.group_size
        if g <= 0:
            raise CheckpointError(f"{prefix}: group size {g} must be positive or -1")
        ng = -(-k // g)                                         # a partial last group when G does not divide K
        want = {"qweight": (-(-k * b // 32), n), "qzeros": (ng, -(-n * b // 32)), "scales": (ng, n)}
        for name, shp in want.items():
            if name not in tensors:
                raise CheckpointError(f"{prefix}.{name} is missing")
            if tuple(tensors[name].shape) != shp:
                part = f"; group size {g} does not divide K={k} (a partial last group)" if k % g else ""
                raise CheckpointError(f"{prefix}.{name} has shape {tuple(tensors[name].shape)}, expected {shp}{part}")
        codes = unpack_lsb(tensors["qweight"], b, dim=0)[:k].t().contiguous()      # [N, K] uint8
        zero = unpack_lsb(tensors["qzeros"], b, dim=1)[:, :n].t().to(torch.int16)  # [N, G]
        if not self.v2:
            zero = zero + 1                                                          # v1 stores z − 1
        scale = tensors["scales"].t().to(torch.float32).contiguous()                 # [N, G]
        g_idx = tensors.get("g_idx")
        if g_idx is not None:
            if tuple(g_idx.shape) != (k,):
                raise CheckpointError(f"{prefix}.g_idx has shape {tuple(g_idx.shape)}, expected {(k,)}")
            if bool((g_idx.long() >= ng).any()) or bool((g_idx < 0).any()):
                raise CheckpointError(f"{prefix}.g_idx holds groups outside 0..{ng - 1}")
            if torch.equal(g_idx.long(), torch.arange(k) // g):
                g_idx = None                                                         # trivial order
            elif k % g:
                raise CheckpointError(f"{prefix}: act-order (g_idx) with a partial last group (G={g}, K={k}) "
                                      f"is not supported")
        g, (scale, zero) = split_partial_groups(k, g, scale, zero)
        codes, zero_opt = symmetric_or_zero(codes, zero, b)
        return IntWeight(codes, scale, b, g, zero=zero_opt, g_idx=None if g_idx is None else g_idx.to(torch.int32))

    def _make_marlin(self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> IntWeight:
        """Marlin B [K/16, 2N] int32, s [K/G, N] fp16 -> IntWeight [N, K] (signed codes q − 8)."""
        n, k = shape
        g = k if self.group_size == -1 else self.group_size
        marlin_layout.check_shape(prefix, n, k, g)
        want = {"B": (k // marlin_layout.TILE, 2 * n), "s": (k // g, n)}
        for name, shp in want.items():
            if tuple(tensors[name].shape) != shp:
                raise CheckpointError(f"{prefix}.{name} has shape {tuple(tensors[name].shape)}, expected {shp} "
                                      f"(Marlin format, N={n}, K={k}, G={g})")
        codes = marlin_layout.unpermute_codes(tensors["B"], n, k)                    # [N, K] 0..15
        scale = marlin_layout.unpermute_scales(tensors["s"], k, g).t().to(torch.float32).contiguous()  # [N, K/G]
        signed = (codes.to(torch.int16) - 8).to(torch.int8)
        return IntWeight(signed, scale, 4, g)

    def act_scheme(self, prefix: str) -> ActScheme:
        return WEIGHT_ONLY


@register_format
class GptqFormat(_GptqBase):
    name = "gptq"


@register_format
class GptqMarlinFormat(_GptqBase):
    name = "gptq_marlin"


@register_format
class MarlinFormat(_GptqBase):
    name = "marlin"
