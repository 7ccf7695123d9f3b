"""Quality of quantization methods on the real model (SmolLM2-135M-Instruct) over botchan.txt.

For each method: perplexity, mean KL(fp32 || method) of next-token distributions, top-1 agreement with
fp32, and output SQNR of every quantized linear on random inputs (min / median).
Windows are non-overlapping, `--ctx` tokens each, starting at token 0; each is one independent context.

    .venv/bin/python bench/quality.py [--windows 16] [--ctx 512] [--dtype float32|bfloat16]

The fp32 reference always runs in float32; `--dtype` sets the compute dtype of the other rows (with
bfloat16, "none (bfloat16)" is the unquantized bf16 row and 4-bit/8-bit weights run through torch's
packed int4/int8 CPU ops). After the table, each method's float-kept linears and kernels are listed.
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

# name -> Engine keyword arguments selecting the method
METHODS: dict[str, dict[str, str]] = {
    "fp32": {},
    "fp8 (online W8A8)": {"quantization": "fp8"},
    "w8a8_fp8": {"quantization": "w8a8_fp8"},
    "w8a8_int8": {"quantization": "w8a8_int8"},
    "torchao int8wo": {"torchao_config": "int8wo"},
    "torchao int8dq": {"torchao_config": "int8dq"},
    "torchao fp8wo": {"torchao_config": "fp8wo"},
    "torchao fp8dq-per_row": {"torchao_config": "fp8dq-per_row"},
    "torchao fp8dq-per_tensor": {"torchao_config": "fp8dq-per_tensor"},
    "torchao int4wo-64": {"torchao_config": "int4wo-64"},
    "torchao int4wo-32": {"torchao_config": "int4wo-32"},
    "torchao int4wo-128": {"torchao_config": "int4wo-128"},
    "none (bfloat16)": {"dtype": "bfloat16"},
    "yaml int8_w8a8.yaml": {"quantization_config_path": "int8_w8a8"},
    "kv fp8_e4m3": {"kv_cache_dtype": "fp8_e4m3"},
    "kv fp8_e5m2": {"kv_cache_dtype": "fp8_e5m2"},
    "kv fp4_e2m1": {"kv_cache_dtype": "fp4_e2m1"},
}
# name -> auto-round RTN (iters=0) export of the fp32 checkpoint (made once in auto-round's own venv,
# cached under .cache/autoround-smollm2/), loaded by quantrt as a pre-quantized auto-round checkpoint
# Asymmetric 4-bit: auto-round 0.16.1's format="auto_round" crashes on it (its AWQ packer), and its AWQ
# packer refuses K=576 at g128 (a partial last group), so g32/g64 are exported as auto_awq, g128 as auto_gptq.
AUTOROUND: dict[str, dict] = {
    f"auto-round W{b} g{g}{'' if sym else ' asym'}": {
        "bits": b, "group_size": g, "sym": sym,
        "format": "auto_round" if sym else ("auto_awq" if 576 % g == 0 else "auto_gptq")}
    for b, g, sym in ((4, 32, True), (4, 64, True), (4, 128, True), (8, 128, True),
                      (4, 32, False), (4, 64, False), (4, 128, False))
}
AUTOROUND_DIR = Path(__file__).resolve().parents[1] / ".cache" / "autoround-smollm2"


def autoround_checkpoint(name: str, src: str) -> str:
    """The directory holding config.json of auto-round's export for `name`, produced on first use."""
    from tests.producers import autoround_produce

    dst = AUTOROUND_DIR / name.replace(" ", "_")
    if not (dst / ".complete").exists():
        autoround_produce([(Path(src), dst, AUTOROUND[name])], timeout=1800)
        (dst / ".complete").write_text("")
    (cfg,) = [p.parent for p in dst.rglob("config.json")]
    return str(cfg)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16, help="number of windows (default 16: 8192 tokens)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window (context length)")
    ap.add_argument("--export-dir", default=str(DEFAULT_EXPORT_DIR))
    ap.add_argument("--methods", default="", help="comma-separated subset of the method names (fp32 always runs)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype of every row except the fp32 reference")
    args = ap.parse_args(argv)
    chosen = {m: kw for m, kw in {**METHODS, **{a: {} for a in AUTOROUND}}.items()
              if m == "fp32" or not args.methods or m in args.methods.split(",")}

    path = export_hf_checkpoint(args.export_dir)
    ref_weights = load_file(str(Path(path) / "model.safetensors"))
    refs: list[torch.Tensor] = []
    rows = []
    notes = []
    count = 0
    t0 = time.perf_counter()
    for m, kw in chosen.items():  # one engine at a time; fp32 first, its log-probs are the reference
        kw = dict(kw)
        if m != "fp32":
            kw.setdefault("dtype", args.dtype)
        mpath = autoround_checkpoint(m, path) if m in AUTOROUND else path
        e = Engine(model_path=mpath, max_total_tokens=args.ctx + 64, random_seed=0, **kw)
        if m != "fp32":
            notes.append(f"- {m}: {layer_summary(e)}")
        wins = windows(botchan_ids(e.tokenizer), args.windows, args.ctx)
        s = {"nll": 0.0, "kl": 0.0, "top1": 0.0}
        count = 0
        for i, w in enumerate(wins):
            full = torch.log_softmax(full_logits(e, w), -1)
            s["nll"] += nll_sum(full, w)
            lp = full[:-1]  # the predictions of tokens 1..L-1
            if m == "fp32":
                refs.append(lp)
            s["kl"] += float(kl_rows(refs[i], lp).sum())
            s["top1"] += float((refs[i].argmax(-1) == lp.argmax(-1)).sum())
            count += len(w) - 1
        sq = linear_sqnrs(e, ref_weights)
        sq_txt = f"{min(sq.values()):.1f} / {statistics.median(sq.values()):.1f}" if sq else "- (reference)"
        rows.append(f"| {m} | {ppl(s['nll'], count):.3f} | {s['kl'] / count:.5f} | {s['top1'] / count:.4f} "
                    f"| {sq_txt} |")
        del e
    secs = time.perf_counter() - t0

    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32), botchan.txt: {args.windows} windows x {args.ctx} tokens "
          f"= {args.windows * args.ctx} tokens, {count} predictions ({secs:.0f} s)")
    print("| method | perplexity | mean KL vs fp32 (nats) | top-1 agreement | linear SQNR min / median (dB) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nrows other than fp32 run with --dtype {args.dtype}; linears per method:")
    print("\n".join(notes))


def layer_summary(engine) -> str:
    """Quantized vs float-kept QuantLinears (by shard name and K) and the kernels chosen."""
    from collections import Counter

    from quantrt.layers.linear import QuantLinear

    quant, dense, kernels = Counter(), Counter(), Counter()
    for layer in engine.model.modules():
        if not isinstance(layer, QuantLinear):
            continue
        name = "+".join(s for s, _ in layer.shards) + f" (K={layer.in_features})"
        (quant if layer.is_quantized else dense)[name] += 1
        if layer.is_quantized:
            kernels[layer.kernel_desc.split(" (")[0]] += 1
    fmt = lambda c: ", ".join(f"{k} x{v}" for k, v in sorted(c.items())) or "none"  # noqa: E731
    return f"quantized: {fmt(quant)}; float: {fmt(dense)}; kernels: {fmt(kernels)}"

if __name__ == "__main__":
    main()
