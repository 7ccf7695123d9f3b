"""DeepSeek-V2/V3 (MLA + DeepSeekMoE) against transformers on tiny random checkpoints: prompt logprobs,
absorbed-decode logprobs, greedy generation with paged KV (batches of different lengths, prefix reuse),
the latent KV cache (geometry, fp8/fp4), a block-fp8 V3 checkpoint quantized here in float64, and clear
errors for bad configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantrt.engine.engine import Engine
from quantrt.errors import CheckpointError, ConfigError
from quantrt.layers.mla import MLAttention, mla_softmax_scale
from quantrt.layers.moe.layer import FusedMoE
from tests.helpers_models import dense_prompt_logprobs, max_prompt_logprob_diff

PROMPT = list(range(5, 50))
GREEDY = {"max_new_tokens": 8, "temperature": 0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "mscale": 1.0,
        "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}


def _config(kind: str, vocab: int, **over):
    from transformers import DeepseekV2Config, DeepseekV3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                  n_routed_experts=8, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
                  num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=512, eos_token_id=2,
                  bos_token_id=0, pad_token_id=0, initializer_range=0.1, tie_word_embeddings=False)
    if kind == "v2_lite":      # q_proj direct, greedy softmax top-k, no renormalisation
        cfg = dict(common, q_lora_rank=None, topk_method="greedy")
        return DeepseekV2Config(**{**cfg, **over})
    if kind == "v2_grouped":   # q_lora, group_limited_greedy, scaled
        cfg = dict(common, q_lora_rank=48, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                   routed_scaling_factor=1.5)
        return DeepseekV2Config(**{**cfg, **over})
    if kind == "v3":           # q_lora, noaux_tc (sigmoid + correction bias, grouped), yarn + mscale
        cfg = dict(common, q_lora_rank=48, n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_scaling=YARN)
        return DeepseekV3Config(**{**cfg, **over})
    if kind == "v3_half_rope":  # q_proj direct, rotate-half rope (rope_interleave false), no groups
        cfg = dict(common, q_lora_rank=None, n_group=1, topk_group=1, rope_interleave=False)
        return DeepseekV3Config(**{**cfg, **over})
    raise ValueError(kind)


def _build(kind: str, out: Path, tokenizer_dir: Path, seed: int = 0, **over):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind, len(tok), **over), dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and correction biases, so their handling is tested
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in n:
                t.add_(torch.randn_like(t) * 0.1)
            elif "e_score_correction_bias" in n:
                t.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return model


KINDS = ["v2_lite", "v2_grouped", "v3", "v3_half_rope"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """kind -> (checkpoint dir, transformers model)."""
    out = {}
    for kind in KINDS:
        d = tmp_path_factory.mktemp(f"ds_{kind}")
        out[kind] = (d, _build(kind, d, tokenizer_dir))
    return out


@pytest.fixture(scope="module")
def engines(models):
    return {k: Engine(model_path=str(d), max_total_tokens=4096, page_size=4) for k, (d, _) in models.items()}


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)   # [L, V]


# -- parity -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_prompt_logprobs_match_transformers(kind, models, engines):
    """Extend path (latents decompressed through kv_b_proj), all positions, whole vocabulary."""
    assert max_prompt_logprob_diff(engines[kind], models[kind][1], {}, PROMPT) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_absorbed_decode_logprobs_match_transformers(kind, models, engines):
    """Every generated token's logprob (decode path: q absorbed through W_UK, output through W_UV,
    attention over the latent rows) equals transformers' full forward over prompt + output."""
    out = engines[kind].generate(input_ids=PROMPT, sampling_params=GREEDY, return_logprob=True)
    ids = out["output_ids"]
    ref = _hf_logprobs(models[kind][1], PROMPT + ids)
    for j, (lp, tok, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
        assert tok == ids[j]
        assert abs(lp - float(ref[len(PROMPT) - 1 + j, tok])) < 1e-4, (j, lp)
    assert ids == [int(ref[len(PROMPT) - 1 + j].argmax()) for j in range(len(ids))]


def test_mla_layers_cache_latents_and_use_the_yarn_mscale(models, engines):
    c = models["v3"][1].config
    attn = [m for m in engines["v3"].model.modules() if isinstance(m, MLAttention)]
    assert len(attn) == 3 and all(m.w_uk.shape == (4, 16, 32) and m.w_uv.shape == (4, 32, 24) for m in attn)
    params = {id(p) for p in engines["v3"].model.parameters()}  # counted by the KV capacity accounting
    assert all(id(m.w_uk) in params and id(m.w_uv) in params for m in attn)
    m = 0.1 * 1.0 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert mla_softmax_scale(c) == pytest.approx(32 ** -0.5 * m * m)
    assert attn[0].attn.scale == pytest.approx(models["v3"][1].model.layers[0].self_attn.scaling)
    moe = [m for m in engines["v3"].model.modules() if isinstance(m, FusedMoE)]
    assert len(moe) == 2 and moe[0].prefix == "model.layers.1.mlp"          # first_k_dense_replace=1
    assert moe[0].routing.scoring == "sigmoid" and moe[0].routing.n_group == 4
    assert moe[0].shared is not None


def test_greedy_batch_of_different_lengths_with_prefix_reuse(models, engines):
    """Decode batches of 3 requests with different lengths, then a prompt that reuses cached pages:
    every output token is transformers' argmax after the prompt and the tokens before it (so each
    output is the transformers greedy continuation)."""
    eng, hf = engines["v3"], models["v3"][1]
    prompts = [PROMPT, PROMPT[:17] + [9, 8, 7], list(range(100, 130))]
    outs = eng.generate(input_ids=prompts, sampling_params=GREEDY)
    again = eng.generate(input_ids=PROMPT[:40] + [11, 12], sampling_params=GREEDY)
    assert again["meta_info"]["cached_tokens"] >= 36                       # pages of the first prompt
    for p, o in zip(prompts + [PROMPT[:40] + [11, 12]], outs + [again]):
        ids = o["output_ids"]
        ref = _hf_logprobs(hf, p + ids)[len(p) - 1:].argmax(-1).tolist()
        assert len(ids) >= 1 and ids == ref[: len(ids)]


def test_chunked_prefill_over_cached_latents_gives_the_same_tokens(models, engines):
    """Chunks of 7 tokens attend to the latents of earlier chunks (decompressed with a prefix mask)."""
    small = Engine(model_path=str(models["v2_grouped"][0]), max_total_tokens=4096, page_size=4,
                   chunked_prefill_size=7)
    prompts = [PROMPT, list(range(60, 83))]
    assert [o["output_ids"] for o in small.generate(input_ids=prompts, sampling_params=GREEDY)] == \
        [o["output_ids"] for o in engines["v2_grouped"].generate(input_ids=prompts, sampling_params=GREEDY)]


# -- the latent KV cache ----------------------------------------------------------------------------
def test_kv_geometry_is_one_latent_row_per_layer(engines):
    eng = engines["v2_lite"]
    geo = eng.kv_geometry
    assert (geo.num_layers, geo.num_kv_heads, geo.head_dim, geo.has_v) == (3, 1, 32 + 16, False)
    assert eng.kv_bytes_per_token == 3 * 48 * 4                           # fp32 compute on CPU, no V
    assert eng.kv_pool.v == [] and eng.kv_pool.nbytes() == eng.kv_info()["max_total_tokens"] * 3 * 48 * 4
    # the same model as plain MHA would cache 4 heads x (16+16) K + 4 x 24 V per layer
    assert eng.kv_bytes_per_token < 3 * 4 * (32 + 24) * 4
    assert "MLA latent" in eng.kv_info()["kv_layout"]


class _FakeFp8LatentCache:
    """A transformers DynamicCache whose stored latents (kv_nope, k_rot) are rounded through an fp8 dtype:
    transformers' own MLA with exactly what our latent cache holds."""

    def __new__(cls, config, dtype: torch.dtype, scale: float = 1.0):
        from transformers import DynamicCache

        class Cache(DynamicCache):
            def update(self, k, v, layer_idx, *args, **kwargs):
                q = lambda x: ((x.double() / scale).to(dtype).double() * scale).to(x.dtype)  # noqa: E731
                return super().update(q(k), q(v), layer_idx, *args, **kwargs)

        return Cache(config=config)


@pytest.mark.parametrize("kv,fp8", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_latent_cache_matches_transformers_with_fp8_rounded_latents(kv, fp8, models):
    """Prefill and absorbed decode read fp8 latents: every prompt position (whole vocabulary) and every
    decoded token match transformers whose cache rounds the same latents through fp8. The capacity is
    2x a bf16 latent cache."""
    d, hf = models["v3"]
    eng = Engine(model_path=str(d), max_total_tokens=4096, page_size=4, kv_cache_dtype=kv)
    info = eng.kv_info()
    assert info["bytes_per_token"] == 3 * 48 and info["capacity_vs_bf16"] == 2.0
    assert eng.kv_pool.k[0].dtype == torch.uint8 and eng.kv_pool.k[0].shape[1:] == (1, 48)
    out = eng.generate(input_ids=PROMPT, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0,
                       top_logprobs_num=eng.config.vocab_size)
    dec = out["output_ids"]
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + dec]), past_key_values=_FakeFp8LatentCache(hf.config, fp8),
                    use_cache=True).logits[0]
    ref = torch.log_softmax(logits.double(), -1)
    ours = dense_prompt_logprobs(out, eng.config.vocab_size)
    for pos in range(len(ours)):
        assert float((ours[pos] - ref[pos]).abs().max()) < 1e-4, pos
    for j, (lp, tok, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
        assert abs(lp - float(ref[len(PROMPT) - 1 + j, tok])) < 1e-4, j
    # the rounding itself matters on this sharp tiny model: far from the unrounded logprobs
    assert float((_hf_logprobs(hf, PROMPT) - ref[: len(PROMPT)]).abs().max()) > 1e-2


def test_checkpoint_kv_scale_scales_the_fp8_latent(models, tmp_path):
    """A per-layer k_scale (`self_attn.attn.k_scale`, `self_attn.k_scale` ...) divides the latent row
    before the fp8 cast and multiplies it back on read: transformers with latents rounded as
    fp8(x / s) * s gives the same logprobs. A v_scale is accepted (MLA has no V to scale)."""
    d = tmp_path / "scaled"
    shutil.copytree(models["v2_lite"][0], d)
    sd = load_file(str(d / "model.safetensors"))
    for i in range(3):
        sd[f"model.layers.{i}.self_attn.{'attn.' if i % 2 else ''}k_scale"] = torch.tensor(0.004)
        sd[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(-1.0)
    save_file(sd, str(d / "model.safetensors"))
    eng = Engine(model_path=str(d), max_total_tokens=1024, kv_cache_dtype="fp8_e4m3")
    k_scale = float(torch.tensor(0.004))                                  # the stored fp32 value
    assert [m.attn.k_scale for m in eng.model.modules() if isinstance(m, MLAttention)] == [k_scale] * 3
    out = eng.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                       logprob_start_len=0)
    hf = models["v2_lite"][1]
    with torch.no_grad():
        for s, tol in ((k_scale, 1e-4), (1.0, None)):
            cache = _FakeFp8LatentCache(hf.config, torch.float8_e4m3fn, s)
            ref = torch.log_softmax(hf(torch.tensor([PROMPT]), past_key_values=cache, use_cache=True)
                                    .logits[0].double(), -1)
            err = max(abs(lp - float(ref[i, PROMPT[i + 1]]))
                      for i, (lp, _, _) in enumerate(out["meta_info"]["input_token_logprobs"][1:]))
            assert err < tol if tol else err > 1e-3, (s, err)   # the scale changes what the cache holds


def test_fp4_latent_cache_runs_and_needs_a_latent_width_divisible_by_16(models, tokenizer_dir, tmp_path):
    eng = Engine(model_path=str(models["v2_lite"][0]), max_total_tokens=1024, kv_cache_dtype="fp4_e2m1")
    assert eng.kv_info()["bytes_per_token"] == 3 * 48 * 9 // 16           # 1/2 + 1/16 byte per element
    assert len(eng.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"]) == 8
    _build("v2_lite", tmp_path / "odd", tokenizer_dir, kv_lora_rank=24, num_hidden_layers=1)  # 24 + 16 = 40
    with pytest.raises(ConfigError, match="fp4_e2m1 needs.*1 KV heads of 40"):
        Engine(model_path=str(tmp_path / "odd"), max_total_tokens=1024, kv_cache_dtype="fp4_e2m1")


# -- block fp8 (DeepSeek-V3 layout) -----------------------------------------------------------------
BLOCK = (16, 32)  # non-square blocks catch a transposed scale grid


def _block_fp8_float64(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], weight_scale_inv [ceil(N/bn), ceil(K/bk)] fp32, dequantized float64)."""
    bn, bk = BLOCK
    n, k = w.shape
    gn, gk = -(-n // bn), -(-k // bk)
    pad = torch.zeros(gn * bn, gk * bk, dtype=torch.float64)
    pad[:n, :k] = w.double()
    blocks = pad.view(gn, bn, gk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12).float()     # [gn, gk]
    q = (blocks / scale.double()[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    deq = (q.double() * scale.double()[:, None, :, None]).view(gn * bn, gk * bk)[:n, :k]
    return q.view(gn * bn, gk * bk)[:n, :k].contiguous(), scale, deq


@pytest.fixture(scope="module")
def block_fp8(models, tmp_path_factory):
    """The V3 checkpoint with every decoder linear (MLA projections, dense MLP, shared and routed experts)
    in block fp8 (`weight_scale_inv`), and a float checkpoint of the dequantized weights."""
    src = models["v3"][0]
    q_dir, deq_dir = tmp_path_factory.mktemp("ds_v3_fp8"), tmp_path_factory.mktemp("ds_v3_deq")
    for d in (q_dir, deq_dir):
        shutil.copytree(src, d, dirs_exist_ok=True)
    sd = load_file(str(src / "model.safetensors"))
    q_sd, deq_sd = {}, {}
    for name, t in sd.items():
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if name.startswith("model.layers.") and name.endswith(".weight") and module.endswith(("proj", "mqa")):
            q, s, deq = _block_fp8_float64(t)
            q_sd[name], q_sd[name.replace(".weight", ".weight_scale_inv")] = q, s
            deq_sd[name] = deq.float()
        else:
            q_sd[name] = deq_sd[name] = t
    save_file(q_sd, str(q_dir / "model.safetensors"))
    save_file(deq_sd, str(deq_dir / "model.safetensors"))
    cfg = json.loads((q_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": list(BLOCK)}
    (q_dir / "config.json").write_text(json.dumps(cfg))
    return q_dir, deq_dir, deq_sd


def test_block_fp8_v3_checkpoint_matches_transformers_on_the_dequantized_weights(block_fp8):
    from transformers import AutoModelForCausalLM

    q_dir, deq_dir, deq_sd = block_fp8
    eng = Engine(model_path=str(q_dir), max_total_tokens=2048)
    assert eng.quant_method == "fp8"
    moe = [m for m in eng.model.modules() if isinstance(m, FusedMoE)]
    for m in moe:  # routed experts load as block-fp8 weights that dequantize to the float64 reference
        for e, (g, u, dn) in enumerate(m.qexperts):
            for w, proj in ((g, "gate_proj"), (u, "up_proj"), (dn, "down_proj")):
                assert w.block == BLOCK
                torch.testing.assert_close(w.dequantize(), deq_sd[f"{m.prefix}.experts.{e}.{proj}.weight"],
                                           rtol=0, atol=0)
    attn = [m for m in eng.model.modules() if isinstance(m, MLAttention)]
    assert all("fp8" in m.kv_b_proj.kernel_desc and "fp8" in m.qkv_a_proj.kernel_desc for m in attn)
    for i, m in enumerate(attn):  # the absorbed W_UK/W_UV come out of the fp8 kv_b_proj exactly
        w = deq_sd[f"model.layers.{i}.self_attn.kv_b_proj.weight"].view(4, 40, 32)
        torch.testing.assert_close(m.w_uk, w[:, :16, :], rtol=0, atol=0)
        torch.testing.assert_close(m.w_uv, w[:, 16:, :].transpose(1, 2), rtol=0, atol=0)
    ref = _with_fp8_group_activations(AutoModelForCausalLM.from_pretrained(deq_dir, dtype=torch.float32))
    out = eng.generate(input_ids=PROMPT, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0,
                       top_logprobs_num=eng.config.vocab_size)
    from transformers import DynamicCache

    cache = DynamicCache(config=ref.config)
    with torch.no_grad():  # prefill: latents decompressed through kv_b_proj (a block-fp8 linear)
        full = torch.log_softmax(ref(torch.tensor([PROMPT]), past_key_values=cache, use_cache=True)
                                 .logits[0].double(), -1)
    ours = dense_prompt_logprobs(out, eng.config.vocab_size)
    for pos in range(len(ours)):
        assert float((ours[pos] - full[pos]).abs().max()) < 1e-3, pos
    # decode: the absorbed W_UK/W_UV are kv_b_proj's dequantized weight (weight-only, as SGLang's
    # w_kc/w_vc): transformers continues from its cache with kv_b_proj's input left unrounded. The
    # absorbed fp32 sums differ in order, so an activation now and then lands on the other side of an
    # fp8 rounding step: measured |dlogprob| 0 for the first decoded tokens, <= 0.021 later; rounding
    # kv_b_proj's input too gives 0.05-0.57, leaving every activation unrounded 0.03-0.63.
    for m in ref.modules():
        if getattr(m, "round_input", False) and m.out_features == 4 * (16 + 24):
            m.round_input = False
    lps = out["meta_info"]["output_token_logprobs"]
    last = full[-1]
    for j, (lp, tok, _) in enumerate(lps):
        assert abs(lp - float(last[tok])) < (1e-3 if j < 2 else 0.03), j
        with torch.no_grad():
            last = torch.log_softmax(ref(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
                                     .logits[0, -1].double(), -1)


def _fp8_groups_float64(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token, per-BLOCK[1]-channel-group e4m3 activation round trip. The scale is an fp32
    number (amax / 448) and x / scale is rounded from fp32, as fp8 GEMM kernels do; the rest is float64."""
    k, g = x.shape[-1], BLOCK[1]
    pad = torch.nn.functional.pad(x.float(), (0, -k % g))
    groups = pad.view(*pad.shape[:-1], -1, g)
    scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0
    q = (groups / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double() * scale.double()
    return q.view(pad.shape)[..., :k].to(x.dtype)


def _with_fp8_group_activations(hf):
    """transformers' model where every block-fp8 linear (decoder nn.Linears, routed experts) sees its
    input rounded as block-fp8 activations are (while the linear's `round_input` is set)."""
    for layer in hf.eval().model.layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.round_input = True
                m.register_forward_pre_hook(
                    lambda mod, args: (_fp8_groups_float64(args[0]),) if mod.round_input else None)
        ex = getattr(layer.mlp, "experts", None)
        if ex is not None:
            def experts(x, ids, weights, ex=ex):  # the routed experts with quantized inputs
                out = torch.zeros_like(x)
                for t, j in ((t, j) for t in range(x.shape[0]) for j in range(ids.shape[1])):
                    g, u = (ex.gate_up_proj[ids[t, j]] @ _fp8_groups_float64(x[t:t + 1])[0]).chunk(2)
                    h = torch.nn.functional.silu(g) * u
                    out[t] += weights[t, j] * (ex.down_proj[ids[t, j]] @ _fp8_groups_float64(h[None])[0])
                return out
            ex.forward = experts
    return hf


# -- loading and configs ----------------------------------------------------------------------------
def test_mtp_layers_are_skipped_but_other_strays_are_errors(models, tmp_path):
    d = tmp_path / "mtp"
    shutil.copytree(models["v2_lite"][0], d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)            # layer L: the MTP module
    save_file(sd, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    Engine(model_path=str(d), max_total_tokens=256)
    sd["model.layers.4.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.4.eh_proj.weight"):
        Engine(model_path=str(d), max_total_tokens=256)


def test_a_missing_expert_or_latent_tensor_is_named(models, tmp_path):
    for drop in ("model.layers.2.mlp.experts.5.up_proj.weight", "model.layers.0.self_attn.kv_a_layernorm.weight",
                 "model.layers.1.mlp.gate.e_score_correction_bias"):
        d = tmp_path / drop.replace(".", "_")
        shutil.copytree(models["v3"][0], d)
        sd = load_file(str(d / "model.safetensors"))
        del sd[drop]
        save_file(sd, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match="missing tensors: " + drop.replace(".weight", "")):
            Engine(model_path=str(d), max_total_tokens=256)


def test_routing_and_layer_choices_follow_the_config(tokenizer_dir):
    from quantrt.models.deepseek import DeepseekV2ForCausalLM, deepseek_routing

    c = _config("v2_lite", 384, num_hidden_layers=5, moe_layer_freq=2, norm_topk_prob=True)
    model = DeepseekV2ForCausalLM(c, 64)
    sparse = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, FusedMoE)]
    assert sparse == [2, 4]                                   # first_k_dense_replace=1, every 2nd after
    r = deepseek_routing(c, v3=False)
    assert (r.scoring, r.renormalize, r.n_group) == ("softmax", True, 1)   # V2 honours norm_topk_prob
    r3 = deepseek_routing(_config("v3", 384), v3=True)
    assert (r3.scoring, r3.renormalize, r3.n_group, r3.topk_group, r3.routed_scaling_factor) == \
        ("sigmoid", True, 4, 2, 2.5)


@pytest.mark.parametrize("over,match", [
    (dict(topk_method="random"), "topk_method 'random' is not supported; options: greedy, group_limited_greedy, "
                                 "noaux_tc"),
    (dict(topk_method="group_limited_greedy", n_group=None), "needs n_group and topk_group"),
    (dict(scoring_func="relu"), "scoring_func 'relu' is not supported; options: softmax, sigmoid"),
    (dict(kv_lora_rank=None), "MLA attention needs positive integers.*kv_lora_rank=None"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim must be even"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported; options: silu"),
    (dict(num_experts_per_tok=None), "needs num_experts_per_tok"),
])
def test_bad_configs_fail_clearly(over, match):
    from quantrt.models.deepseek import DeepseekV2ForCausalLM

    c = _config("v2_lite", 384)
    c.__dict__.update(over)  # past transformers' own field validation (configs can come from elsewhere)
    with pytest.raises(ConfigError, match=match):
        DeepseekV2ForCausalLM(c, 64)
