"""Quality of quantization methods on the real model (SmolLM2-135M-Instruct) over botchan.txt.

For each method: perplexity, mean KL(fp32 || method) of next-token distributions, top-1 agreement with
fp32, and output SQNR of every quantized linear on random inputs (min / median).
Windows are non-overlapping, `--ctx` tokens each, starting at token 0; each is one independent context.

    .venv/bin/python bench/quality.py [--windows 16] [--ctx 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._smollm2_export import DEFAULT_EXPORT_DIR  # noqa: E402
from quantrt.engine.engine import Engine  # noqa: E402
from tests.helpers_smollm2 import (  # noqa: E402
    botchan_ids,
    export_hf_checkpoint,
    full_logits,
    kl_rows,
    linear_sqnrs,
    nll_sum,
    ppl,
    windows,
)

METHODS: dict[str, str | None] = {"fp32": None, "fp8 (online W8A8)": "fp8"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16, help="number of windows (default 16: 8192 tokens)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window (context length)")
    ap.add_argument("--export-dir", default=str(DEFAULT_EXPORT_DIR))
    args = ap.parse_args(argv)

    path = export_hf_checkpoint(args.export_dir)
    ref_weights = load_file(str(Path(path) / "model.safetensors"))
    engines = {m: Engine(model_path=path, quantization=q, max_total_tokens=args.ctx + 64, random_seed=0)
               for m, q in METHODS.items()}
    wins = windows(botchan_ids(engines["fp32"].tokenizer), args.windows, args.ctx)
    stats = {m: {"nll": 0.0, "kl": 0.0, "top1": 0.0} for m in METHODS}
    count = 0
    t0 = time.perf_counter()
    for w in wins:
        ref = None
        for m, e in engines.items():
            full = torch.log_softmax(full_logits(e, w), -1)
            stats[m]["nll"] += nll_sum(full, w)
            lp = full[:-1]  # the predictions of tokens 1..L-1
            ref = lp if ref is None else ref
            stats[m]["kl"] += float(kl_rows(ref, lp).sum())
            stats[m]["top1"] += float((ref.argmax(-1) == lp.argmax(-1)).sum())
        count += len(w) - 1
    secs = time.perf_counter() - t0

    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32), botchan.txt: {len(wins)} windows x {args.ctx} tokens "
          f"= {len(wins) * args.ctx} tokens, {count} predictions ({secs:.0f} s)")
    print("| method | perplexity | mean KL vs fp32 (nats) | top-1 agreement | linear SQNR min / median (dB) |")
    print("|---|---|---|---|---|")
    for m, e in engines.items():
        s = stats[m]
        sq = linear_sqnrs(e, ref_weights)
        sq_txt = f"{min(sq.values()):.1f} / {statistics.median(sq.values()):.1f}" if sq else "- (reference)"
        print(f"| {m} | {ppl(s['nll'], count):.3f} | {s['kl'] / count:.5f} | {s['top1'] / count:.4f} | {sq_txt} |")


if __name__ == "__main__":
    main()
