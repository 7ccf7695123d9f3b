"""GGUF ↔ Hugging Face naming and the per-architecture tensor fix-ups of llama.cpp's converter.

Facts (FORMATS.md §2.9; llama.cpp `convert_hf_to_gguf.py`, transformers `modeling_gguf_pytorch_utils.py`):
- Names come from `gguf.get_tensor_name_map(arch, n_blocks)`: HF module prefix -> GGUF name
  (`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q`); the `.weight`/`.bias` suffix is kept.
- llama-arch files have the rows of `attn_q` / `attn_k` (weight and bias) permuted per head:
  GGUF row `h*hd + 2*i + j` holds HF row `h*hd + j*(hd/2) + i` (hd = rows / n_heads; k uses n_kv_heads).
  qwen2, qwen3 and gemma3 are written unpermuted.
- gemma3 files store every `*norm.weight` as `w + 1` (Gemma RMSNorm scales by `1 + w`, llama.cpp's by `w`).
- MoE (qwen2moe, qwen3moe): the experts of a layer are three 3-D tensors `blk.N.ffn_{gate,up,down}_exps`
  (ggml ne [K, N, E], i.e. [E, N, K] row-major, one GGML type for all experts); the router is
  `ffn_gate_inp`, the shared expert `ffn_{gate,up,down}_shexp` and its gate `ffn_gate_inp_shexp`.
  transformers v5 fuses the experts (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`);
  here they are named per projection, stacked: `mlp.experts.{gate,up,down}_proj.weight` [E, N, K],
  which FusedMoE's loader splits per expert.
- Mixtral is written as arch `llama` with `llama.expert_count` > 0 (`mixtral_config` turns the config into
  MixtralConfig): router `ffn_gate_inp`, experts stacked `ffn_{gate,up,down}_exps` or, in older files, one
  tensor per expert `blk.N.ffn_{gate,up,down}.E.weight`; named here as quantrt's Mixtral reads checkpoints:
  `block_sparse_moe.gate.weight`, `block_sparse_moe.experts.{w1,w3,w2}.weight` [E, N, K] (stacked) or
  `block_sparse_moe.experts.E.{w1,w3,w2}.weight` (per expert).
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from quantrt.errors import CheckpointError

#: GGUF `general.architecture` values we load.
SUPPORTED_ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gemma3", "qwen2moe", "qwen3moe")
#: HF names that gguf's tensor map lacks (shared expert of qwen2moe): HF module suffix -> GGUF tensor base.
_EXTRA_NAMES: dict[str, str] = {
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
#: GGUF metadata key (after `<arch>.`) -> HF config attribute, for MoE facts transformers does not map.
MOE_CONFIG_KEYS: dict[str, str] = {"expert_feed_forward_length": "moe_intermediate_size",
                                   "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
                                   "expert_count": "num_experts", "expert_used_count": "num_experts_per_tok"}
#: Mixtral (llama arch with experts): HF v5 expert projection -> the checkpoint name quantrt's Mixtral reads,
#: and that name -> the per-expert GGUF base of older files (`blk.N.<base>.E.weight`).
MIXTRAL_EXPERT_NAMES: dict[str, str] = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
MIXTRAL_PER_EXPERT: dict[str, str] = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}
_MIXTRAL_STACKED = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(w1|w2|w3)\.weight$")
#: Architectures whose converter permutes the q/k rows (rotary interleave layout).
PERMUTED_QK_ARCHS: frozenset[str] = frozenset({"llama"})
#: Architectures whose converter stores norm weights with a +1 offset.
NORM_OFFSET_ARCHS: dict[str, float] = {"gemma3": 1.0}


def check_arch(arch: str, path: str) -> gguf.MODEL_ARCH:
    """The `gguf.MODEL_ARCH` of a supported architecture; CheckpointError listing the supported ones."""
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"GGUF file {path} has architecture {arch!r}, which quantrt does not load; "
            f"supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def hf_param_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Every persistent HF tensor name of the causal-LM for `config` with its shape (built on meta)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith(".experts.gate_up_proj"):      # [E, 2I, H] -> gate, up [E, I, H] (GGUF keeps them apart)
            base = name.removesuffix("gate_up_proj")
            e, two_i, h = shape
            shapes[f"{base}gate_proj.weight"] = shapes[f"{base}up_proj.weight"] = (e, two_i // 2, h)
        elif name.endswith(".experts.down_proj"):
            shapes[f"{name}.weight"] = shape
        else:
            shapes[name] = shape
    if config.model_type == "mixtral":
        shapes = {_mixtral_name(n): s for n, s in shapes.items()}
    return shapes


def _mixtral_name(name: str) -> str:
    """HF v5 `model.layers.N.mlp.gate.weight` / `mlp.experts.gate_proj.weight` -> `block_sparse_moe.gate.weight`
    / `block_sparse_moe.experts.w1.weight` (the names quantrt's Mixtral loads); other names unchanged."""
    m = re.match(r"^(model\.layers\.\d+\.)mlp\.(gate\.weight|experts\.(\w+)\.weight)$", name)
    if m is None:
        return name
    rest = m.group(2) if m.group(3) is None else f"experts.{MIXTRAL_EXPERT_NAMES[m.group(3)]}.weight"
    return f"{m.group(1)}block_sparse_moe.{rest}"


def mixtral_config(config: PretrainedConfig, field, arch: str) -> PretrainedConfig | None:
    """A MixtralConfig for a llama-arch file with `llama.expert_count` > 0 (llama.cpp writes Mixtral so;
    transformers' GGUF parser returns a LlamaConfig without the experts), else None. `field(key)` reads metadata."""
    n_experts = field(f"{arch}.expert_count")
    if arch != "llama" or not n_experts:
        return None
    from transformers import MixtralConfig

    used = field(f"{arch}.expert_used_count")
    if not used or not 0 < int(used) <= int(n_experts):
        raise CheckpointError(f"GGUF {arch}.expert_count = {n_experts} but {arch}.expert_used_count = {used}; "
                              f"expected 1..{n_experts} experts per token")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    kw = {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}
    return MixtralConfig(**kw, num_local_experts=int(n_experts), num_experts_per_tok=int(used),
                         architectures=["MixtralForCausalLM"])


def _gguf_base(name_map, prefix: str, n_blocks: int) -> str | None:
    base = name_map.get_name(prefix)
    if base is not None or not prefix.startswith("model.layers."):
        return base
    _, _, layer, rest = prefix.split(".", 3)
    extra = _EXTRA_NAMES.get(rest)
    return f"blk.{layer}.{extra}" if extra is not None and int(layer) < n_blocks else None


def build_name_map(
    arch: gguf.MODEL_ARCH,
    n_blocks: int,
    hf_shapes: dict[str, tuple[int, ...]],
    gguf_names: list[str],
    tied: bool,
    path: str,
) -> dict[str, str]:
    """`{hf_name: gguf_name}` for every HF tensor; strict: a missing or unused tensor is an error naming it.

    The tied `lm_head.weight` is left out when the embeddings are tied (it has no GGUF tensor). Mixtral experts
    stored one tensor per expert are mapped per expert, and their [N, K] shapes are added to `hf_shapes`.
    """
    name_map = gguf.get_tensor_name_map(arch, n_blocks)
    per_expert_shapes: dict[str, tuple[int, ...]] = {}
    present = set(gguf_names)
    hf_to_gguf: dict[str, str] = {}
    missing: list[str] = []
    for hf_name in hf_shapes:
        if tied and hf_name == "lm_head.weight":
            continue
        prefix, _, suffix = hf_name.rpartition(".")
        base = _gguf_base(name_map, prefix, n_blocks)
        gguf_name = f"{base}.{suffix}" if base is not None else None
        per_expert = _MIXTRAL_STACKED.match(hf_name)
        if per_expert and gguf_name not in present:   # older Mixtral files: one tensor per expert
            layer, w = per_expert.groups()
            e, n, k = hf_shapes[hf_name]
            experts = prefix.removesuffix(f".{w}")                      # model.layers.L.block_sparse_moe.experts
            names = {f"{experts}.{x}.{w}.weight": f"blk.{layer}.{MIXTRAL_PER_EXPERT[w]}.{x}.weight" for x in range(e)}
            if any(g in present for g in names.values()):
                missing += [f"{h} (GGUF {g})" for h, g in names.items() if g not in present]
                hf_to_gguf.update((h, g) for h, g in names.items() if g in present)
                per_expert_shapes.update((h, (n, k)) for h in names)
                continue
        if gguf_name is None or gguf_name not in present:
            missing.append(f"{hf_name} (GGUF {gguf_name or 'unmapped'})")
            continue
        hf_to_gguf[hf_name] = gguf_name
    hf_shapes.update(per_expert_shapes)
    if missing:
        raise CheckpointError(f"GGUF file {path} lacks tensors the model needs: {', '.join(missing)}")
    unused = sorted(present - set(hf_to_gguf.values()))
    if unused:
        raise CheckpointError(f"GGUF file {path} has tensors the model does not use: {', '.join(unused)}")
    return hf_to_gguf


def moe_config_fixups(config: PretrainedConfig, field, arch: str) -> None:
    """Set the MoE sizes from `<arch>.expert_*` metadata (transformers' GGUF parser leaves some at
    their defaults); `field(key)` reads one metadata value or None."""
    for key, attr in MOE_CONFIG_KEYS.items():
        v = field(f"{arch}.{key}")
        if v is not None:
            setattr(config, attr, int(v))


def qk_row_order(gguf_name: str, arch: str, config: PretrainedConfig, rows: int) -> np.ndarray | None:
    """Index array `idx` with `hf_rows = gguf_rows[idx]` for a permuted q/k tensor, else None.

    # gguf rows viewed [n, hd/2, 2] -> hf rows [n, 2, hd/2]
    """
    if arch not in PERMUTED_QK_ARCHS:
        return None
    if ".attn_q." in gguf_name:
        n_heads = config.num_attention_heads
    elif ".attn_k." in gguf_name:
        n_heads = config.num_key_value_heads
    else:
        return None
    head_dim = rows // n_heads
    return np.arange(rows).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(rows)


def norm_offset(gguf_name: str, arch: str) -> float:
    """The value llama.cpp added to this tensor (gemma3 `*norm.weight`: 1.0), else 0.0."""
    if gguf_name.endswith("norm.weight"):
        return NORM_OFFSET_ARCHS.get(arch, 0.0)
    return 0.0
