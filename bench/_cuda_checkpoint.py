"""The random checkpoints of the CUDA decode benchmark (`_cuda_decode`): Llama-3.1-8B-shaped by default, or
Qwen2.5-7B (q/k/v biases) / Qwen3-8B (q/k RMSNorm) / Gemma 3 4B (sandwich norms, sliding windows) shaped (`ARCHS`); bf16 safetensors shards written layer by layer,
optionally GPTQ or AWQ 4-bit g128 (packed as those formats store them), with a word-level tokenizer; `shape`
overrides the config for small test models."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=151643,
                eos_token_id=151645)
# Gemma 3 4B's text tower: head_dim 256, (1 + w) norms incl. q/k and the two sandwich norms, 5 sliding-window
# (1024) layers to 1 global, the embedding tied to the lm_head (262208 x 2560)
GEMMA3_4B = dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=1024,
                 query_pre_attn_scalar=256, rope_scaling={"rope_type": "linear", "factor": 8.0},
                 tie_word_embeddings=True, bos_token_id=2, eos_token_id=1)
# --arch name -> (transformers config class, its fields); the layer count is the model's unless --layers says
ARCHS = {"llama3-8b": ("LlamaConfig", LLAMA_8B), "qwen2.5-7b": ("Qwen2Config", QWEN25_7B),
         "qwen3-8b": ("Qwen3Config", QWEN3_8B), "gemma3-4b": ("Gemma3TextConfig", GEMMA3_4B)}


def arch_paths(arch: str, layers: int | None, checkpoint: str | None) -> tuple[int, str]:
    """(decoder layers, checkpoint directory) of an --arch run: the model's own count and /tmp/<arch>-random unless
    given (the Llama default keeps its old directory, /tmp/llama8b-random)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")
    default = "/tmp/llama8b-random" if arch == "llama3-8b" else f"/tmp/{arch}-random"
    return layers or ARCHS[arch][1]["num_hidden_layers"], checkpoint or default


def gptq4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """RTN GPTQ v1 4-bit, symmetric, group 128: w [N, K] fp32 (GPU) -> qweight [K/8, N] int32 (K packed
    LSB first), qzeros [K/128, N/8] int32 (zero 8 stored as 7), scales [K/128, N] fp16, on the CPU."""
    n, k = w.shape
    wg = w.reshape(n, k // 128, 128)
    s = (wg.abs().amax(-1) / 7.5).half().float()                               # [N, G]
    q = (wg / s[..., None] + 8).round().clamp(0, 15).to(torch.int32).reshape(n, k).t().reshape(k // 8, 8, n)
    qweight = torch.zeros(k // 8, n, dtype=torch.int32, device=w.device)
    for j in range(8):
        qweight |= q[:, j] << (4 * j)
    qzeros = torch.full((k // 128, n // 8), 0x77777777, dtype=torch.int32)
    return {"qweight": qweight.cpu(), "qzeros": qzeros, "scales": s.t().half().contiguous().cpu()}


def awq4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """RTN AWQ (GEMM layout) 4-bit, asymmetric, group 128: w [N, K] fp32 (GPU) -> qweight [K, N/8] and qzeros
    [K/128, N/8] int32 in AWQ's interleaved column order, scales [K/128, N] fp16, on the CPU."""
    from quantrt.quant.formats.packing import pack_awq

    n, k = w.shape
    wg = w.reshape(n, k // 128, 128)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = ((hi - lo) / 15).clamp(min=1e-8).half().float()                         # [N, G]
    z = (-lo / s).round().clamp(0, 15)
    q = (wg / s[..., None] + z[..., None]).round().clamp(0, 15).reshape(n, k)
    return {"qweight": pack_awq(q.t().to(torch.uint8).cpu().contiguous()),
            "qzeros": pack_awq(z.t().to(torch.uint8).cpu().contiguous()), "scales": s.t().half().contiguous().cpu()}


GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def write_checkpoint(out: Path, layers: int = 32, seed: int = 0, gptq: bool = False, shape: dict | None = None,
                     norm_std: float = 0.0, awq: bool = False, arch: str = "llama3-8b") -> Path:
    """Random checkpoint of `arch` (`ARCHS`; one safetensors file per layer) + a word-level tokenizer: bf16, or every
    decoder linear in GPTQ 4-bit g128 sym (`gptq`) or AWQ 4-bit g128 (`awq`; the same random weights, RTN); Qwen2's
    q/k/v biases and Qwen3's q/k norm weights stay bf16. `shape`: config fields to override (a smaller model);
    `norm_std`: norm weights 1 + N(0, norm_std), not ones."""
    import transformers
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cls, fields = ARCHS[arch]
    cfg = getattr(transformers, cls)(**{**fields, **(shape or {}), "num_hidden_layers": layers})
    cfg.torch_dtype = "bfloat16"
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    v, h, i, kv = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * hd
    qd = cfg.num_attention_heads * hd
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * std).to(torch.bfloat16).cpu()

    def lin(name: str, *shape: int, std: float = 0.02) -> dict[str, torch.Tensor]:
        if not (gptq or awq):
            return {name + ".weight": rnd(*shape, std=std)}
        w = (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * std).to(torch.bfloat16).float()
        return {f"{name}.{k}": t for k, t in (awq4(w) if awq else gptq4(w)).items()}

    def norm_w(n: int, offset: bool = False) -> torch.Tensor:
        base = torch.zeros(n, dtype=torch.bfloat16) if offset else torch.ones(n, dtype=torch.bfloat16)
        return base + rnd(n, std=norm_std) if norm_std else base

    weight_map: dict[str, str] = {}
    total = 0

    def save(tensors: dict[str, torch.Tensor], name: str) -> None:
        nonlocal total
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()

    gemma = arch.startswith("gemma3")       # norms scale by 1 + w: their random weights are w itself
    head = {} if cfg.tie_word_embeddings else {"lm_head.weight": rnd(v, h)}
    save({"model.embed_tokens.weight": rnd(v, h), **head, "model.norm.weight": norm_w(h, gemma)},
         "model-head.safetensors")
    for n in range(layers):
        p = f"model.layers.{n}."
        extra = {}
        if arch == "qwen2.5-7b":
            extra = {f"{p}self_attn.{x}_proj.bias": rnd(d, std=0.1) for x, d in (("q", qd), ("k", kv), ("v", kv))}
        elif arch == "qwen3-8b":
            extra = {f"{p}self_attn.{x}_norm.weight": norm_w(hd) for x in ("q", "k")}
        elif gemma:
            extra = {**{f"{p}self_attn.{x}_norm.weight": norm_w(hd, True) for x in ("q", "k")},
                     **{f"{p}{x}_feedforward_layernorm.weight": norm_w(h, True) for x in ("pre", "post")}}
        save({**lin(p + "self_attn.q_proj", qd, h), **lin(p + "self_attn.k_proj", kv, h),
              **lin(p + "self_attn.v_proj", kv, h), **lin(p + "self_attn.o_proj", h, qd), **extra,
              **lin(p + "mlp.gate_proj", i, h), **lin(p + "mlp.up_proj", i, h),
              **lin(p + "mlp.down_proj", h, i, std=0.01),
              p + "input_layernorm.weight": norm_w(h, gemma),
              p + "post_attention_layernorm.weight": norm_w(h, gemma)},
             f"model-{n:05d}.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    if gptq or awq:
        cfg.quantization_config = AWQ_CONFIG if awq else GPTQ_CONFIG
    cfg.save_pretrained(out)
    tok = Tokenizer(models.WordLevel({f"t{k}": k for k in range(v)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"t{cfg.bos_token_id}", eos_token=f"t{cfg.eos_token_id}",
                            pad_token="t0").save_pretrained(out)
    return out
