"""A generation request and its progress through the scheduler."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from quantrt.engine.sampling_params import SamplingParams


@dataclass
class LogprobOptions:
    enabled: bool = False
    start_len: int = -1          # input logprobs from this prompt position (-1: none, SGLang's default)
    top_n: int = 0


@dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    logprob: LogprobOptions
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0          # tokens whose K/V are in the cache
    cached_tokens: int = 0         # prompt tokens served from the prefix cache
    finish_reason: dict | None = None
    stop_trimmed: bool = False     # text already cut at a stop string
    text: str = ""
    created: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    # logprobs, SGLang's shape: (logprob, token_id, None)
    input_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """len(all_ids) without building the list (the decode loop asks every step)."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        """all_ids[i] (0 <= i < num_tokens) without building the list."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @functools.cached_property
    def plain_greedy(self) -> bool:
        """Argmax sampling with no penalties and no logprobs: its token can come from one batched argmax.
        Computed once (params and logprob options do not change after the request is made)."""
        p = self.params
        return (p.greedy and p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty
                and not self.logprob.enabled)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def meta_info(self) -> dict:
        m = {
            "id": self.rid,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "e2e_latency": time.perf_counter() - self.created,
        }
        if self.logprob.enabled:
            m["input_token_logprobs"] = self.input_logprobs
            m["output_token_logprobs"] = self.output_logprobs
            if self.logprob.top_n > 0:
                m["input_top_logprobs"] = self.input_top_logprobs
                m["output_top_logprobs"] = self.output_top_logprobs
        return m
