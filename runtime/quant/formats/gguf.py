"""GGUF loaded natively (FORMATS.md §2.9): linear weights keep their GGML blocks as canonical weights.

The reader (`quantrt.loader.gguf_reader`) yields, for every linear shard `<prefix>`, the raw bytes as
`<prefix>.qweight` (uint8 [N, bytes_per_row], HF row order) plus `<prefix>.qweight_type` (the GGML
type id, a scalar) — SGLang's naming — or `<prefix>.weight` for F32/F16/BF16 linears (kept dense).
Embeddings and norms are dequantized (they are gathered, not multiplied). `make_weight` decodes the
blocks exactly (`gguf_blocks`); CPU kernels then run Q4_0/Q4_1/Q4_K/IQ…-free 4-bit grids through the
packed int4 op and the rest through the documented fallbacks (platforms/xpu/cpu_int_kernels.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch

from quantrt.errors import CheckpointError, NotSupportedYet
from quantrt.quant.format import QuantFormat, register_format
from quantrt.quant.formats.gguf_blocks import BLOCKS, decode_blocks
from quantrt.quant.weights import WEIGHT_ONLY, ActScheme, DenseWeight, QuantizedWeight

if TYPE_CHECKING:
    from torch import nn

    from quantrt.loader.gguf_reader import GgufCheckpoint
    from quantrt.server_args import ServerArgs

# MoE experts (gguf_names): stacked ffn_*_exps, or Mixtral's per-expert ffn_*.E (kept as raw blocks)
_STACKED_EXPERTS = re.compile(r"\.experts\.(\d+\.)?(gate_proj|up_proj|down_proj|w1|w2|w3)$")
FLOAT_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}


@register_format
class GgufFormat(QuantFormat):
    """Per-tensor GGML types; every linear is 'quantized' (float types come back as DenseWeight)."""

    name = "gguf"

    @classmethod
    def from_config(cls, qcfg: dict[str, Any], args: ServerArgs | None = None) -> GgufFormat:
        return cls()

    def describe(self) -> str:
        return "gguf (native blocks: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, Q2_K..Q6_K, IQ4_NL; float types dense)"

    def is_quantized(self, prefix: str) -> bool:
        return True

    def tensor_names(self, prefix: str) -> tuple[frozenset[str], frozenset[str]]:
        # qweight_type arrives last (after qweight or weight), so it completes the shard
        return frozenset({"qweight_type"}), frozenset({"qweight", "weight"})

    def make_weight(self, prefix: str, tensors: dict[str, torch.Tensor],
                    shape: tuple[int, int]) -> QuantizedWeight:
        """qweight uint8 [N, bytes] + type id -> IntWeight/CodebookWeight; float types -> DenseWeight."""
        tid = int(tensors["qweight_type"].item())
        try:
            qtype = gguf.GGMLQuantizationType(tid)
        except ValueError:
            raise CheckpointError(f"{prefix}: unknown GGML type id {tid}") from None
        if qtype in FLOAT_TYPES:
            if "weight" not in tensors:
                raise CheckpointError(f"{prefix}: GGML type {qtype.name} but no float weight tensor")
            w = tensors["weight"]
            if tuple(w.shape) != tuple(shape):
                raise CheckpointError(f"{prefix}.weight has shape {tuple(w.shape)}, expected {tuple(shape)}")
            return DenseWeight(w)
        if qtype.name not in BLOCKS:
            raise NotSupportedYet(f"{prefix}: GGML type {qtype.name} is not supported natively "
                                  f"(supported: F32, F16, BF16, {', '.join(BLOCKS)})")
        if "qweight" not in tensors:
            raise CheckpointError(f"{prefix}: GGML type {qtype.name} but no qweight bytes")
        return decode_blocks(tensors["qweight"], qtype.name, shape)

    def act_scheme(self, prefix: str) -> ActScheme:
        return WEIGHT_ONLY


def linear_prefixes(model: nn.Module) -> set[str]:
    """Shard prefixes of every QuantLinear in `model` (e.g. model.layers.0.self_attn.q_proj)."""
    from quantrt.layers.linear import QuantLinear

    return {p for m in model.modules() if isinstance(m, QuantLinear) for p in m.shard_prefixes()}


def native_tensors(ck: GgufCheckpoint, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors: linears as raw blocks (qweight, qweight_type), everything else dequantized."""
    linears = linear_prefixes(model)
    for hf_name in ck.tensor_names():
        if hf_name == "model.embed_tokens.weight" and ck.raw_tensor(hf_name)[1] not in FLOAT_TYPES:
            model.embedding_stored_quantized = True   # the file's own (tied) head is quantized (e.g. Q8_0)
        prefix = hf_name.removesuffix(".weight")
        expert = _STACKED_EXPERTS.search(prefix) is not None   # [E, N, K] blocks, split per expert by FusedMoE
        if (prefix not in linears and not expert) or not hf_name.endswith(".weight"):
            yield hf_name, ck.load_tensor(hf_name)
            continue
        data, qtype, _shape = ck.raw_tensor(hf_name)
        if qtype in FLOAT_TYPES:
            yield hf_name, ck.load_tensor(hf_name)
        else:
            yield f"{prefix}.qweight", torch.from_numpy(np.array(data, dtype=np.uint8))
        yield f"{prefix}.qweight_type", torch.tensor(int(qtype), dtype=torch.int32)
