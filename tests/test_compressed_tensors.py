"""compressed-tensors checkpoints written by llm-compressor itself (own venv, tests/producers.py):
our dequantized weights vs compressed-tensors' own decompression, logits vs that reference, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantrt.engine.engine import Engine
from quantrt.errors import CheckpointError, NotSupportedYet
from quantrt.layers.linear import QuantLinear
from quantrt.quant.formats.compressed_tensors import CompressedTensorsFormat, unpack_int32
from quantrt.quant.weights import ActKind
from tests.producers import decompress, produce

G32 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}
# name -> (llm-compressor spec, weight tolerance vs ct's decompression, activation kind)
SCHEMES = {
    "W8A8": ({"scheme": "W8A8"}, 0.0, ActKind.DYNAMIC_TOKEN),
    "FP8_DYNAMIC": ({"scheme": "FP8_DYNAMIC"}, 0.0, ActKind.DYNAMIC_TOKEN),
    "FP8_BLOCK": ({"scheme": "FP8_BLOCK"}, 0.0, ActKind.DYNAMIC_GROUP),
    "FP8_static": ({"scheme": "FP8", "calibrate": True}, 0.0, ActKind.STATIC_TENSOR),
    "NVFP4A16": ({"scheme": "NVFP4A16"}, 1e-2, ActKind.NONE),  # ct decompresses in bf16
    "W4A16_asym": ({"config_groups": {"g": {"targets": ["Linear"], "weights": {**G32, "symmetric": False}}}},
                   0.0, ActKind.NONE),
    "W4A16_actorder": ({"config_groups": {"g": {"targets": ["re:.*mlp.*"],
                                                "weights": {**G32, "symmetric": True, "actorder": "weight"}}},
                        "calibrate": True, "gptq": {}}, 0.0, ActKind.NONE),
    "W8A16_channel": ({"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}}},
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                            "symmetric": True}, "calibrate": True}, 0.0, ActKind.NONE),
}


@pytest.fixture(scope="session")
def ct_checkpoints(tiny_models, tmp_path_factory):
    """name -> (checkpoint dir, ct-decompressed weights); one producer run, one decompression run."""
    src = tiny_models["llama"][0]
    root = tmp_path_factory.mktemp("ct")
    produce([(src, root / n, spec) for n, (spec, _, _) in SCHEMES.items()])
    decompress([(root / n, root / f"{n}.deq.safetensors") for n in SCHEMES])
    return {n: (root / n, load_file(str(root / f"{n}.deq.safetensors"))) for n in SCHEMES}


def _ours(eng: Engine, ckpt, prefix: str, shape) -> torch.Tensor:
    sd = load_file(str(ckpt / "model.safetensors"))
    ts = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    ts.pop("bias", None)
    return eng.quant_format.make_weight(prefix, ts, shape).dequantize()


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_llm_compressor_checkpoint_matches_ct_decompression(ct_checkpoints, tiny_models, name):
    ckpt, ref = ct_checkpoints[name]
    _, tol, akind = SCHEMES[name]
    eng = Engine(model_path=str(ckpt), max_total_tokens=2048)
    assert eng.quant_method == "compressed-tensors"
    for key, w in ref.items():
        prefix = key[: -len(".weight")]
        if not eng.quant_format.is_quantized(prefix):
            continue
        got = _ours(eng, ckpt, prefix, tuple(w.shape))
        err = float((got - w).abs().max() / w.abs().max())
        assert err <= tol, (name, prefix, err)
    quantized = [m for m in eng.model.modules() if isinstance(m, QuantLinear) and m.is_quantized]
    assert quantized and all("reference" not in m.kernel_desc for m in quantized if akind is not ActKind.NONE
                             or "NVFP4" not in name)
    layer = quantized[0]
    assert eng.quant_format.act_scheme(layer.shard_prefixes()[0]).kind is akind
    # logits: our engine vs the same model with ct's dequantized weights in fp32, activations unquantized
    hf = tiny_models["llama"][1]
    sd = {k: ref.get(k, v) for k, v in hf.state_dict().items()}
    hf2 = type(hf)(hf.config)
    hf2.load_state_dict(sd)
    ids = list(range(5, 37))
    out = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                       logprob_start_len=0, top_logprobs_num=eng.config.vocab_size)
    with torch.no_grad():
        lp = torch.log_softmax(hf2(torch.tensor([ids])).logits[0].double(), -1)
    kls = []
    for pos, tops in enumerate(out["meta_info"]["input_top_logprobs"][1:]):
        ours = torch.full_like(lp[pos], float("-inf"))
        for v, tok, _ in tops:
            ours[tok] = v
        kls.append(float((lp[pos].exp() * (lp[pos] - ours)).sum()))
    limit = 1e-4 if akind is ActKind.NONE else 0.02   # weight-only: same weights; W8A8: act rounding only
    assert sum(kls) / len(kls) < limit, (name, sum(kls) / len(kls))


def test_targets_ignore_and_kv_scales(ct_checkpoints):
    eng = Engine(model_path=str(ct_checkpoints["W4A16_actorder"][0]), max_total_tokens=2048)
    fmt = eng.quant_format
    assert fmt.is_quantized("model.layers.0.mlp.down_proj") and not fmt.is_quantized("model.layers.0.self_attn.q_proj")
    assert not fmt.is_quantized("lm_head")
    eng = Engine(model_path=str(ct_checkpoints["W8A16_channel"][0]), max_total_tokens=2048)
    assert eng.quant_format.cfg.kv_cache_scheme is not None


def test_w8a8_override_of_a_compressed_tensors_checkpoint(ct_checkpoints):
    eng = Engine(model_path=str(ct_checkpoints["W8A8"][0]), quantization="w8a8_int8", max_total_tokens=2048)
    assert eng.quant_method == "w8a8_int8"
    eng = Engine(model_path=str(ct_checkpoints["FP8_static"][0]), quantization="w8a8_fp8", max_total_tokens=2048)
    assert eng.quant_format.act_scheme("model.layers.0.mlp.down_proj").kind is ActKind.DYNAMIC_TOKEN
    with pytest.raises(CheckpointError, match="not 8-bit int8"):
        Engine(model_path=str(ct_checkpoints["FP8_DYNAMIC"][0]), quantization="w8a8_int8", max_total_tokens=2048)


def test_corrupt_checkpoints_fail_cleanly(ct_checkpoints, tmp_path):
    src = ct_checkpoints["W4A16_asym"][0]
    for what in ("missing", "shape", "nan"):
        d = tmp_path / what
        shutil.copytree(src, d)
        sd = load_file(str(d / "model.safetensors"))
        key = "model.layers.1.mlp.down_proj.weight_scale"
        if what == "missing":
            del sd[key]
        elif what == "shape":
            sd[key] = sd[key][:, :1].contiguous()
        else:
            sd[key][0, 0] = float("nan")
        save_file(sd, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight_scale"):
            Engine(model_path=str(d), max_total_tokens=2048)


def test_unsupported_schemes_are_named():
    with pytest.raises(NotSupportedYet, match="format 'marlin-24'.*recognised but not supported yet"):
        CompressedTensorsFormat.from_config({"quant_method": "compressed-tensors", "format": "marlin-24",
                                             "config_groups": {"g": {"targets": ["Linear"], "weights": G32}}})
    with pytest.raises(NotSupportedYet, match="W4A4"):
        CompressedTensorsFormat.from_config({"quant_method": "compressed-tensors", "config_groups": {"g": {
            "format": "nvfp4-pack-quantized", "targets": ["Linear"], "weights": G32, "input_activations": G32}}})


def test_unpack_int32_crosses_word_boundaries():
    vals = torch.randint(0, 8, (3, 40), dtype=torch.int64)                 # 3-bit values, 120 bits per row
    bits = ((vals[..., None] >> torch.arange(3)) & 1).reshape(3, -1)
    bits = torch.cat([bits, torch.zeros(3, 8, dtype=torch.int64)], 1).reshape(3, 4, 32)
    words = (bits << torch.arange(32)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert torch.equal(unpack_int32(words, 3, 40), vals.to(torch.uint8))
    json.dumps({})
