"""bitsandbytes checkpoints written by transformers + bitsandbytes (CPU backend): our dequantized
weights equal bitsandbytes' own dequantize bit-exactly (4-bit) / to 1 ulp (8-bit), the Engine's logits
match transformers on those weights, online --quantization bitsandbytes (NF4, blocksize 64)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantrt.engine.engine import Engine
from quantrt.errors import CheckpointError, ConfigError
from quantrt.layers.linear import QuantLinear
from quantrt.quant.format import get_format
from quantrt.quant.formats.bitsandbytes import quantize_nf4
from quantrt.quant.weights import CodebookWeight
from tests.helpers_models import max_prompt_logprob_diff

bnb = pytest.importorskip("bitsandbytes")

CONFIGS = {
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
}


def _bnb_dequant(module) -> torch.Tensor:
    """bitsandbytes' own dequantized weight of a Linear4bit / Linear8bitLt."""
    w = module.weight
    if hasattr(w, "quant_state") and w.quant_state is not None:
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return bnb.functional.int8_vectorwise_dequant(w.data, w.SCB).float()


@pytest.fixture(scope="module")
def produced(tiny_models, tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """name -> (checkpoint dir, {prefix.weight: bitsandbytes' dequantized weight})."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    src = tiny_models["llama"][0]
    out = {}
    for name, kw in CONFIGS.items():
        cfg = BitsAndBytesConfig(**kw, bnb_4bit_compute_dtype=torch.float32)
        m = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32, device_map="cpu")
        d = tmp_path_factory.mktemp(f"bnb_{name}")
        m.save_pretrained(d)
        AutoTokenizer.from_pretrained(src).save_pretrained(d)
        deq = {f"{n}.weight": _bnb_dequant(mod) for n, mod in m.named_modules()
               if isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
        out[name] = (d, deq)
    return out


def _tensors_by_prefix(ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    sd = load_file(str(ckpt / "model.safetensors"))
    return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bnb_checkpoint_dequantizes_like_bitsandbytes(produced, name):
    import json

    ckpt, deq = produced[name]
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    fmt = get_format("bitsandbytes").from_config(qcfg)
    assert len(deq) == 2 * 7
    for wname, ref in deq.items():
        prefix = wname[: -len(".weight")]
        qw = fmt.make_weight(prefix, _tensors_by_prefix(ckpt, prefix), tuple(ref.shape))
        got = qw.dequantize()
        if name == "int8":  # bnb: (q * SCB) * (1/127); ours: q * (SCB * (1/127)) -> within 1 ulp
            assert torch.allclose(got, ref, rtol=2.5e-7, atol=0), (wname, float((got - ref).abs().max()))
        else:
            assert isinstance(qw, CodebookWeight) and torch.equal(got, ref), wname


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bnb_checkpoint_through_engine(produced, tiny_models, name):
    ckpt, deq = produced[name]
    eng = Engine(model_path=str(ckpt), max_total_tokens=1024, dtype="float32")
    assert eng.quant_method == "bitsandbytes"
    layers = [m for m in eng.model.modules() if isinstance(m, QuantLinear)]
    assert sum(m.is_quantized for m in layers) == 8 and not layers[-1].is_quantized  # lm_head float
    worst = max_prompt_logprob_diff(eng, tiny_models["llama"][1], deq, list(range(5, 37)))
    # 4-bit: dequantized once in fp32 (exact); int8: the packed op rounds activations to bf16
    assert worst < (5e-2 if name == "int8" else 1e-3), worst


def test_online_bnb_is_nf4_blocksize_64(tiny_models):
    hf = tiny_models["llama"][1]
    eng = Engine(model_path=str(tiny_models["llama"][0]), quantization="bitsandbytes", max_total_tokens=1024,
                 dtype="float32")
    assert "online nf4" in eng.quant_format.describe()
    sd = hf.state_dict()
    n_quant = 0
    for m in eng.model.modules():
        if not (isinstance(m, QuantLinear) and m.is_quantized):
            continue
        n_quant += 1
        w = torch.cat([sd[f"{p}.weight"] for p in m.shard_prefixes()])
        got = m(torch.eye(m.in_features)).T
        # equal to bitsandbytes' own NF4 (blocksize 64) of the same weight
        data, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        ref = bnb.functional.dequantize_4bit(data, state).float()
        assert torch.equal(got, ref), m.shard_prefixes()
        db = float(10 * torch.log10(w.pow(2).sum() / (w - got).pow(2).sum()))
        assert db > 18.0, db
    assert n_quant == 8


def test_quantize_nf4_codes_are_the_nearest_level():
    w = torch.randn(16, 64)
    cw = quantize_nf4(w)
    assert cw.blocksize == 64 and cw.absmax.numel() == 16
    assert float((cw.dequantize() - w).abs().max()) <= float(w.abs().max()) * 0.2


def test_bad_bnb_inputs(produced):
    with pytest.raises(ConfigError, match="exactly one of load_in_4bit / load_in_8bit"):
        get_format("bitsandbytes").from_config({"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                "load_in_8bit": True})
    with pytest.raises(ConfigError, match="bnb_4bit_quant_storage 'bfloat16'"):
        get_format("bitsandbytes").from_config({"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"})
    ckpt, deq = produced["nf4_dq"]
    fmt = get_format("bitsandbytes").from_config({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                  "bnb_4bit_use_double_quant": True})
    prefix = "model.layers.0.mlp.down_proj"
    t = _tensors_by_prefix(ckpt, prefix)
    t["weight"] = t["weight"][:-1]
    with pytest.raises(CheckpointError, match="4-bit weight holds"):
        fmt.make_weight(prefix, t, tuple(deq[prefix + ".weight"].shape))
    t = _tensors_by_prefix(ckpt, prefix)
    with pytest.raises(CheckpointError, match="quant_state shape"):
        fmt.make_weight(prefix, t, (1, 2))


def test_load_format_bitsandbytes(produced, tiny_models, tmp_path):
    """SGLang's `--load-format bitsandbytes`: a bnb checkpoint loads as with auto; a float checkpoint is
    quantized online with bnb (= --quantization bitsandbytes); contradictions name both flags."""
    from quantrt.server_args import ServerArgs

    ckpt, deq = produced["nf4_dq"]
    eng = Engine(model_path=str(ckpt), load_format="bitsandbytes", max_total_tokens=1024, dtype="float32")
    assert eng.quant_method == "bitsandbytes" and "nf4, double quant" in eng.quant_format.describe()
    assert max_prompt_logprob_diff(eng, tiny_models["llama"][1], deq, list(range(5, 37))) < 1e-3
    src = str(tiny_models["llama"][0])
    online = Engine(model_path=src, load_format="bitsandbytes", max_total_tokens=1024, dtype="float32")
    same = Engine(model_path=src, quantization="bitsandbytes", max_total_tokens=1024, dtype="float32")
    assert online.quant_method == "bitsandbytes" and "online nf4" in online.quant_format.describe()
    x = list(range(5, 21))
    a = online.generate(input_ids=x, sampling_params={"max_new_tokens": 4, "temperature": 0})
    b = same.generate(input_ids=x, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert a["output_ids"] == b["output_ids"]
    ServerArgs(model_path=src, load_format="bitsandbytes", quantization="bitsandbytes")  # consistent: fine
    with pytest.raises(ConfigError, match="--load-format bitsandbytes .* contradicts --quantization fp8"):
        ServerArgs(model_path=src, load_format="bitsandbytes", quantization="fp8")
    with pytest.raises(ConfigError, match="contradicts --torchao-config int8wo"):
        ServerArgs(model_path=src, load_format="bitsandbytes", torchao_config="int8wo")
    with pytest.raises(ConfigError, match="--load-format bitsandbytes reads .* is quantized with fp8"):
        Engine(model_path=str(produced_other(tmp_path, src)), load_format="bitsandbytes", max_total_tokens=1024)


def produced_other(tmp_path: Path, src: str) -> Path:
    """The tiny float checkpoint relabelled as an fp8 checkpoint's config (detection only)."""
    import json
    import shutil

    d = tmp_path / "fp8cfg"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d
