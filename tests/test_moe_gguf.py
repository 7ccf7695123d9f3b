"""GGUF MoE checkpoints (qwen2moe/qwen3moe `ffn_*_exps`, written with the `gguf` package as llama.cpp's converter
writes them) against transformers on gguf's own dequantization, and a GGML type without a decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quantrt.engine.engine import Engine
from tests.helpers_models import max_prompt_logprob_diff
from tests.test_moe_formats import PROMPT, check_experts_loaded, moe_layers


# -- GGUF MoE: a tiny Qwen3-MoE written with the `gguf` package (what llama.cpp's converter writes) ------
def write_moe_gguf(path, hf, tok_dir, expert_types) -> None:
    """hf: a tiny Qwen3MoeForCausalLM; experts stacked as ffn_{gate,up,down}_exps [E, N, K] in the GGML
    types `expert_types` (gate, up, down); attention Q8_0; router, norms, embeddings F32."""
    import gguf

    c = hf.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == "qwen3moe")
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in special else 1 for _, i in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    for hf_name, t in hf.state_dict().items():
        data = t.detach().float().numpy()
        if hf_name.endswith("experts.gate_up_proj"):
            layer = hf_name.split(".")[2]
            i = data.shape[1] // 2
            parts = [("ffn_gate_exps", data[:, :i], expert_types[0]), ("ffn_up_exps", data[:, i:], expert_types[1])]
        elif hf_name.endswith("experts.down_proj"):
            layer = hf_name.split(".")[2]
            parts = [("ffn_down_exps", data, expert_types[2])]
        else:
            prefix, _, suffix = hf_name.rpartition(".")
            gname = f"{names.get_name(prefix)}.{suffix}"
            quant = "self_attn" in hf_name and data.ndim == 2
            qt = gguf.GGMLQuantizationType.Q8_0 if quant else gguf.GGMLQuantizationType.F32
            w.add_tensor(gname, gguf.quants.quantize(data, qt) if quant else data, raw_dtype=qt if quant else None)
            continue
        for base, arr, qt in parts:
            arr = np.ascontiguousarray(arr)
            if qt == gguf.GGMLQuantizationType.F32:
                w.add_tensor(f"blk.{layer}.{base}.weight", arr)
            elif qt == gguf.GGMLQuantizationType.Q8_1:       # no quantizer in gguf-py: random blocks
                blk, size = gguf.GGML_QUANT_SIZES[qt]
                raw = np.random.default_rng(0).integers(0, 255, (*arr.shape[:-1], arr.shape[-1] // blk * size))
                w.add_tensor(f"blk.{layer}.{base}.weight", raw.astype(np.uint8), raw_dtype=qt)
            else:
                w.add_tensor(f"blk.{layer}.{base}.weight", gguf.quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_reference(path, config):
    """transformers on the `gguf` package's own dequantization of every tensor (experts re-fused)."""
    from transformers import AutoModelForCausalLM

    from quantrt.loader.gguf_reader import GgufCheckpoint

    ck = GgufCheckpoint(str(path))
    sd = dict(ck.iter_tensors())
    for k in [k for k in sd if k.endswith(".experts.gate_proj.weight")]:
        base = k.removesuffix("gate_proj.weight")
        sd[f"{base}gate_up_proj"] = torch.cat([sd.pop(k), sd.pop(f"{base}up_proj.weight")], dim=1)
        sd[f"{base}down_proj"] = sd.pop(f"{base}down_proj.weight")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd)
    return model, sd


@pytest.mark.parametrize("types, kernel", [
    (("Q8_0", "Q8_0", "Q8_0"), "cpu_moe_dequant"),
    (("Q4_0", "Q4_0", "Q4_0"), "cpu_moe_dequant"),
    (("Q4_0", "Q4_0", "F32"), "reference"),                     # mixed expert schemes: reference, explained
], ids=["q8_0", "q4_0", "q4_0+f32"])
def test_gguf_moe_matches_transformers_on_dequantized_weights(tokenizer_dir, tmp_path, types, kernel):
    import gguf
    from transformers import AutoModelForCausalLM

    from tests.helpers_models import tiny_config

    cfg = tiny_config("qwen3_moe", 384)
    cfg.mlp_only_layers = []                    # llama.cpp's qwen3moe has routed experts in every block
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    path = tmp_path / "moe.gguf"
    write_moe_gguf(path, hf, tokenizer_dir, [gguf.GGMLQuantizationType[t] for t in types])
    eng = Engine(model_path=str(path), max_total_tokens=512)
    assert eng.quant_method == "gguf"
    moe = moe_layers(eng)
    assert moe and {m.impl for m in moe} == {kernel}, moe[0].kernel_choice
    ref_model, sd = gguf_reference(path, eng.config)
    check_experts_loaded(eng, {k: v for k, v in sd.items() if ".experts." in k})
    assert max_prompt_logprob_diff(eng, ref_model, {}, PROMPT) < 2e-3




def test_gguf_expert_type_without_a_decoder_fails_naming_it(tokenizer_dir, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    from quantrt.errors import QuantrtError
    from tests.helpers_models import tiny_config

    cfg = tiny_config("qwen3_moe", 384)
    cfg.mlp_only_layers = []
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    path = tmp_path / "moe.gguf"
    q81, q8 = gguf.GGMLQuantizationType.Q8_1, gguf.GGMLQuantizationType.Q8_0
    write_moe_gguf(path, hf, tokenizer_dir, [q81, q8, q8])
    with pytest.raises(QuantrtError, match=r"model\.layers\.0\.mlp\.experts\.0\.gate_proj: GGML type Q8_1 is not "
                                           r"supported natively \(supported: F32, F16, BF16, Q4_0"):
        Engine(model_path=str(path), max_total_tokens=256)
