"""auto-round checkpoints produced by auto-round itself (RTN, iters=0, in its own venv, tests/producers.py)
load through the Engine bit-exactly: our dequantized weights equal auto-round's own fake-quantized weights,
and our logits match transformers running those weights. Covered exports: auto_round (auto_gptq packing,
and v2 zeros when asymmetric), auto_gptq, auto_awq, llm_compressor (compressed-tensors pack-quantized) at
W2/W3/W4/W8, and GGUF (q4_0, q4_k_s; compared with transformers' own GGUF loading, which dequantizes
with llama.cpp's gguf-py). Plus the config rules (extra_config, block names)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantrt.engine.engine import Engine
from quantrt.errors import ConfigError, NotSupportedYet
from quantrt.layers.linear import QuantLinear
from quantrt.quant.format import get_format
from tests.helpers_models import max_prompt_logprob_diff
from tests.producers import _AR_PRODUCE, AR_PINS, REPO, autoround_produce

# name -> AutoRound arguments and export format ("src": "wide" = the 256-wide llama, for GGUF K-quants)
JOBS: dict[str, dict] = {
    "w4_sym": {"bits": 4, "group_size": 32, "sym": True, "format": "auto_round,auto_gptq,auto_awq"},
    "w3_asym": {"bits": 3, "group_size": 32, "sym": False, "format": "auto_round"},
    "w4_asym_awq": {"bits": 4, "group_size": 32, "sym": False, "format": "auto_awq"},
    "w2_mixed": {"bits": 2, "group_size": 32, "sym": True, "format": "auto_round",
                 "layer_config": {"model.layers.1.mlp.down_proj": {"bits": 8, "group_size": -1},
                                  "model.layers.0.self_attn.o_proj": {"bits": 16}}},
    "w8_block0": {"bits": 8, "group_size": 64, "sym": True, "format": "auto_round",
                  "to_quant_block_names": "model.layers.0"},
    # auto_gptq export at every other width
    "w2_gptq": {"bits": 2, "group_size": 32, "sym": True, "format": "auto_gptq"},
    "w3_gptq": {"bits": 3, "group_size": 32, "sym": True, "format": "auto_gptq"},
    "w8_gptq": {"bits": 8, "group_size": -1, "sym": True, "format": "auto_gptq"},
    # a partial last group: K=64 / 128 at G=48 -> ceil(K/48) groups, the last one short. (auto-round
    # 0.16.1's AWQ packer refuses G not dividing K, and crashes on asymmetric 4-bit with format="auto_round":
    # WQLinear_GEMM weight_dtype; so GPTQ packing here)
    "w4_g48_partial": {"bits": 4, "group_size": 48, "sym": True, "format": "auto_round"},
    # llm_compressor export: a compressed-tensors pack-quantized checkpoint
    "w4_llmc": {"bits": 4, "group_size": 32, "sym": True, "format": "llm_compressor"},
    "w3_llmc_asym": {"bits": 3, "group_size": 32, "sym": False, "format": "llm_compressor"},
    "w2_llmc": {"bits": 2, "group_size": 32, "sym": True, "format": "llm_compressor"},
    "w8_llmc": {"bits": 8, "group_size": -1, "sym": True, "format": "llm_compressor"},
    # GGUF (llama.cpp's converter bundled with auto-round); K-quants need K >= 256
    "gguf_q4_0": {"format": "gguf:q4_0", "src": "wide"},
    "gguf_q4_k_s": {"format": "gguf:q4_k_s", "src": "wide"},
}


def _wide_llama(out: Path, tokenizer_dir: Path):
    """A one-layer llama with hidden 256 / intermediate 512 (GGUF K-quant blocks are 256 wide)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def produced(tiny_models, tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """Run auto-round over every job; name -> output root (checkpoints in sub-directories). Each job is
    kept in .cache/autoround-tests/<name>-<key>, the key hashing its spec, the producer pins and the
    source weights: a later session (or a new job) only runs the (minutes-long) producer for what is new."""
    srcs = {"llama": tiny_models["llama"][0], "wide": tmp_path_factory.mktemp("wide_llama")}
    _wide_llama(srcs["wide"], tokenizer_dir)
    weights = {k: hashlib.sha1((d / "model.safetensors").read_bytes()).hexdigest() for k, d in srcs.items()}
    out, todo = {}, []
    for name, spec in JOBS.items():
        src = spec.get("src", "llama")
        key = hashlib.sha1(json.dumps([spec, AR_PINS, weights[src], _AR_PRODUCE]).encode()).hexdigest()[:12]
        out[name] = REPO / ".cache" / "autoround-tests" / f"{name}-{key}"
        if not (out[name] / ".complete").exists():
            shutil.rmtree(out[name], ignore_errors=True)
            todo.append((srcs[src], out[name], {k: v for k, v in spec.items() if k != "src"}))
    if todo:
        autoround_produce(todo)
        for _, dst, _ in todo:
            (dst / ".complete").write_text("")
    return out


def _checkpoint(root: Path, sub: str | None = None) -> Path:
    """auto-round writes <dst>/<model>-w<b>g<g>[/<format dir>]: the directory holding config.json."""
    dirs = [p.parent for p in root.rglob("config.json")]
    if sub is not None:
        dirs = [d for d in dirs if d.name == sub]
    assert len(dirs) == 1, dirs
    return dirs[0]


CASES = [  # (job, format sub-directory, method quantrt detects, packing_format auto-round wrote)
    ("w4_sym", "auto-round-auto-gptq", "auto-round", "auto_round:auto_gptq"),
    ("w4_sym", "auto-gptq", "gptq", None),
    ("w4_sym", "auto-awq", "awq", None),
    ("w3_asym", None, "auto-round", "auto_round"),
    ("w4_asym_awq", None, "awq", None),
    ("w2_mixed", None, "auto-round", "auto_round:auto_gptq"),
    ("w8_block0", None, "auto-round", "auto_round:auto_gptq"),
    ("w4_g48_partial", None, "auto-round", "auto_round:auto_gptq"),
    ("w2_gptq", None, "gptq", None),
    ("w3_gptq", None, "gptq", None),
    ("w8_gptq", None, "gptq", None),
    ("w4_llmc", None, "compressed-tensors", None),
    ("w3_llmc_asym", None, "compressed-tensors", None),
    ("w2_llmc", None, "compressed-tensors", None),
    ("w8_llmc", None, "compressed-tensors", None),
]


def _shard_weights(eng: Engine) -> dict[str, torch.Tensor]:
    """Every quantized shard's effective weight [N, K], read back through its kernel (x = I, fp32)."""
    out = {}
    for m in eng.model.modules():
        if isinstance(m, QuantLinear) and m.is_quantized:
            y = m(torch.eye(m.in_features)).T                                    # [N, K]
            if m.bias is not None:
                y = y - m.bias.float()[:, None]
            off = 0
            for p, (_, n) in zip(m.shard_prefixes(), m.shards):
                out[p] = y[off:off + n]
                off += n
    return out


@pytest.mark.parametrize("job,sub,method,packing", CASES, ids=[f"{c[0]}-{c[1] or 'main'}" for c in CASES])
def test_autoround_checkpoint_matches_autoround(produced, tiny_models, job, sub, method, packing):
    ckpt = _checkpoint(produced[job], sub)
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qcfg.get("packing_format") == packing
    qdq = load_file(str(produced[job] / "qdq.safetensors"))
    eng = Engine(model_path=str(ckpt), max_total_tokens=1024, dtype="float32")
    assert eng.quant_method == method
    ours = _shard_weights(eng)
    assert {f"{p}.weight" for p in ours} == set(qdq), (sorted(ours), sorted(qdq))
    for p, w in ours.items():
        assert torch.equal(w, qdq[f"{p}.weight"]), p                            # bit-exact
    # logits vs transformers on auto-round's dequantized weights
    worst = max_prompt_logprob_diff(eng, tiny_models["llama"][1], qdq, list(range(5, 37)))
    assert worst < 1e-3, worst


@pytest.mark.parametrize("job,types", [("gguf_q4_0", {"Q4_0"}), ("gguf_q4_k_s", {"Q4_K", "Q5_K"})])
def test_autoround_gguf_export_matches_transformers_gguf(produced, job, types):
    """auto-round's GGUF export through our GGUF path: every linear equals the weight transformers loads
    from the same file (llama.cpp's dequantization, Q/K rows un-permuted), and the logits match."""
    import gguf
    from transformers import AutoModelForCausalLM

    (path,) = produced[job].rglob("*.gguf")
    written = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith("blk.")}
    assert types <= written, written
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ref = hf.state_dict()
    eng = Engine(model_path=str(path), max_total_tokens=1024, dtype="float32")
    assert eng.quant_method == "gguf"
    ours = _shard_weights(eng)
    assert len(ours) == 8 and "lm_head" in ours, sorted(ours)                  # 7 linears + output (Q6_K)
    for p, w in ours.items():
        assert torch.equal(w, ref[f"{p}.weight"]), p                              # bit-exact
    assert max_prompt_logprob_diff(eng, hf, {}, list(range(5, 37))) < 1e-3


def test_extra_config_and_block_names_route_layers():
    fmt = get_format("auto-round").from_config({
        "quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True,
        "packing_format": "auto_round:auto_gptq", "block_name_to_quantize": "model.layers",
        "extra_config": {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": -1},
                         r".*\.self_attn\.o_proj": {"bits": 16},
                         "lm_head": {"bits": 4, "group_size": 32}}})
    assert fmt.layer_config("model.layers.3.mlp.up_proj") == (4, 128, True)
    assert fmt.layer_config("model.layers.0.mlp.down_proj") == (8, -1, True)
    assert fmt.layer_config("model.layers.1.self_attn.o_proj") is None          # regex: 16 bits = float
    assert fmt.layer_config("lm_head") == (4, 32, True)                          # quantized by extra_config
    assert fmt.layer_config("visual.blocks.0.mlp.fc1") is None                   # outside the blocks
    assert fmt.tensor_names("model.layers.0.mlp.down_proj")[0] == {"qweight", "qzeros", "scales"}
    awq = get_format("auto-round").from_config({"bits": 4, "group_size": 64, "sym": False,
                                                "packing_format": "auto_round:auto_awq"})
    assert "auto_awq -> awq" in awq.describe()


@pytest.mark.parametrize("qcfg,err,match", [
    ({"bits": 5, "group_size": 32}, ConfigError, "bits=5 in the checkpoint is not supported"),
    ({"bits": 4, "extra_config": {"a": {"bits": 6}}}, ConfigError, r"bits=6 in extra_config\['a'\]"),
    ({"bits": 2, "packing_format": "auto_round:auto_awq"}, ConfigError, "4-bit only"),
    ({"bits": 4, "packing_format": "auto_round:llm_compressor"}, NotSupportedYet,
     "NVFP4/MXFP floating-point packing.*integer llm_compressor export is a compressed-tensors checkpoint"),
    ({"bits": 4, "packing_format": "auto_round:marlin"}, NotSupportedYet, "packing_format 'auto_round:marlin'"),
    ({"bits": 4, "act_bits": 8}, NotSupportedYet, "act_bits=8"),
    ({"bits": 4, "data_type": "nv_fp"}, NotSupportedYet, "data_type 'nv_fp'"),
    ({"bits": 4, "backend": "exllama"}, ConfigError, "backend 'exllama'"),
])
def test_bad_autoround_configs(qcfg, err, match):
    with pytest.raises(err, match=match):
        get_format("auto-round").from_config({"quant_method": "auto-round", **qcfg})
