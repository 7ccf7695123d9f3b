"""Helpers for the real-model checks (SmolLM2-135M-Instruct GGUF): export, full logits, metrics.

Shared by tests/test_smollm2.py and bench/quality.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch

from bench._smollm2_export import export_smollm2
from quantrt.engine.model_runner import Work
from quantrt.layers.linear import QuantLinear
from tests.helpers_models import DATA


def export_hf_checkpoint(dst: Path | str, gguf_path: str | None = None) -> str:
    """SmolLM2 as an fp32 HF safetensors dir (LlamaForCausalLM, tokenizer, tied lm_head omitted)."""
    return export_smollm2(gguf_path, Path(dst))


def botchan_ids(tokenizer) -> list[int]:
    """botchan.txt tokenized with the model's own tokenizer (no BOS: SmolLM2 adds none)."""
    return tokenizer(DATA.read_text(encoding="utf-8"), add_special_tokens=False).input_ids


def windows(ids: list[int], n: int, ctx: int) -> list[list[int]]:
    """The first `n` non-overlapping windows of `ctx` tokens."""
    out = [ids[i * ctx:(i + 1) * ctx] for i in range(n)]
    if len(out[-1]) < ctx:
        raise ValueError(f"{len(ids)} tokens hold fewer than {n} windows of {ctx}")
    return out


@torch.inference_mode()
def full_logits(engine, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] fp32 logits of every position (on the CPU), one prefill through the engine's own runner."""
    alloc = engine.allocator
    pages = alloc.alloc(-(-len(ids) // alloc.page_size))
    if pages is None:
        raise RuntimeError("KV cache too small for the window")
    try:
        req = SimpleNamespace(pages=pages, all_ids=list(ids))
        return engine.scheduler.runner.run([Work(req, 0, len(ids), list(range(len(ids))))])[0].float().cpu()
    finally:
        alloc.release(pages, list(ids), 0)  # num_computed=0: nothing enters the prefix cache


def nll_sum(logprobs: torch.Tensor, ids: list[int]) -> float:
    """Sum of -log p(next token) over a window's log-probabilities [L, V] (L-1 predictions)."""
    tgt = torch.tensor(ids[1:])
    return float(-logprobs[:-1].double().gather(1, tgt[:, None]).sum())


def kl_rows(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per row, in nats."""
    ref, got = ref_logprobs.double(), logprobs.double()
    return (ref.exp() * (ref - got)).sum(-1)


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


def linear_sqnrs(engine, ref_weights: dict[str, torch.Tensor], rows: int = 16, seed: int = 0) -> dict[str, float]:
    """Output SQNR (dB) of every quantized QuantLinear on random x vs x @ W_fp32^T; key = first shard."""
    gen = torch.Generator().manual_seed(seed)
    dev = engine.platform.device()
    out = {}
    for layer in engine.model.modules():
        if not isinstance(layer, QuantLinear) or not layer.is_quantized:
            continue
        w = torch.cat([ref_weights[f"{p}.weight"] for p in layer.shard_prefixes()])
        x = torch.randn(rows, layer.in_features, generator=gen)
        with torch.inference_mode():
            out[layer.shard_prefixes()[0]] = sqnr_db(x.double() @ w.double().T, layer(x.to(dev)).cpu())
    return out


def ppl(nll: float, count: int) -> float:
    return math.exp(nll / count)
