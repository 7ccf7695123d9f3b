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


def _add_tokenizer(w, c, tok_dir) -> None:
    """The tiny tokenizer as llama.cpp's converter stores a BPE tokenizer."""
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
    _add_tokenizer(w, c, tok_dir)
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


# -- GGUF Mixtral: llama arch with experts (llama.cpp's converter), stacked or one tensor per expert ---------
def write_mixtral_gguf(path, hf, tok_dir, expert_type, per_expert=False, skip=(), down_transposed=False,
                       used=None, count=None) -> None:
    """hf: a tiny MixtralForCausalLM written as arch `llama`: q/k rows permuted as llama.cpp does, router
    `ffn_gate_inp` F32, attention Q8_0, experts in `expert_type` as `ffn_{gate,up,down}_exps` [E, N, K] or
    (per_expert) `ffn_{gate,up,down}.E` [N, K]; `skip` drops tensors by GGUF name (bad-input tests)."""
    import gguf

    from tests.test_gguf_loader import _llama_cpp_permute

    c = hf.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_expert_count(count or c.num_local_experts)
    w.add_expert_used_count(used or c.num_experts_per_tok)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim or c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    _add_tokenizer(w, c, tok_dir)

    def put(name, arr, qt):
        if name not in skip:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(arr), qt), raw_dtype=qt)

    for hf_name, t in hf.state_dict().items():
        data = t.detach().float().numpy()
        layer = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if hf_name.endswith("experts.gate_up_proj") or hf_name.endswith("experts.down_proj"):
            i = c.intermediate_size
            parts = ([("ffn_gate", data[:, :i]), ("ffn_up", data[:, i:])] if hf_name.endswith("gate_up_proj")
                     else [("ffn_down", data.transpose(0, 2, 1) if down_transposed else data)])
            for base, arr in parts:
                if per_expert:
                    for e in range(arr.shape[0]):
                        put(f"blk.{layer}.{base}.{e}.weight", arr[e], expert_type)
                else:
                    put(f"blk.{layer}.{base}_exps.weight", arr, expert_type)
            continue
        prefix, _, suffix = hf_name.rpartition(".")
        gname = f"{names.get_name(prefix)}.{suffix}"
        if ".attn_q." in gname:
            data = _llama_cpp_permute(data, c.num_attention_heads)
        elif ".attn_k." in gname:
            data = _llama_cpp_permute(data, c.num_key_value_heads)
        if "self_attn" in hf_name and data.ndim == 2:
            put(gname, data, gguf.GGMLQuantizationType.Q8_0)
        elif gname not in skip:
            w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_mixtral():
    from transformers import AutoModelForCausalLM

    from tests.helpers_models import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("mixtral", 384), dtype=torch.float32).eval()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("per_expert", [False, True], ids=["stacked", "per-expert"])
def test_gguf_mixtral_loads_quantized_experts_and_matches_transformers(tokenizer_dir, tmp_path, qtype, per_expert):
    """A tiny Mixtral written by the gguf package as llama.cpp does (arch llama + expert_count): it loads as
    MixtralForCausalLM with the experts kept in their GGML blocks, every expert equals gguf's own
    dequantization bit for bit, and the logits match transformers' MixtralForCausalLM on those weights
    (transformers' GGUF loader does not read Mixtral files: llama arch, experts ignored)."""
    import gguf
    from transformers import MixtralForCausalLM

    from quantrt.loader.gguf_reader import GgufCheckpoint

    hf = _tiny_mixtral()
    path = tmp_path / "mixtral.gguf"
    write_mixtral_gguf(path, hf, tokenizer_dir, gguf.GGMLQuantizationType[qtype], per_expert=per_expert)
    eng = Engine(model_path=str(path), max_total_tokens=512)
    assert eng.quant_method == "gguf" and type(eng.config).__name__ == "MixtralConfig"
    assert (eng.config.num_local_experts, eng.config.num_experts_per_tok) == (4, 2)
    moe = moe_layers(eng)
    assert len(moe) == 2 and {m.impl for m in moe} == {"cpu_moe_dequant"}, moe[0].kernel_choice
    sd = dict(GgufCheckpoint(str(path)).iter_tensors())                 # gguf.quants.dequantize, HF rows
    for m in moe:
        layer = m.prefix.removesuffix(".block_sparse_moe")
        for p, proj in enumerate(("w1", "w3", "w2")):
            for e in range(4):
                want = sd[f"{m.prefix}.experts.{e}.{proj}.weight"] if per_expert else sd[f"{m.prefix}.experts.{proj}.weight"][e]
                assert torch.equal(m.spec.experts[e][p].dequantize(), want), (layer, proj, e)
    ref = {}
    for k, v in sd.items():
        k = k.replace("block_sparse_moe.gate.", "mlp.gate.")
        if ".block_sparse_moe.experts." not in k:
            ref[k] = v
    for i in range(2):
        ex = f"model.layers.{i}.block_sparse_moe.experts"
        per = [[sd[f"{ex}.{e}.{w}.weight"] for e in range(4)] if per_expert else sd[f"{ex}.{w}.weight"]
               for w in ("w1", "w3", "w2")]
        g, u, d = (torch.stack(x) if per_expert else x for x in per)
        ref[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([g, u], dim=1)
        ref[f"model.layers.{i}.mlp.experts.down_proj"] = d
    model = MixtralForCausalLM(eng.config).eval()
    model.load_state_dict(ref)
    assert max_prompt_logprob_diff(eng, model, {}, PROMPT) < 2e-3
    for k, v in hf.state_dict().items():        # and the file really holds the model it was written from
        if k.endswith("self_attn.q_proj.weight"):
            assert (ref[k] - v).abs().max() < 0.02 * v.abs().max()


@pytest.mark.parametrize("case, match", [
    ("missing-expert", r"lacks tensors the model needs: model\.layers\.0\.block_sparse_moe\.experts\.3\.w1\.weight "
                       r"\(GGUF blk\.0\.ffn_gate\.3\.weight\)"),
    ("down-transposed", r"GGUF tensor blk\.0\.ffn_down_exps\.weight has shape \[4, 32, 64\], "
                        r"model\.layers\.0\.block_sparse_moe\.experts\.w2\.weight needs \[4, 64, 32\]"),
    ("used-count", r"llama\.expert_count = 4 but llama\.expert_used_count = 5; expected 1\.\.4"),
    ("expert-count", r"GGUF tensor blk\.0\.ffn_\w+\.weight has shape \[4, \d+(, \d+)?\], "
                     r"model\.layers\.0\.block_sparse_moe\.\S+ needs \[5, "),     # 5 in metadata, 4 stored
])
def test_gguf_mixtral_bad_expert_tensors_fail_clearly(tokenizer_dir, tmp_path, case, match):
    import gguf

    from quantrt.errors import QuantrtError

    path = tmp_path / "bad.gguf"
    q8 = gguf.GGMLQuantizationType.Q8_0
    kw = {"missing-expert": {"per_expert": True, "skip": ("blk.0.ffn_gate.3.weight",)},
          "down-transposed": {"down_transposed": True}, "used-count": {"used": 5}, "expert-count": {"count": 5}}[case]
    write_mixtral_gguf(path, _tiny_mixtral(), tokenizer_dir, q8, **kw)
    with pytest.raises(QuantrtError, match=match):
        Engine(model_path=str(path), max_total_tokens=256)
