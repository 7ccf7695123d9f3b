"""auto-round checkpoints produced by auto-round itself (RTN, iters=0, in its own venv) load through the
Engine bit-exactly: our dequantized weights equal auto-round's own fake-quantized weights, and our
logits match transformers running those weights. Plus the config rules (extra_config, block names)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantrt.engine.engine import Engine
from quantrt.errors import ConfigError, NotSupportedYet
from quantrt.layers.linear import QuantLinear
from quantrt.quant.format import get_format
from tests.helpers_models import max_prompt_logprob_diff

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".cache" / "venvs" / "autoround"
PINS = ("torch==2.13.0", "auto-round==0.16.1")  # torch first: else pip resolves a CUDA torch

_PRODUCE = r'''
import json, sys, torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer
from safetensors.torch import save_file
for src, dst, spec in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    kw = {k: spec[k] for k in ("bits", "group_size", "sym", "layer_config", "to_quant_block_names") if k in spec}
    ar = AutoRound(model, tok, iters=0, disable_opt_rtn=True, nsamples=2, seqlen=8,
                   dataset=["the quick brown fox jumps over the lazy dog"] * 4, **kw)
    ar.quantize_and_save(dst, format=spec["format"], inplace=False)
    # auto-round's own dequantized (fake-quantized) weights, what its packers wrote
    save_file({n + ".weight": m.weight.detach().float().contiguous() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and hasattr(m, "scale")}, dst + "/qdq.safetensors")
'''


def autoround_python() -> Path:
    """The producer venv's python, built once (minutes) and reused from `.cache/venvs/autoround`."""
    py = VENV / "bin" / "python"
    marker = VENV / ".complete"
    if marker.exists():
        return py
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    for pin in PINS:
        subprocess.run([str(py), "-m", "pip", "install", "-q", pin], check=True)
    marker.write_text(" ".join(PINS))
    return py


# name -> (AutoRound arguments, export format, sub-directory auto-round writes under dst or "")
JOBS: dict[str, dict] = {
    "w4_sym": {"bits": 4, "group_size": 32, "sym": True, "format": "auto_round,auto_gptq,auto_awq"},
    "w3_asym": {"bits": 3, "group_size": 32, "sym": False, "format": "auto_round"},
    "w4_asym_awq": {"bits": 4, "group_size": 32, "sym": False, "format": "auto_awq"},
    "w2_mixed": {"bits": 2, "group_size": 32, "sym": True, "format": "auto_round",
                 "layer_config": {"model.layers.1.mlp.down_proj": {"bits": 8, "group_size": -1},
                                  "model.layers.0.self_attn.o_proj": {"bits": 16}}},
    "w8_block0": {"bits": 8, "group_size": 64, "sym": True, "format": "auto_round",
                  "to_quant_block_names": "model.layers.0"},
}


@pytest.fixture(scope="module")
def produced(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Run auto-round once over every job; name -> output root (checkpoints in sub-directories)."""
    src = tiny_models["llama"][0]
    root = tmp_path_factory.mktemp("autoround")
    jobs = [[str(src), str(root / name), spec] for name, spec in JOBS.items()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([str(autoround_python()), "-c", _PRODUCE, json.dumps(jobs)], capture_output=True, text=True,
                       env=env, timeout=900)
    if r.returncode:
        raise RuntimeError(f"auto-round producer failed:\n{r.stderr[-4000:]}")
    return {name: root / name for name in JOBS}


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
    ({"bits": 4, "packing_format": "auto_round:llm_compressor"}, NotSupportedYet, "packing_format"),
    ({"bits": 4, "act_bits": 8}, NotSupportedYet, "act_bits=8"),
    ({"bits": 4, "data_type": "nv_fp"}, NotSupportedYet, "data_type 'nv_fp'"),
    ({"bits": 4, "backend": "exllama"}, ConfigError, "backend 'exllama'"),
])
def test_bad_autoround_configs(qcfg, err, match):
    with pytest.raises(err, match=match):
        get_format("auto-round").from_config({"quant_method": "auto-round", **qcfg})
