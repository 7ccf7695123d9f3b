"""Our executor vs transformers on the same tiny random weights, for every architecture."""

from __future__ import annotations

import pytest
import torch

from quantrt.engine.engine import Engine
from tests.helpers_models import ARCHS

PROMPT = list(range(5, 45))


@pytest.fixture(scope="module")
def engines(tiny_models):
    return {a: Engine(model_path=str(tiny_models[a][0]), max_total_tokens=4096, random_seed=0) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logprobs_match_transformers(arch, tiny_models, engines):
    """Every prompt position's log-probabilities (top-5 and the actual next token) equal HF's."""
    hf = tiny_models[arch][1]
    out = engines[arch].generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 1, "temperature": 0},
                                 return_logprob=True, logprob_start_len=0, top_logprobs_num=5)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].double(), -1)  # [L, V]
    got = out["meta_info"]["input_token_logprobs"]
    assert got[0] == (None, PROMPT[0], None)
    ours = torch.tensor([lp for lp, _, _ in got[1:]], dtype=torch.float64)
    theirs = ref[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    for pos, tops in enumerate(out["meta_info"]["input_top_logprobs"][1:]):
        ref_top = ref[pos].topk(5)
        assert [t for _, t, _ in tops] == ref_top.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for v, _, _ in tops], dtype=torch.float64), ref_top.values,
                                   atol=2e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_32_tokens_match_transformers(arch, tiny_models, engines):
    hf = tiny_models[arch][1]
    out = engines[arch].generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 32, "temperature": 0,
                                                                    "ignore_eos": True})
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert out["output_ids"] == ref[0, len(PROMPT):].tolist()
    assert out["meta_info"]["completion_tokens"] == 32
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 32}
