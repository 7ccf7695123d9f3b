"""bitsandbytes (FORMATS.md §2.8): pre-quantized 4-bit (nf4 / fp4, optional double quant) and 8-bit
(LLM.int8) checkpoints, and online `--quantization bitsandbytes` on a float checkpoint.

4-bit `X.weight` is uint8 [N*K/2, 1], two codes per byte, even element in the HIGH nibble; absmax per
block of `blocksize` (from the `quant_state.bitsandbytes__<type>` JSON); with double quant the absmax are
uint8 codes: absmax = nested_quant_map[code] * nested_absmax[i // nested_blocksize] + nested_offset.
-> CodebookWeight (w = quant_map[code] * absmax[block]), computed in fp32 in bitsandbytes' own order
(bit-exact against `bitsandbytes.functional.dequantize_4bit`).
8-bit: `X.weight` int8 [N, K] and `X.SCB` fp32 [N] (row absmax): w = q * SCB / 127 -> IntWeight
(per-channel, signed codes), served by the packed int8 CPU kernel; `X.weight_format` (transformers
writes it) is read and ignored.

Online (no quantization_config): every decoder linear is quantized to NF4 with blocksize 64, like
SGLang (which also double-quantizes the absmax, compress_statistics=True). quantrt keeps the fp32 absmax:
double quant only saves 0.4 bit/weight of storage, and our CPU kernel dequantizes once anyway, so the
weights equal NF4-without-double-quant exactly. lm_head stays float.

`--load-format bitsandbytes` (SGLang's spelling; SGLang requires it for bnb checkpoints) is accepted and
means "bitsandbytes": a bnb checkpoint loads as with auto, a float checkpoint is quantized online as with
`--quantization bitsandbytes`; with another --quantization / --torchao-config / rules file, or on a
checkpoint quantized by another method, it is a clear error (server_args.py, quant/detect.py). quantrt
also reads bnb checkpoints with the default auto load format.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from quantrt.errors import CheckpointError, ConfigError
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.formats.packing import unpack_bnb4
from quantrt.quant.weights import WEIGHT_ONLY, ActScheme, CodebookWeight, IntWeight

if TYPE_CHECKING:
    from quantrt.server_args import ServerArgs

# The 16 NF4 levels (normal-distribution quantiles scaled to [-1, 1], QLoRA paper, appendix E).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
ONLINE_BLOCKSIZE = 64


def quantize_nf4(w: torch.Tensor, blocksize: int = ONLINE_BLOCKSIZE) -> CodebookWeight:
    """Reference NF4 quantizer: w [N, K] -> CodebookWeight (absmax per row-major block, nearest level)."""
    n, k = w.shape
    if (n * k) % blocksize:
        raise CheckpointError(f"NF4 blocksize {blocksize} does not divide the {n}x{k} weight")
    blocks = w.to(torch.float32).reshape(-1, blocksize)
    absmax = blocks.abs().amax(-1)                                              # [N*K/bs]
    normed = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    idx = (normed.unsqueeze(-1) - code).abs().argmin(-1).to(torch.uint8)         # [N*K/bs, bs]
    return CodebookWeight(idx.reshape(n, k), code, absmax, blocksize)


def _quant_state(t: torch.Tensor, where: str) -> dict[str, Any]:
    try:
        return json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where} is not a bitsandbytes quant_state JSON ({e})") from None


@register_format
class BitsAndBytesFormat(QuantFormat):
    """bitsandbytes 4-bit / 8-bit checkpoints, or online NF4."""

    name = "bitsandbytes"

    def __init__(self, mode: str, quant_type: str = "nf4", double_quant: bool = False,
                 skip: tuple[str, ...] = ()):
        self.mode, self.quant_type, self.double_quant, self.skip = mode, quant_type, double_quant, skip

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> BitsAndBytesFormat:
        if not qcfg:
            return cls("online")
        skip = tuple(qcfg.get("llm_int8_skip_modules") or ())
        four, eight = bool(qcfg.get("load_in_4bit")), bool(qcfg.get("load_in_8bit"))
        if four == eight:
            raise ConfigError("bitsandbytes quantization_config must set exactly one of load_in_4bit / load_in_8bit")
        if eight:
            return cls("8bit", skip=skip)
        qt = str(qcfg.get("bnb_4bit_quant_type", "fp4")).lower()
        if qt not in ("nf4", "fp4"):
            raise ConfigError(f"bnb_4bit_quant_type {qt!r} is not nf4 or fp4")
        storage = str(qcfg.get("bnb_4bit_quant_storage", "uint8")).lower()
        if storage != "uint8":
            raise ConfigError(f"bnb_4bit_quant_storage {storage!r} is not supported; only uint8 (like SGLang)")
        return cls("4bit", qt, bool(qcfg.get("bnb_4bit_use_double_quant")), skip)

    def describe(self) -> str:
        if self.mode == "online":
            return f"bitsandbytes (online nf4, blocksize {ONLINE_BLOCKSIZE}, fp32 absmax)"
        if self.mode == "8bit":
            return "bitsandbytes (LLM.int8 weights, per-row SCB)"
        return f"bitsandbytes ({self.quant_type}{', double quant' if self.double_quant else ''})"

    def is_quantized(self, prefix: str) -> bool:
        last = prefix.rsplit(".", 1)[-1]
        if last == "lm_head":
            return False
        return not any(s and (s == last or s in prefix) for s in self.skip)

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        if self.mode == "online":
            return frozenset({"weight"}), frozenset()
        if self.mode == "8bit":
            # transformers always writes weight_format (a scalar); it must be required: the router builds
            # a layer when its required tensors are in, and weight_format sorts after weight
            return frozenset({"weight", "SCB", "weight_format"}), frozenset()
        req = {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{self.quant_type}"}
        if self.double_quant:
            req |= {"weight.nested_absmax", "weight.nested_quant_map"}
        return frozenset(req), frozenset()

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor],
                    shape: tuple[int, int]) -> CodebookWeight | IntWeight:
        n, k = shape
        if self.mode == "online":
            return quantize_nf4(tensors["weight"])
        if self.mode == "8bit":
            q, scb = tensors["weight"], tensors["SCB"]
            if q.dtype != torch.int8 or tuple(q.shape) != (n, k):
                raise CheckpointError(f"{prefix}.weight is {q.dtype} {tuple(q.shape)}; expected int8 {(n, k)}")
            if tuple(scb.shape) != (n,):
                raise CheckpointError(f"{prefix}.SCB has shape {tuple(scb.shape)}, expected {(n,)}")
            scale = (scb.to(torch.float32) * (1.0 / 127)).reshape(n, 1)             # [N, 1]
            return IntWeight(q.contiguous(), scale, 8, k)
        return self._make_4bit(prefix, tensors, shape)

    def _make_4bit(self, prefix: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> CodebookWeight:
        n, k = shape
        key = f"weight.quant_state.bitsandbytes__{self.quant_type}"
        qs = _quant_state(tensors[key], f"{prefix}.{key}")
        if list(qs.get("shape", [])) != [n, k]:
            raise CheckpointError(f"{prefix}: quant_state shape {qs.get('shape')} != {[n, k]}")
        bs = int(qs.get("blocksize", 64))
        codes = unpack_bnb4(tensors["weight"], n * k).reshape(n, k)                 # [N, K] uint8
        nblocks = -(-n * k // bs)
        absmax = tensors["weight.absmax"]
        if absmax.numel() != nblocks:
            raise CheckpointError(f"{prefix}.weight.absmax has {absmax.numel()} entries; expected {nblocks}")
        if self.double_quant:
            nbs = int(qs.get("nested_blocksize", 256))
            nq, nabs = tensors["weight.nested_quant_map"].to(torch.float32), tensors["weight.nested_absmax"]
            if absmax.dtype != torch.uint8 or nq.numel() != 256 or nabs.numel() != -(-nblocks // nbs):
                raise CheckpointError(f"{prefix}: double-quant absmax/nested tensors do not match "
                                      f"(absmax {absmax.dtype}, nested_quant_map {nq.numel()}, "
                                      f"nested_absmax {nabs.numel()}, blocks {nblocks} / {nbs})")
            rep = nabs.to(torch.float32).repeat_interleave(nbs)[:nblocks]
            absmax = nq[absmax.long()] * rep + float(qs.get("nested_offset", 0.0))   # fp32 [blocks]
        codebook = tensors["weight.quant_map"].to(torch.float32)
        if codebook.numel() != 16:
            raise CheckpointError(f"{prefix}.weight.quant_map has {codebook.numel()} entries; expected 16")
        if (n * k) % bs:
            raise CheckpointError(f"{prefix}: blocksize {bs} does not divide {n}x{k}")
        return CodebookWeight(codes, codebook, absmax.to(torch.float32), bs)

    def act_scheme(self, prefix: str) -> ActScheme:
        return WEIGHT_ONLY
