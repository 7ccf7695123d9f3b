"""Engine behaviour: batching, prefix reuse, chunked prefill, preemption, sampling, stops, streaming."""

from __future__ import annotations

import random

import pytest
import torch

from quantrt.engine.engine import Engine
from quantrt.errors import ConfigError

GREEDY = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return str(tiny_models["qwen3"][0])


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine(model_path=model_dir, max_total_tokens=4096, page_size=4, random_seed=0)


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(3, 60))] for _ in range(n)]


def test_same_output_alone_or_in_a_mixed_batch(engine):
    prompts = _prompts(8)
    alone = [engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts]
    batched = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [b["output_ids"] for b in batched] == alone


def test_mixed_sampling_modes_in_one_batch_match_each_request_alone(engine):
    """A decode batch whose requests do not all sample greedily takes the per-request path (the batched
    argmax is only for all-plain-greedy steps); every request must still get what it gets alone."""
    prompts = _prompts(4, seed=3)
    params = [GREEDY, {**GREEDY, "temperature": 0.8, "seed": 11}, {**GREEDY, "repetition_penalty": 1.5}, GREEDY]
    lp = [False, False, False, True]
    alone = [engine.generate(input_ids=p, sampling_params=sp, return_logprob=w)
             for p, sp, w in zip(prompts, params, lp)]
    batched = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=lp)
    assert [b["output_ids"] for b in batched] == [a["output_ids"] for a in alone]
    assert batched[1]["output_ids"] != engine.generate(input_ids=prompts[1], sampling_params=GREEDY)["output_ids"]
    got = [t for _, t, _ in batched[3]["meta_info"]["output_token_logprobs"]]
    assert got == batched[3]["output_ids"]
    ref = [v for v, _, _ in alone[3]["meta_info"]["output_token_logprobs"]]
    assert [v for v, _, _ in batched[3]["meta_info"]["output_token_logprobs"]] == pytest.approx(ref, abs=1e-4)


def test_prefix_reuse_gives_identical_results(model_dir):
    eng = Engine(model_path=model_dir, max_total_tokens=4096, page_size=4)
    shared = _prompts(1, seed=7)[0] * 3                     # long common prefix
    first = eng.generate(input_ids=shared + [5, 6], sampling_params=GREEDY)
    assert first["meta_info"]["cached_tokens"] == 0
    again = eng.generate(input_ids=shared + [5, 6], sampling_params=GREEDY)
    assert again["meta_info"]["cached_tokens"] > 0 and again["meta_info"]["cached_tokens"] % 4 == 0
    assert again["output_ids"] == first["output_ids"]
    other = eng.generate(input_ids=shared + [9], sampling_params=GREEDY)
    fresh = Engine(model_path=model_dir, max_total_tokens=4096, page_size=4)
    assert other["meta_info"]["cached_tokens"] > 0
    assert other["output_ids"] == fresh.generate(input_ids=shared + [9], sampling_params=GREEDY)["output_ids"]


def test_chunked_prefill_matches_whole_prefill(model_dir, engine):
    small = Engine(model_path=model_dir, max_total_tokens=4096, page_size=4, chunked_prefill_size=7)
    prompts = _prompts(4, seed=3)
    assert [o["output_ids"] for o in small.generate(input_ids=prompts, sampling_params=GREEDY)] == \
        [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=GREEDY)]


def test_preemption_when_kv_runs_out_still_gives_exact_outputs(model_dir, engine):
    tight = Engine(model_path=model_dir, max_total_tokens=160, page_size=4)
    prompts = _prompts(6, seed=5)
    ref = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=GREEDY)]
    assert [o["output_ids"] for o in tight.generate(input_ids=prompts, sampling_params=GREEDY)] == ref


def test_request_larger_than_the_cache_is_aborted_with_a_reason(model_dir):
    tiny = Engine(model_path=model_dir, max_total_tokens=32, page_size=4)
    out = tiny.generate(input_ids=list(range(3, 100)), sampling_params=GREEDY)
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert "does not fit in the KV cache" in out["meta_info"]["finish_reason"]["message"]


def test_seeded_sampling_is_reproducible_and_varies_with_seed(engine):
    p = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "min_p": 0.01,
         "ignore_eos": True}
    a = engine.generate(input_ids=[5, 6, 7], sampling_params={**p, "seed": 1})["output_ids"]
    b = engine.generate(input_ids=[5, 6, 7], sampling_params={**p, "seed": 1})["output_ids"]
    c = engine.generate(input_ids=[5, 6, 7], sampling_params={**p, "seed": 2})["output_ids"]
    assert a == b and a != c


def test_top_k_1_equals_greedy_and_penalties_change_output(engine):
    g = engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)["output_ids"]
    k1 = engine.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "temperature": 0.7, "top_k": 1})
    assert k1["output_ids"] == g
    rep = engine.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "repetition_penalty": 5.0})
    assert len(set(rep["output_ids"])) >= len(set(g))
    freq = engine.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "frequency_penalty": 2.0,
                                                                 "presence_penalty": 2.0})
    assert freq["output_ids"] != g


def test_sampler_filters_follow_their_definitions():
    from quantrt.engine.request import LogprobOptions, Request
    from quantrt.engine.sampler import _filter
    from quantrt.engine.sampling_params import SamplingParams

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    req = Request("r", [0], SamplingParams(top_p=0.7), LogprobOptions(), None)
    kept = torch.isfinite(_filter(logits.clone(), req))
    assert kept.tolist() == [True, True, False, False]        # 0.5 < 0.7 <= 0.8
    req.params = SamplingParams(min_p=0.5)
    assert torch.isfinite(_filter(logits.clone(), req)).tolist() == [True, True, False, False]
    req.params = SamplingParams(top_k=3)
    assert torch.isfinite(_filter(logits.clone(), req)).tolist() == [True, True, True, False]


def test_stop_token_ids_and_stop_strings(engine):
    g = engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)
    stop_tok = g["output_ids"][3]
    out = engine.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "stop_token_ids": [stop_tok]})
    first = g["output_ids"].index(stop_tok)
    assert out["output_ids"] == g["output_ids"][: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    text = g["text"]
    needle = text[len(text) // 2: len(text) // 2 + 3]
    if needle.strip():
        s = engine.generate(input_ids=[5, 6, 7], sampling_params={**GREEDY, "stop": needle})
        assert s["meta_info"]["finish_reason"] == {"type": "stop", "matched": needle}
        assert s["text"] == text[: text.index(needle)]


def test_eos_stops_unless_ignored(engine):
    eos = 2  # the tiny tokenizer's <|im_end|> / config eos
    out = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 8, "temperature": 0,
                                                                "stop_token_ids": []})
    assert eos not in out["output_ids"][:-1]


def test_streaming_yields_growing_text_and_matches_non_streaming(engine):
    full = engine.generate(prompt="It was a", sampling_params=GREEDY)
    chunks = list(engine.generate(prompt="It was a", sampling_params=GREEDY, stream=True))
    assert len(chunks) == 24
    assert all(b["text"].startswith(a["text"]) for a, b in zip(chunks, chunks[1:]))
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_text_prompts_list_and_output_logprobs(engine):
    outs = engine.generate(prompt=["Hello there", "It was"], sampling_params={"max_new_tokens": 4,
                                                                             "temperature": 0},
                           return_logprob=True, top_logprobs_num=2)
    assert len(outs) == 2
    for o in outs:
        m = o["meta_info"]
        assert len(m["output_token_logprobs"]) == m["completion_tokens"]
        assert m["input_token_logprobs"] == []           # logprob_start_len -1: output only
        for (lp, tok, _), tops in zip(m["output_token_logprobs"], m["output_top_logprobs"]):
            assert tops[0][1] == tok and abs(tops[0][0] - lp) < 1e-6   # greedy picks the top token


def test_max_new_tokens_zero_returns_prompt_logprobs_only(engine):
    o = engine.generate(input_ids=[5, 6, 7, 8], sampling_params={"max_new_tokens": 0}, return_logprob=True,
                        logprob_start_len=1)
    assert o["output_ids"] == [] and len(o["meta_info"]["input_token_logprobs"]) == 3


@pytest.mark.parametrize("params,msg", [
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_k": 0}, "top_k must be -1 (off) or >= 1"),
    ({"min_p": 2}, "min_p must be in [0, 1]"),
    ({"max_new_tokens": -3}, "max_new_tokens must be an integer >= 0"),
    ({"frequency_penalty": 3}, "frequency_penalty must be in [-2, 2]"),
    ({"stop": [""]}, "stop must be a string or a list of non-empty strings"),
    ({"temprature": 1}, "unknown sampling parameter(s) temprature"),
])
def test_bad_sampling_params_are_rejected(engine, params, msg):
    with pytest.raises(ConfigError) as e:
        engine.generate(input_ids=[5, 6], sampling_params=params)
    assert msg in str(e.value)
    assert not engine.scheduler.has_work()


def test_bad_prompts_are_rejected(engine):
    with pytest.raises(ConfigError, match="exactly one of"):
        engine.generate()
    with pytest.raises(ConfigError, match=r"input_ids must be integers in \[0, "):
        engine.generate(input_ids=[5, 10**6])
    with pytest.raises(ConfigError, match="context length is 512"):
        engine.generate(input_ids=[5] * 600)
    with pytest.raises(ConfigError, match="is empty"):
        engine.generate(input_ids=[[]])


def test_streaming_holds_back_a_possible_stop_string_prefix():
    from quantrt.engine.stop import _stop_prefix_len

    assert _stop_prefix_len("hello wor", ["world"]) == 3
    assert _stop_prefix_len("hello", ["world"]) == 0
    assert _stop_prefix_len("abc</", ["</s>", "<|end|>"]) == 2


def test_sampler_survives_degenerate_logits():
    from quantrt.engine.request import LogprobOptions, Request
    from quantrt.engine.sampler import sample
    from quantrt.engine.sampling_params import SamplingParams

    logits = torch.tensor([[float("nan"), 1.0, float("inf"), 0.0]])
    req = Request("r", [0], SamplingParams(temperature=0.5), LogprobOptions(), torch.Generator().manual_seed(0))
    assert sample(logits.clone(), [req])[0] in (0, 1, 2, 3)
