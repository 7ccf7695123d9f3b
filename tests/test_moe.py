"""FusedMoE: routing rules, grouped vs reference vs a per-expert loop, both checkpoint layouts,
quantized (fp8) experts, and strict loading of expert tensors."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantrt.engine.engine import Engine
from quantrt.errors import CheckpointError, ConfigError
from quantrt.layers.moe.experts import moe_grouped, moe_reference
from quantrt.layers.moe.layer import FusedMoE
from quantrt.layers.moe.routing import RoutingConfig, select_experts

PROMPT = list(range(5, 45))


def test_softmax_topk_renormalise_matches_the_definition():
    logits = torch.randn(16, 8)
    w, ids = select_experts(logits, RoutingConfig(8, 2, renormalize=True))
    p = logits.softmax(-1)
    top = p.topk(2, -1)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True))
    w2, _ = select_experts(logits, RoutingConfig(8, 2, renormalize=False))
    torch.testing.assert_close(w2, top.values)


def test_grouped_topk_sigmoid_with_correction_bias():
    """DeepSeek-V3: groups ranked by the sum of their best two biased scores; the bias steers the
    choice but the weights are the unbiased sigmoid scores, renormalised, times the scaling factor."""
    torch.manual_seed(0)
    cfg = RoutingConfig(16, 4, scoring="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)
    logits, bias = torch.randn(32, 16), torch.randn(16) * 0.1
    w, ids = select_experts(logits, cfg, bias)
    s = logits.sigmoid()
    for t in range(32):
        biased = (s[t] + bias).view(4, 4)
        groups = biased.topk(2, -1).values.sum(-1).topk(2).indices
        allowed = torch.cat([torch.arange(g * 4, g * 4 + 4) for g in groups.tolist()])
        want = allowed[biased.flatten()[allowed].topk(4).indices]
        assert set(ids[t].tolist()) == set(want.tolist())
        torch.testing.assert_close(w[t], s[t, ids[t]] / s[t, ids[t]].sum() * 2.5)


def test_bad_routing_configs():
    with pytest.raises(ConfigError, match="top_k 9"):
        RoutingConfig(8, 9)
    with pytest.raises(ConfigError, match="grouped top-k"):
        RoutingConfig(10, 2, n_group=4)


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_grouped_equals_reference_and_a_loop(tokens):
    torch.manual_seed(tokens)
    e, h, i, k = 8, 32, 16, 3
    x, w13, w2 = torch.randn(tokens, h), torch.randn(e, 2 * i, h) * 0.1, torch.randn(e, h, i) * 0.1
    weights, ids = select_experts(torch.randn(tokens, e), RoutingConfig(e, k))
    loop = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(k):
            g, u = (w13[ids[t, j]] @ x[t]).chunk(2)
            loop[t] += weights[t, j] * (w2[ids[t, j]] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(moe_grouped(x, weights, ids, w13, w2), loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe_reference(x, weights, ids, e, lambda n: (w13[n], w2[n])), loop,
                               atol=1e-5, rtol=1e-5)


# -- checkpoints ----------------------------------------------------------------------------------
@pytest.fixture
def ckpt(tiny_models, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_models["qwen3_moe"][0], dst)
    return dst


def _hf_logprobs(hf) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].double(), -1)


def _ours(eng) -> torch.Tensor:
    out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 1, "temperature": 0},
                       return_logprob=True, logprob_start_len=0)
    return torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]], dtype=torch.float64)


def test_fused_gate_up_layout_loads(ckpt, tiny_models):
    """transformers' in-memory layout (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I])."""
    hf = tiny_models["qwen3_moe"][1]
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(ckpt / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(str(ckpt / "model.safetensors"))
    eng = Engine(model_path=str(ckpt), max_total_tokens=512)
    ref = _hf_logprobs(hf)[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    torch.testing.assert_close(_ours(eng), ref, atol=2e-4, rtol=0)
    assert eng.model.model.layers[0].mlp.impl == "grouped"


def test_fp8_experts_run_the_reference_and_stay_close(tiny_models):
    """--quantization fp8 quantizes every expert (per-channel e4m3); the CPU dequant MoE kernel runs it."""
    path = str(tiny_models["qwen3_moe"][0])
    ref = _ours(Engine(model_path=path, max_total_tokens=512))
    eng = Engine(model_path=path, quantization="fp8", max_total_tokens=512)
    moe = eng.model.model.layers[0].mlp
    assert moe.impl == "cpu_moe_dequant" and type(moe.qexperts[0][0]).__name__ == "FloatWeight"
    assert (eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 4})["output_ids"])
    err = (_ours(eng) - ref).abs()
    # whole-model fp8 W8A8 on a random tiny model (attention too); measured max 0.35, mean ~0.07
    assert err.max().item() < 0.6 and err.mean().item() < 0.15
    hf = tiny_models["qwen3_moe"][1].model.layers[0].mlp.experts
    w = torch.cat([moe.qexperts[3][0].dequantize(), moe.qexperts[3][1].dequantize()])   # [2I, H]
    ref_w = hf.gate_up_proj[3].detach()
    sqnr = 10 * torch.log10(ref_w.pow(2).sum() / (ref_w - w).pow(2).sum())
    assert sqnr > 25, f"fp8 expert weight SQNR {sqnr:.1f} dB"


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("model.layers.0.mlp.experts.5.up_proj.weight"), "missing tensors: .*experts.5.up_proj"),
    (lambda sd: sd.pop("model.layers.0.mlp.gate.weight"), "missing tensors: model.layers.0.mlp.gate.weight"),
    (lambda sd: sd.__setitem__("model.layers.0.mlp.experts.8.up_proj.weight", torch.zeros(32, 64)),
     "expert 8 does not exist"),
    (lambda sd: sd.__setitem__("model.layers.0.mlp.experts.1.up_proj.weight", torch.zeros(32, 63)),
     r"experts.1.up_proj.weight has shape \(32, 63\)"),
    (lambda sd: sd.__setitem__("model.layers.0.mlp.experts.1.up_proj.qweight", torch.zeros(4)),
     "up_proj expects weight"),
    (lambda sd: sd.__setitem__("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(8, 64, 64)),
     "both fused and per-expert"),
])
def test_expert_tensors_load_strictly(ckpt, edit, match):
    sd = load_file(str(ckpt / "model.safetensors"))
    edit(sd)
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=match):
        Engine(model_path=str(ckpt), max_total_tokens=256)


def test_moe_layers_are_fused_moe(tiny_models):
    eng = Engine(model_path=str(tiny_models["mixtral"][0]), max_total_tokens=256)
    assert all(isinstance(layer.mlp, FusedMoE) for layer in eng.model.model.layers)
    eng = Engine(model_path=str(tiny_models["qwen3_moe"][0]), max_total_tokens=256)
    assert [isinstance(layer.mlp, FusedMoE) for layer in eng.model.model.layers] == [True, False]
