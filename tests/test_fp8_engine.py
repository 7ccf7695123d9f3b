"""fp8 end to end through the Engine: online --quantization fp8, and fp8 checkpoints on disk."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantrt.engine.engine import Engine
from quantrt.layers.linear import QuantLinear
from quantrt.quant.quantize import quantize_fp8
from quantrt.quant.weights import ScaleGranularity


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


def _hf_weight(hf, layer: QuantLinear) -> torch.Tensor:
    sd = hf.state_dict()
    return torch.cat([sd[f"{p}.weight"] for p in layer.shard_prefixes()])


@pytest.fixture(scope="module")
def fp8_online(tiny_models):
    return Engine(model_path=str(tiny_models["llama"][0]), quantization="fp8", max_total_tokens=2048)


def test_online_fp8_every_linear_runs_fp8_with_sqnr_over_25db(fp8_online, tiny_models):
    hf = tiny_models["llama"][1]
    layers = [m for m in fp8_online.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 4 + 1  # qkv, o, gate_up, down per layer + untied lm_head
    torch.manual_seed(0)
    for layer in layers:
        if layer.shards[0][0] == "lm_head":
            assert not layer.is_quantized, "lm_head stays unquantized"
            continue
        assert layer.is_quantized and "fp8" in layer.kernel_desc, layer.kernel_desc
        x = torch.randn(16, layer.in_features)
        ref = x.double() @ _hf_weight(hf, layer).double().T
        assert sqnr_db(ref, layer(x)) >= 25.0, layer.shard_prefixes()


def test_online_fp8_generates_close_to_the_float_model(fp8_online, tiny_models):
    """Mean KL(float || fp8) of the next-token distributions over a prompt stays small."""
    ids = list(range(5, 40))
    out = fp8_online.generate(input_ids=ids, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                              logprob_start_len=0, top_logprobs_num=fp8_online.config.vocab_size)
    with torch.no_grad():
        ref = torch.log_softmax(tiny_models["llama"][1](torch.tensor([ids])).logits[0].double(), -1)
    kls = []
    for pos, tops in enumerate(out["meta_info"]["input_top_logprobs"][1:]):
        ours = torch.full_like(ref[pos], float("-inf"))
        for lp, tok, _ in tops:
            ours[tok] = lp
        kls.append(float((ref[pos].exp() * (ref[pos] - ours)).sum()))
    assert sum(kls) / len(kls) < 0.01, kls


def _write_fp8_checkpoint(src, dst, block: bool, static: bool) -> dict[str, torch.Tensor]:
    """Quantize the linears of a float checkpoint into HF fp8 layout; return the dequantized weights."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    out, deq = {}, {}
    for name, t in sd.items():
        is_linear = name.endswith("proj.weight") and "layers." in name
        if not is_linear:
            out[name] = t
            continue
        prefix = name[: -len(".weight")]
        if block:
            fw = quantize_fp8(t, ScaleGranularity.BLOCK, block=(32, 32))
            out[f"{prefix}.weight_scale_inv"] = fw.scale
        else:
            fw = quantize_fp8(t, ScaleGranularity.TENSOR)
            out[f"{prefix}.weight_scale"] = fw.scale
            if static:
                out[f"{prefix}.input_scale"] = torch.tensor(0.05)
        out[name] = fw.data
        deq[name] = fw.dequantize()
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    qc = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    if block:
        qc["weight_block_size"] = [32, 32]
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg))
    return deq


@pytest.mark.parametrize("block,static", [(False, False), (False, True), (True, False)])
def test_fp8_checkpoints_load_and_match_their_dequantized_weights(tiny_models, tmp_path, block, static):
    src = tiny_models["llama"][0]
    deq = _write_fp8_checkpoint(src, tmp_path / "ckpt", block, static)
    eng = Engine(model_path=str(tmp_path / "ckpt"), max_total_tokens=2048)
    assert eng.quant_method == "fp8"
    layers = {p: m for m in eng.model.modules() if isinstance(m, QuantLinear) for p in m.shard_prefixes()}
    torch.manual_seed(0)
    for name in deq:
        layer = layers[name[: -len(".weight")]]
        full = torch.cat([deq[f"{p}.weight"] for p in layer.shard_prefixes()])
        x = torch.randn(4, layer.in_features) * 0.5
        ref = x.double() @ full.double().T
        # activation quantization is the only difference left: fp8 e4m3 keeps ~30 dB
        assert sqnr_db(ref, layer(x)) >= 25.0, name


def test_fp8_checkpoint_with_a_missing_scale_fails_cleanly(tiny_models, tmp_path):
    src = tiny_models["llama"][0]
    _write_fp8_checkpoint(src, tmp_path / "ckpt", block=False, static=False)
    sd = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(sd, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(Exception) as e:
        Engine(model_path=str(tmp_path / "ckpt"), max_total_tokens=2048)
    assert "model.layers.1.mlp.down_proj.weight_scale" in str(e.value)
