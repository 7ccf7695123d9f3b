"""gpt-oss: prompt logprobs vs transformers' GptOssForCausalLM on the same weights (attention sinks,
alternating sliding-window / full layers, yarn rotary, biased router, clamped SwiGLU experts with
biases), MXFP4 experts written by an independent float64 OCP-MX quantizer (dequantized weights compared
bit-exactly, logits vs transformers reading the same MXFP4 checkpoint), greedy generation past the
sliding window, and strict loading of blocks / scales / sinks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from quantrt.engine.engine import Engine
from quantrt.errors import CheckpointError, ConfigError
from quantrt.layers.attention import with_sink_column
from quantrt.quant.formats.mxfp4 import Mxfp4Format, quantize_mxfp4
from tests.helpers_models import build_model, dense_prompt_logprobs, max_prompt_logprob_diff

PROMPT = list(range(5, 45))          # 40 tokens: 5x the sliding window of the tiny config
WINDOW = 8
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def tiny_gpt_oss_config(vocab: int):
    from transformers import GptOssConfig

    return GptOssConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, head_dim=16, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        sliding_window=WINDOW, max_position_embeddings=256, initializer_range=0.1,
                        eos_token_id=2, bos_token_id=0, pad_token_id=0,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                         "original_max_position_embeddings": 64})


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory, tokenizer_dir):
    """(checkpoint dir, fp32 transformers model): random weights, sinks ~ N(0, 1), non-trivial biases."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("gpt_oss")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_gpt_oss_config(len(tok)), dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif n.endswith("sinks"):
                p.normal_(0, 1.0)
            elif p.dim() == 1 or n.endswith("_bias"):
                p.normal_(0, 0.05)
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out, model.eval()


# -- an independent MXFP4 quantizer (OCP MX v1.0: shared scale 2^(floor(log2 amax) - emax), emax(e2m1) = 2,
#    elements rounded to the nearest e2m1 value, ties to even mantissa), in float64 --------------------------
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def mx_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> blocks uint8 [N, K/32, 16] (even element in the low nibble), scales uint8 [N, K/32]."""
    v = w.to(torch.float64).reshape(w.shape[0], -1, 32)
    amax = v.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127.0)).clamp(-127, 127)
    dist = ((v / torch.exp2(e)[..., None]).abs()[..., None] - E2M1).abs()           # [N, G, 32, 8]
    nearest = dist == dist.min(-1, keepdim=True).values
    even = nearest & (torch.arange(8) % 2 == 0)
    idx = torch.where(even.any(-1), even.double().argmax(-1), nearest.double().argmax(-1))
    codes = idx + 8 * (v < 0).long()                                                  # bit 3: sign
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8), (e + 127).to(torch.uint8)


def mx_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [N, G, 16], scales [N, G] -> float64 [N, G*32]."""
    codes = torch.stack([blocks & 15, blocks >> 4], -1).reshape(*blocks.shape[:-1], 32).long()
    vals = E2M1[codes % 8] * (1.0 - 2.0 * (codes >= 8).double())
    return (vals * torch.exp2(scales.double() - 127)[..., None]).reshape(blocks.shape[0], -1)


def test_independent_quantizer_follows_the_spec():
    """Ties go to the even mantissa, values past 6 saturate, the scale is 2^(floor(log2 amax) - 2)."""
    row = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -7.9] + [0.0] * 23 + [4.0], dtype=torch.float64)
    b, s = mx_quantize(row[None])
    assert s.item() == 127                                   # amax 7.9 -> 2^(2 - 2) = 1
    got = mx_dequantize(b, s)[0, :8].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0]
    assert b[0, 0, 0].item() == (0 | (2 << 4))               # element 0 (code 0) low, element 1 (code 2) high


def test_runtime_quantizer_equals_the_independent_one_on_ties():
    """quantize_mxfp4 (online --quantization mxfp4) vs the float64 quantizer, with every element on a
    multiple of 1/4 of its block scale (all e2m1 ties occur) and on random values."""
    g = torch.Generator().manual_seed(3)
    ties = torch.randint(-32, 33, (16, 64), generator=g).float() / 4 * torch.exp2(
        torch.randint(-6, 6, (16, 2), generator=g).float()).repeat_interleave(32, 1)
    for w in (ties, torch.randn(16, 64, generator=g) * 3):
        ours = quantize_mxfp4(w)
        b, s = mx_quantize(w)
        assert torch.equal(ours.dequantize(torch.float64), mx_dequantize(b, s))


@pytest.fixture(scope="module")
def mxfp4_ckpt(gpt_oss, tmp_path_factory):
    """The tiny model with its experts MXFP4-quantized in gpt-oss's on-disk layout; returns
    (dir, {expert param name: float64 dequantized [E, K, N]})."""
    src, _ = gpt_oss
    dst = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    sd = load_file(str(dst / "model.safetensors"))
    deq = {}
    for name in [n for n in sd if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = sd.pop(name)                                                   # [E, K, N]
        pairs = [mx_quantize(w[e].t()) for e in range(w.shape[0])]         # rows = N outputs
        sd[f"{name}_blocks"] = torch.stack([b for b, _ in pairs])
        sd[f"{name}_scales"] = torch.stack([s for _, s in pairs])
        deq[name] = torch.stack([mx_dequantize(b, s).t() for b, s in pairs])
    save_file(sd, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst, deq


# -- parity with transformers -------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 7])
def test_prompt_logprobs_match_transformers(gpt_oss, chunk):
    """40-token prompt over window-8 sliding layers; chunk 7 runs extends over a cached prefix."""
    path, hf = gpt_oss
    kw = {"chunked_prefill_size": chunk} if chunk else {}
    eng = Engine(model_path=str(path), max_total_tokens=512, page_size=4, **kw)
    assert eng.model.model.layers[0].self_attn.attn.window == WINDOW
    assert eng.model.model.layers[1].self_attn.attn.window is None
    assert eng.model.model.layers[0].mlp.impl == "grouped"
    diff = max_prompt_logprob_diff(eng, hf, {}, PROMPT)
    assert diff < 1e-4, f"max |log p| difference {diff:.2e}"     # measured ~2e-6 (fp32)


def test_sinks_matter_and_are_loaded(gpt_oss):
    """The sinks arrive from the checkpoint; with them zeroed the reference drifts far past the tolerance
    above, so the parity test really checks them."""
    path, hf = gpt_oss
    eng = Engine(model_path=str(path), max_total_tokens=512)
    torch.testing.assert_close(eng.model.model.layers[1].self_attn.sinks.data,
                               hf.model.layers[1].self_attn.sinks.data, rtol=0, atol=0)
    zeroed = {f"model.layers.{i}.self_attn.sinks": torch.zeros(4) for i in range(2)}
    assert max_prompt_logprob_diff(eng, hf, zeroed, PROMPT[:12]) > 1e-2


def test_grouped_experts_equal_the_reference_loop(gpt_oss):
    """The block's MoESpec carries the clamped SwiGLU and the expert biases; the selected grouped kernel
    and the reference MoE kernel agree on it."""
    from quantrt.layers.moe.experts import ReferenceMoEKernel
    from quantrt.platforms.xpu.cpu_platform import CpuPlatform

    eng = Engine(model_path=str(gpt_oss[0]), max_total_tokens=256)
    moe = eng.model.model.layers[1].mlp
    assert moe.impl == "grouped" and moe.spec.activation == ("swiglu_clamped", 1.702, 7.0) and moe.spec.has_bias
    x = torch.randn(9, 64) * 3
    w, ids = moe.route(x)
    ref = ReferenceMoEKernel.prepare(moe.spec, CpuPlatform()).apply(x, w, ids)
    torch.testing.assert_close(moe.experts(x, w, ids), ref, atol=1e-5, rtol=1e-5)


def test_router_and_experts_match_transformers_block(gpt_oss):
    """One MoE block on its own: top-k of the biased logits, softmax over the k, clamped SwiGLU with
    (up + 1), interleaved gate/up columns, expert biases."""
    path, hf = gpt_oss
    eng = Engine(model_path=str(path), max_total_tokens=256)
    x = torch.randn(11, 64) * 3                                    # large enough to hit the clamps
    with torch.no_grad():
        ref, _ = hf.model.layers[0].mlp(x[None])
    torch.testing.assert_close(eng.model.model.layers[0].mlp(x), ref[0], atol=1e-5, rtol=1e-5)


def test_sink_column_equals_a_float64_softmax_with_sinks():
    torch.manual_seed(1)
    b, h, hkv, n, length, d = 2, 4, 2, 3, 7, 8
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    sinks = torch.randn(h) * 2
    mask = torch.rand(b, 1, n, length) > 0.3
    mask[..., 0] = True
    kk, vv, m = with_sink_column(k, v, mask, sinks)
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=m, scale=0.3, enable_gqa=True)
    k64, v64 = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    s = (q.double() @ k64.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    s = torch.cat([s, sinks.double().view(1, h, 1, 1).expand(b, h, n, 1)], -1)
    ref = s.softmax(-1)[..., :-1] @ v64
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)


def test_greedy_generation_past_the_window_matches_transformers(gpt_oss):
    """12-token prompt + 20 decoded tokens: decode attends through the window-8 sliding layers."""
    path, hf = gpt_oss
    ids = PROMPT[:12]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
    eng = Engine(model_path=str(path), max_total_tokens=512, page_size=4)
    out = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 20, "temperature": 0,
                                                       "ignore_eos": True})
    assert out["output_ids"] == ref[0, len(ids):].tolist()


# -- MXFP4 --------------------------------------------------------------------------------------------------
def test_mxfp4_experts_dequantize_bit_exactly(mxfp4_ckpt):
    """Our canonical MicroWeights (block 32, decoded e8m0) give the float64 quantizer's values exactly,
    after de-interleaving gate (even rows) and up (odd rows). Attention stays dense."""
    path, deq = mxfp4_ckpt
    eng = Engine(model_path=str(path), quantization="mxfp4", max_total_tokens=256)   # flag = checkpoint
    for i in range(2):
        moe = eng.model.model.layers[i].mlp
        assert moe.impl == "cpu_moe_mxfp4", moe.kernel_choice   # CPU: fp4 codes + e8m0 bytes, per-tile dequant
        gu, down = deq[f"model.layers.{i}.mlp.experts.gate_up_proj"], deq[f"model.layers.{i}.mlp.experts.down_proj"]
        for e, (g, u, d) in enumerate(moe.qexperts):
            assert type(g).__name__ == "MicroWeight" and g.block == 32 and g.global_scale is None
            assert torch.equal(g.dequantize(torch.float64), gu[e].t()[0::2])
            assert torch.equal(u.dequantize(torch.float64), gu[e].t()[1::2])
            assert torch.equal(d.dequantize(torch.float64), down[e].t())
    assert eng.model.model.layers[0].self_attn.qkv_proj.is_quantized is False


def test_mxfp4_logits_match_transformers_on_the_same_checkpoint(mxfp4_ckpt):
    """transformers reads the MXFP4 checkpoint itself (dequantizing on CPU): its expert weights equal
    the float64 quantizer's, and our prompt logprobs match it."""
    from transformers import AutoModelForCausalLM

    path, deq = mxfp4_ckpt
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = dict(hf.named_parameters())
    for name, ref in deq.items():
        assert torch.equal(params[name].detach().double(), ref), name
    eng = Engine(model_path=str(path), max_total_tokens=512)
    diff = max_prompt_logprob_diff(eng, hf, {}, PROMPT)
    assert diff < 1e-4, f"max |log p| difference {diff:.2e}"


def _edit_mxfp4(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def _set_byte(sd, name, value):
    t = sd[name].clone()
    t.view(-1)[5] = value
    sd[name] = t


P = "model.layers.0.mlp.experts."


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.__setitem__(P + "gate_up_proj_blocks", sd[P + "gate_up_proj_blocks"][..., :15].contiguous()),
     r"gate_up_proj_blocks has shape \(128, 2, 15\) per expert, expected \(128, 2, 16\)"),
    (lambda sd: sd.__setitem__(P + "down_proj_scales", torch.zeros(4, 64, 3, dtype=torch.uint8)),
     r"down_proj_scales has shape \(64, 3\) per expert, expected \(64, 2\)"),
    (lambda sd: sd.__setitem__(P + "down_proj_scales", sd[P + "down_proj_scales"].float()),
     "down_proj_scales has dtype torch.float32; MXFP4 scales are uint8"),
    (lambda sd: sd.__setitem__(P + "down_proj_blocks", torch.zeros(5, 64, 2, 16, dtype=torch.uint8)),
     r"down_proj_blocks \(5, 64, 2, 16\).*\(4 experts\)"),
    (lambda sd: _set_byte(sd, P + "gate_up_proj_scales", 255), "0xFF, which is NaN in E8M0"),
    (lambda sd: sd.pop(P + "gate_up_proj_scales"),
     r"missing tensors: .*experts.gate_up_proj \(has only gate_up_proj_blocks\)"),
    (lambda sd: sd.__setitem__(P + "gate_up_proj", torch.zeros(4, 64, 128)),
     "unexpected tensor model.layers.0.mlp.experts.gate_up_proj: .* expects down_proj_blocks"),
    (lambda sd: sd.pop("model.layers.1.self_attn.sinks"), "missing tensors: model.layers.1.self_attn.sinks"),
    (lambda sd: sd.pop("model.layers.0.mlp.router.bias"), "missing tensors: model.layers.0.mlp.router.bias"),
    (lambda sd: sd.__setitem__(P + "gate_up_proj_bias", torch.zeros(4, 64)),
     r"gate_up_proj_bias has shape \(4, 64\), expected \(4, 128\)"),
])
def test_malformed_mxfp4_checkpoints_fail_clearly(mxfp4_ckpt, tmp_path, edit, match):
    path = _edit_mxfp4(mxfp4_ckpt[0], tmp_path / "m", edit)
    with pytest.raises(CheckpointError, match=match):
        Engine(model_path=str(path), max_total_tokens=256)


def test_dense_gate_up_with_wrong_layout_fails_clearly(gpt_oss, tmp_path):
    """transformers stores [E, H, 2I]; an [E, 2I, H] tensor (the per-row layout) is rejected by name."""
    def edit(sd):
        sd[P + "gate_up_proj"] = sd[P + "gate_up_proj"].transpose(1, 2).contiguous()
    path = _edit_mxfp4(gpt_oss[0], tmp_path / "m", edit)
    with pytest.raises(CheckpointError, match=r"gate_up_proj has shape \(4, 128, 64\), expected \(4, 64, 128\)"):
        Engine(model_path=str(path), max_total_tokens=256)


def test_mxfp4_config_without_mxfp4_tensors_fails_clearly(tokenizer_dir, tmp_path):
    """A non-gpt-oss model whose config says mxfp4 loads no MXFP4 tensor: an error, not a silent bf16 load."""
    d = tmp_path / "llama"
    build_model("llama", d, tokenizer_dir)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method mxfp4 but no MXFP4 expert tensors"):
        Engine(model_path=str(d), max_total_tokens=256)


def test_online_mxfp4_quantizes_experts_like_the_independent_quantizer(gpt_oss, mxfp4_ckpt):
    """`--quantization mxfp4` on the float checkpoint: the experts' codes and scales equal the float64
    OCP-MX quantizer's (so the model equals the MXFP4 checkpoint's), attention stays dense."""
    path, hf = gpt_oss
    deq = mxfp4_ckpt[1]
    eng = Engine(model_path=str(path), quantization="mxfp4", max_total_tokens=512)
    assert eng.quant_method == "mxfp4" and "online" in eng.quant_format.describe()
    for i in range(2):
        moe = eng.model.model.layers[i].mlp
        gu = deq[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        for e, (g, u, d) in enumerate(moe.qexperts):
            assert torch.equal(g.dequantize(torch.float64), gu[e].t()[0::2])
            assert torch.equal(u.dequantize(torch.float64), gu[e].t()[1::2])
            assert torch.equal(d.dequantize(torch.float64), deq[f"model.layers.{i}.mlp.experts.down_proj"][e].t())
    assert not eng.model.model.layers[0].self_attn.qkv_proj.is_quantized
    weights = {k: v.float() for k, v in deq.items()}
    diff = max_prompt_logprob_diff(eng, hf, weights, PROMPT)
    assert diff < 1e-4, f"max |log p| difference {diff:.2e}"


def test_online_mxfp4_on_a_model_without_gpt_oss_experts_fails_clearly(tokenizer_dir, tmp_path):
    d = tmp_path / "llama"
    build_model("llama", d, tokenizer_dir)
    with pytest.raises(CheckpointError, match="--quantization mxfp4 quantized no expert"):
        Engine(model_path=str(d), quantization="mxfp4", max_total_tokens=256)


def test_other_online_methods_on_gpt_oss_experts_fail_clearly(gpt_oss):
    with pytest.raises(CheckpointError, match="gpt-oss experts load as bf16/fp32 or MXFP4 .*; fp8 experts"):
        Engine(model_path=str(gpt_oss[0]), quantization="fp8", max_total_tokens=256)


def test_mxfp4_format_config_and_module_rules():
    fmt = Mxfp4Format.from_config({"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED})
    assert fmt.is_quantized("model.layers.3.mlp.experts.gate_up_proj")
    assert not fmt.is_quantized("model.layers.3.self_attn.q_proj")
    assert not fmt.is_quantized("model.layers.3.mlp.router")
    assert not fmt.is_quantized("lm_head")
    keep_down = Mxfp4Format.from_config({"modules_to_not_convert": ["model.layers.*.mlp.experts.down_proj"]})
    assert not keep_down.is_quantized("model.layers.0.mlp.experts.down_proj")
    assert keep_down.is_quantized("model.layers.0.mlp.experts.gate_up_proj")
    with pytest.raises(ConfigError, match="modules_to_not_convert must be a list"):
        Mxfp4Format.from_config({"modules_to_not_convert": "lm_head"})


def _position_diffs(engine, hf, ids: list[int]) -> torch.Tensor:
    """Per prompt position, the largest |log p| difference over the vocabulary vs hf (fp32, CPU)."""
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0}, return_logprob=True,
                          logprob_start_len=0, top_logprobs_num=engine.config.vocab_size)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    ours = dense_prompt_logprobs(out, engine.config.vocab_size)
    return (ours - ref[: len(ours)]).abs().amax(-1)


def test_bf16_on_cpu_is_as_close_as_transformers_bf16(gpt_oss):
    """--dtype bfloat16: per-position differences to fp32 transformers stay at bf16's level (median measured
    0.027; transformers bf16 vs fp32 ~0.03); at one position layer 1's 2nd and 3rd router logits are 0.0015
    apart, below bf16 resolution, so the expert choice flips there (0.59)."""
    path, hf = gpt_oss
    diffs = _position_diffs(Engine(model_path=str(path), dtype="bfloat16", max_total_tokens=512), hf, PROMPT)
    print(f"bf16 CPU: median {diffs.median():.3f}, max {diffs.max():.3f}, >0.2: {int((diffs > 0.2).sum())}")
    assert diffs.median() < 0.06 and int((diffs > 0.2).sum()) <= 2, diffs


# -- on the GPU machine (-m accelerator) ---------------------------------------------------------------------
@pytest.mark.accelerator
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("which", ["bf16", "mxfp4"])
def test_cuda_bf16_engine_stays_close_to_transformers(gpt_oss, mxfp4_ckpt, which):
    """bf16 on the GPU: dense and MXFP4 experts run the Triton fused MoE kernel (biases in its epilogue);
    prompt logprobs vs transformers in fp32 on CPU (bf16 rounding only)."""
    from transformers import AutoModelForCausalLM

    path = gpt_oss[0] if which == "bf16" else mxfp4_ckpt[0]
    hf = gpt_oss[1] if which == "bf16" else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eng = Engine(model_path=str(path), dtype="bfloat16", max_total_tokens=512, page_size=4)
    moe = eng.model.model.layers[0].mlp
    assert moe.impl == "triton_moe", moe.kernel_choice   # dense or MXFP4 + clamped SwiGLU + biases, fused MoE
    diffs = _position_diffs(eng, hf, PROMPT)
    print(f"gpt-oss {which} on CUDA bf16: |log p| diff per position: median {diffs.median():.3f}, "
          f"max {diffs.max():.3f}")
    # bf16 alone: transformers bf16 vs fp32 gives ~0.02-0.05 per position on this model; a near-tied
    # router choice may flip at a position or two (then ~0.5 there), as it does on CPU in bf16.
    assert diffs.median() < 0.06 and int((diffs > 0.2).sum()) <= 2, diffs
    out = eng.generate(input_ids=PROMPT[:12], sampling_params={"max_new_tokens": 20, "temperature": 0,
                                                               "ignore_eos": True})
    assert len(out["output_ids"]) == 20
