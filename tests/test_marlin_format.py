"""Marlin-serialized GPTQ checkpoints (AutoGPTQ `checkpoint_format: marlin`, tensors `B` and `s`).

No producer that writes this format installs here (AutoGPTQ's Marlin path needs CUDA SM >= 80), so the
test writes checkpoints with its own implementation of the layout documented by IST-DASLab Marlin's
`Layer.pack` / AutoGPTQ's `qlinear_marlin.QuantLinear.pack` (written here independently: explicit
per-element index arithmetic, not our vectorized un-permutation). Our loader must recover exactly the
canonical weights, which equal what the same weights give through the plain GPTQ layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from quantrt.engine.engine import Engine
from quantrt.errors import CheckpointError, ConfigError
from quantrt.quant.format import get_format
from quantrt.quant.formats import marlin_layout
from quantrt.quant.formats.packing import pack_lsb
from tests.helpers_models import max_prompt_logprob_diff


# ---- the documented layout, element by element -----------------------------------------------------
def _doc_perm() -> np.ndarray:
    """new[i] = old[perm[i]] within each 1024 chunk: warp thread i (of 32) takes, for 4 tiles j, the 8
    fragment values 16*row + col + 8*block (block 0/1; row 2(i%4), +1, 2(i%4)+8, +1; col i//4); each 8
    are then stored in the nibble order 0,2,4,6,1,3,5,7."""
    out = np.zeros(1024, dtype=np.int64)
    pos = 0
    for i in range(32):
        frag = []
        for block in range(2):
            for row in (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4) + 8, 2 * (i % 4) + 9):
                frag.append(16 * row + i // 4 + 8 * block)
        for j in range(4):
            vals = [f + 256 * j for f in frag]
            for slot in (0, 2, 4, 6, 1, 3, 5, 7):
                out[pos] = vals[slot]
                pos += 1
    return out


def _doc_scale_perm(per_channel: bool) -> np.ndarray:
    if per_channel:
        return np.array([2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)])
    return np.array([8 * j + i for i in range(8) for j in range(8)])


def write_marlin(codes: torch.Tensor, scales: torch.Tensor, g: int) -> dict[str, torch.Tensor]:
    """codes [N, K] uint4 (w = (q − 8)·s), scales [N, K/G] -> {"B": [K/16, 2N] int32, "s": [K/G, N] fp16}."""
    n, k = codes.shape
    q = codes.numpy().astype(np.int64)
    perm = _doc_perm()
    tiled = np.zeros((k // 16, 16 * n), dtype=np.int64)
    for kk in range(k):                                    # strip kk//16, tile n//16, row-major in the tile
        for nn in range(n):
            tiled[kk // 16, (nn // 16) * 256 + (kk % 16) * 16 + nn % 16] = q[nn, kk]
    permuted = tiled.reshape(-1, 1024)[:, perm].reshape(tiled.shape)
    words = np.zeros((k // 16, 2 * n), dtype=np.uint64)
    for j in range(8):
        words |= permuted[:, j::8].astype(np.uint64) << np.uint64(4 * j)
    b = torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())
    sp = _doc_scale_perm(g == k)
    s = scales.t().contiguous().numpy().astype(np.float16).reshape(-1, len(sp))[:, sp].reshape(k // g, n)
    return {"B": b, "s": torch.from_numpy(s.copy())}


def _rtn_sym4(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    wg = w.reshape(n, k // g, g)
    s = (wg.abs().amax(-1) / 7.5).half().float()
    q = (wg / s[..., None]).round().clamp(-8, 7) + 8
    return q.reshape(n, k).to(torch.uint8), s


MARLIN_CFG = {"quant_method": "gptq", "bits": 4, "sym": True, "desc_act": False, "checkpoint_format": "marlin"}


@pytest.mark.parametrize("n,k,g", [(64, 64, 64), (128, 128, 32), (64, 256, 128), (192, 128, 128)])
def test_marlin_roundtrip_equals_gptq_layout(n, k, g):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + g))
    codes, s = _rtn_sym4(w, g)
    gcfg = -1 if g == k else g
    marlin = get_format("gptq").from_config({**MARLIN_CFG, "group_size": gcfg}).make_weight(
        "l", write_marlin(codes, s, g), (n, k))
    assert torch.equal(marlin.codes, (codes.to(torch.int16) - 8).to(torch.int8))
    assert torch.equal(marlin.scale, s)
    plain = {"qweight": pack_lsb(codes.t().contiguous(), 4, 0),
             "qzeros": pack_lsb(torch.full((k // g, n), 7, dtype=torch.uint8), 4, 1), "scales": s.t().half()}
    ref = get_format("gptq").from_config({**MARLIN_CFG, "checkpoint_format": "gptq", "group_size": gcfg})
    assert torch.equal(marlin.dequantize(), ref.make_weight("l", plain, (n, k)).dequantize())


def test_layout_helpers_are_inverse_and_match_the_documented_tables():
    assert torch.equal(marlin_layout.PERM, torch.from_numpy(_doc_perm()))
    assert torch.equal(marlin_layout.SCALE_PERM, torch.from_numpy(_doc_scale_perm(False)))
    assert torch.equal(marlin_layout.SCALE_PERM_SINGLE, torch.from_numpy(_doc_scale_perm(True)))
    codes = torch.randint(0, 16, (128, 64), dtype=torch.uint8)
    b = marlin_layout.permute_codes(codes)
    assert torch.equal(b, write_marlin(codes, torch.ones(128, 1), 64)["B"])
    assert torch.equal(marlin_layout.unpermute_codes(b, 128, 64), codes)


def _tiny_llama(tokenizer_dir):
    """A tiny llama whose every linear has 64 | N (k/v: 4 kv heads of 16)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.mark.parametrize("group", [32, -1])
def test_marlin_checkpoint_through_engine_matches_transformers(tmp_path, tokenizer_dir, group):
    model, tok = _tiny_llama(tokenizer_dir)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    dequant = {}
    for name, t in list(sd.items()):
        if not name.endswith("proj.weight"):
            continue
        n, k = t.shape
        g = k if group == -1 else group
        codes, s = _rtn_sym4(t, g)
        prefix = name[: -len(".weight")]
        del sd[name]
        for key, v in write_marlin(codes, s, g).items():
            sd[f"{prefix}.{key}"] = v
        dequant[name] = (codes.float() - 8) * s.repeat_interleave(g, 1)
    d = tmp_path / "marlin"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {**MARLIN_CFG, "group_size": group}
    (d / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(d)
    eng = Engine(model_path=str(d), max_total_tokens=512, dtype="float32")
    assert eng.quant_method == "gptq" and "Marlin-serialized" in eng.quant_format.describe()
    assert max_prompt_logprob_diff(eng, model, dequant, list(range(5, 37))) < 1e-3


def test_marlin_bad_configs_and_tensors():
    with pytest.raises(ConfigError, match="must have bits=4"):
        get_format("gptq").from_config({**MARLIN_CFG, "bits": 8, "group_size": 128})
    with pytest.raises(ConfigError, match="sym=true, desc_act=false"):
        get_format("gptq").from_config({"quant_method": "gptq", "bits": 4, "sym": False, "desc_act": True,
                                        "is_marlin_format": True})
    fmt = get_format("gptq").from_config({**MARLIN_CFG, "group_size": 32})
    assert fmt.tensor_names("l")[0] == {"B", "s"}
    with pytest.raises(CheckpointError, match=r"16 \| K, 64 \| N"):
        fmt.make_weight("l", {}, (32, 64))
    t = write_marlin(*_rtn_sym4(torch.randn(64, 64), 32), 32)
    t["B"] = t["B"][:-1]
    with pytest.raises(CheckpointError, match=r"l\.B has shape"):
        fmt.make_weight("l", t, (64, 64))
