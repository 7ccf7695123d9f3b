"""Builders for tiny random checkpoints (transformers writes them) and a small local tokenizer.

No hub access: the tokenizer is a byte-level BPE trained here on botchan.txt, saved in the HF layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "botchan.txt"
if not DATA.exists():  # CI checks out main with shared/ beside it
    DATA = Path(os.environ.get("QUANTRT_DATA", "/work/shared/data/botchan.txt"))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(out: Path, vocab: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = DATA.read_text(encoding="utf-8")[:200_000]
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def tiny_config(arch: str, vocab: int):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=2, bos_token_id=0, pad_token_id=0, initializer_range=0.1)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128})
    if arch == "llama_tied":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    moe = dict(common, intermediate_size=96, num_experts_per_tok=2)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        return Qwen3MoeConfig(**moe, head_dim=16, num_experts=8, moe_intermediate_size=32, norm_topk_prob=True,
                              mlp_only_layers=[1], tie_word_embeddings=False)
    if arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig
        return Qwen2MoeConfig(**moe, num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                              norm_topk_prob=False, tie_word_embeddings=True)
    if arch == "mixtral":
        from transformers import MixtralConfig
        return MixtralConfig(**dict(moe, intermediate_size=32), num_local_experts=4, tie_word_embeddings=False)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention"])
    raise ValueError(arch)


ARCHS = ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "gemma3", "qwen3_moe", "qwen2_moe", "mixtral"]


def build_model(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0):
    """A random tiny model of `arch`, saved as safetensors with the tokenizer beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = tiny_config(arch, len(tok))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # make norms non-trivial so their handling is tested
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 1:
                p.normal_(0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return model.eval()


def max_prompt_logprob_diff(engine, hf_model, weights: dict[str, torch.Tensor], ids: list[int]) -> float:
    """Largest |log p| difference over every prompt position and every vocabulary entry between the
    engine and `hf_model` with `weights` (e.g. a producer's dequantized tensors) swapped in."""
    sd = {k: v.clone() for k, v in hf_model.state_dict().items()}
    sd.update(weights)
    ref_model = type(hf_model)(hf_model.config).eval()
    ref_model.load_state_dict(sd)
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                          logprob_start_len=0, top_logprobs_num=engine.config.vocab_size)
    with torch.no_grad():
        ref = torch.log_softmax(ref_model(torch.tensor([ids])).logits[0].double(), -1)
    ours = dense_prompt_logprobs(out, engine.config.vocab_size)
    return float((ours - ref[: len(ours)]).abs().max())


def dense_prompt_logprobs(out: dict, vocab: int) -> torch.Tensor:
    """The prompt log-probabilities of an Engine.generate output asked with top_logprobs_num=vocab, as a
    dense [P-1, V] float64 tensor (row i: the distribution of token i+1); entries not listed are NaN."""
    rows = out["meta_info"]["input_top_logprobs"][1:]
    dense = torch.full((len(rows), vocab), float("nan"), dtype=torch.float64)
    for pos, tops in enumerate(rows):
        lps, toks, _ = zip(*tops)
        dense[pos, list(toks)] = torch.tensor(lps, dtype=torch.float64)
    return dense
