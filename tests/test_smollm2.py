"""The real model (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32) through quantrt vs transformers.

transformers loads the same GGUF (its own dequantizer), so both sides run identical fp32 weights.
The HF model and each engine load once per module (~20-30 s each on 2 cores).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from quantrt.demo_model import default_model_path
from quantrt.engine.engine import Engine
from tests.helpers_smollm2 import (
    botchan_ids,
    export_hf_checkpoint,
    full_logits,
    kl_rows,
    linear_sqnrs,
    nll_sum,
    ppl,
    windows,
)

pytestmark = pytest.mark.slow

# measured on CPU: max |ours - HF| over 59 prompt logprobs 3.5e-5 (5.9e-5 over 511); fp32 both
LOGPROB_ATOL = 5e-4
PPL_WINDOWS, PPL_CTX = 2, 512  # 1024 tokens of botchan.txt, 1022 predictions


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return default_model_path()  # the setup script installs it; a missing model must fail, not skip


@pytest.fixture(scope="module")
def hf(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def engine(gguf_path) -> Engine:
    return Engine(model_path=gguf_path, max_total_tokens=4096, random_seed=0)


@pytest.fixture(scope="module")
def fp8_engine(tmp_path_factory, gguf_path) -> Engine:
    export = export_hf_checkpoint(tmp_path_factory.mktemp("smollm2_hf"), gguf_path)
    return Engine(model_path=export, quantization="fp8", max_total_tokens=4096, random_seed=0)


@pytest.fixture(scope="module")
def text_ids(hf) -> list[int]:
    return botchan_ids(hf[1])


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def test_prompt_logprobs_match_transformers(engine, hf, text_ids):
    """60 tokens of botchan.txt: every prompt logprob within LOGPROB_ATOL of HF, top-5 ids equal."""
    ids = text_ids[:60]
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0},
                          return_logprob=True, logprob_start_len=0, top_logprobs_num=5)
    ref = _hf_logprobs(hf[0], ids)
    got = out["meta_info"]["input_token_logprobs"]
    assert got[0] == (None, ids[0], None)
    ours = torch.tensor([lp for lp, _, _ in got[1:]], dtype=torch.float64)
    theirs = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    diff = float((ours - theirs).abs().max())
    print(f"max |logprob ours - HF| over {len(ids) - 1} positions: {diff:.2e}")
    assert diff <= LOGPROB_ATOL
    for pos, tops in enumerate(out["meta_info"]["input_top_logprobs"][1:]):
        assert [t for _, t, _ in tops] == ref[pos].topk(5).indices.tolist(), pos


def _prompts(tok, text_ids: list[int]) -> list[list[int]]:
    chat = tok.apply_chat_template([{"role": "user", "content": "Write one sentence about the sea."}],
                                   add_generation_prompt=True, tokenize=False)
    return [text_ids[300:340], tok(chat, add_special_tokens=False).input_ids]


def test_greedy_32_tokens_match_transformers(engine, hf, text_ids):
    model, tok = hf
    for ids in _prompts(tok, text_ids):
        t0 = time.perf_counter()
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 32, "temperature": 0,
                                                              "ignore_eos": True})
        with torch.inference_mode():
            # eos_token_id=None: no early stop and no EOS masking, like ignore_eos on our side; an explicit
            # mask, else HF masks the prompt's <|im_end|> (it is also the pad token)
            x = torch.tensor([ids])
            ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None)
        print(f"greedy {len(ids)}-token prompt: {time.perf_counter() - t0:.1f} s")
        assert out["output_ids"] == ref[0, len(ids):].tolist(), tok.decode(ids)


def test_perplexity_matches_transformers(engine, hf, text_ids):
    """Perplexity over the first PPL_WINDOWS non-overlapping windows of PPL_CTX tokens (1024 tokens of
    botchan.txt, 1022 predicted; context length 512), ours from input_token_logprobs, within 0.5%."""
    ours_nll = ref_nll = 0.0
    count = 0
    for w in windows(text_ids, PPL_WINDOWS, PPL_CTX):
        out = engine.generate(input_ids=w, sampling_params={"max_new_tokens": 1, "temperature": 0},
                              return_logprob=True, logprob_start_len=0)
        ours_nll -= sum(lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:])
        ref_nll += nll_sum(_hf_logprobs(hf[0], w), w)
        count += len(w) - 1
    ours, theirs = ppl(ours_nll, count), ppl(ref_nll, count)
    print(f"perplexity over {count} predictions (ctx {PPL_CTX}): ours {ours:.4f}, HF {theirs:.4f}")
    assert abs(ours / theirs - 1) < 0.005
    assert 10 < ours < 100  # a trained model, not noise


def test_chat_template_answers_paris(engine):
    tok = engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    out = engine.generate(prompt, sampling_params={"max_new_tokens": 24, "temperature": 0})
    assert "Paris" in out["text"], out["text"]


def test_fp8_online_every_linear_keeps_25db(fp8_engine, hf):
    sd = hf[0].state_dict()
    sq = linear_sqnrs(fp8_engine, sd)
    assert len(sq) == 4 * fp8_engine.config.num_hidden_layers  # qkv, o, gate_up, down; lm_head is tied
    worst = min(sq, key=sq.get)
    print(f"fp8 linear SQNR: min {sq[worst]:.1f} dB ({worst}), median {sorted(sq.values())[len(sq) // 2]:.1f}")
    assert sq[worst] >= 25.0, worst


def test_fp8_online_kl_to_fp32_is_small(fp8_engine, engine, text_ids):
    """Mean KL(fp32 || fp8) of the next-token distributions over 256 tokens of botchan.txt (one 256-token
    context). Measured: 0.032 nats, top-1 agreement 0.90; per-channel e4m3 weights alone (fp32
    activations) give 0.018, so this is the scheme on a 135M model, not a kernel error. The 0.01 often
    quoted for fp8 W8A8 holds for larger models; see docs/QUALITY.md."""
    ids = text_ids[1000:1256]
    ref = torch.log_softmax(full_logits(engine, ids), -1)
    got = torch.log_softmax(full_logits(fp8_engine, ids), -1)
    kl = float(kl_rows(ref, got).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).double().mean())
    print(f"fp8 online vs fp32 over {len(ids)} positions: mean KL {kl:.5f} nats, top-1 agreement {top1:.3f}")
    assert kl < 0.05
    assert top1 > 0.85
