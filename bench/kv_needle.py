"""Pass-key retrieval (needle in a haystack) on SmolLM2 per KV-cache dtype, up to the model's full context.

A pass key sentence is hidden at a given depth of botchan.txt and the model is asked for it at the end;
greedy decoding, 8 new tokens. SmolLM2-135M-Instruct's trained context is 8192 positions.

    .venv/bin/python bench/kv_needle.py [--ctx 2048,4096,8000] [--depths 0.25,0.75]
        [--kv bf16,fp8_e4m3,fp8_e5m2,fp4_e2m1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantrt.demo_model import default_model_path  # noqa: E402
from quantrt.engine.engine import Engine  # noqa: E402
from tests.helpers_smollm2 import botchan_ids  # noqa: E402

KEY = "73914"
NEEDLE = f" The secret pass key is {KEY}. Remember it. The secret pass key is {KEY}. "
QUESTION = " What is the secret pass key? The secret pass key is"


def prompt(tok, hay: list[int], ctx: int, depth: float) -> list[int]:
    """`ctx` tokens in all: haystack with the needle at `depth` (fraction of the haystack), then the question."""
    needle, question = tok.encode(NEEDLE), tok.encode(QUESTION)
    n = ctx - len(needle) - len(question)
    while len(hay) < n:
        hay = hay + hay
    cut = int(n * depth)
    return hay[:cut] + needle + hay[cut:n] + question


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", default="2048,4096,8000")
    ap.add_argument("--depths", default="0.25,0.75")
    ap.add_argument("--kv", default="bf16,fp8_e4m3,fp8_e5m2,fp4_e2m1")
    a = ap.parse_args(argv)
    ctxs = [int(c) for c in a.ctx.split(",")]
    depths = [float(d) for d in a.depths.split(",")]
    rows = []
    for kv in a.kv.split(","):
        eng = Engine(model_path=default_model_path(), kv_cache_dtype=kv, max_total_tokens=max(ctxs) + 64,
                     random_seed=0)
        hay = botchan_ids(eng.tokenizer)
        for ctx in ctxs:
            for depth in depths:
                t0 = time.time()
                ids = prompt(eng.tokenizer, hay, ctx, depth)
                ans = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 8, "temperature": 0})["text"]
                ok = KEY in ans.replace(" ", "")
                rows.append((kv, len(ids), depth, ok, ans))
                print(f"{kv:>9} ctx {len(ids):5d} depth {depth:.2f}: {'found' if ok else 'MISSED'} "
                      f"{ans!r} ({time.time() - t0:.0f} s)", flush=True)
        eng.shutdown()
    print("\n| KV cache | context | depth | retrieved | answer |\n|---|---|---|---|---|")
    for kv, n, depth, ok, ans in rows:
        print(f"| {kv} | {n} | {depth:.2f} | {'yes' if ok else 'no'} | `{ans.strip()}` |")


if __name__ == "__main__":
    main()
