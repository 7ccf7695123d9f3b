"""What each 8-bit scheme costs SmolLM2, measured with no quantrt code: transformers + float64 fake quant.

The independent cross-check behind docs/QUALITY.md's W8A8 and fp8-KV rows: if quantrt's KL for a
scheme equals the KL of the scheme's plain definition applied inside transformers, the cost is the
scheme's, not a bug of ours (tests/test_scheme_vs_fake_quant.py checks the equality on tiny models
to ~1e-6 in log-probability). Also: which projections' activation quantization costs what, and what
finer granularities (per-token-group activations, per-token-head KV scales) would buy.

    .venv/bin/python bench/fake_quant_reference.py [--windows 4] [--ctx 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._smollm2_export import DEFAULT_EXPORT_DIR  # noqa: E402
from tests.helpers_fake_quant import fake_quant_kv, fake_quant_linears  # noqa: E402
from tests.helpers_smollm2 import botchan_ids, export_hf_checkpoint, kl_rows, windows  # noqa: E402

I8, E4, E5 = torch.int8, torch.float8_e4m3fn, torch.float8_e5m2
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--groups", default="linears,a8,kv", help="comma list of: linears, a8, kv")
    a = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = export_hf_checkpoint(DEFAULT_EXPORT_DIR)
    tok = AutoTokenizer.from_pretrained(ckpt)
    wins = windows(botchan_ids(tok), a.windows, a.ctx)

    def model():
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    def logprobs(m) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([torch.log_softmax(m(torch.tensor([w])).logits[0].double(), -1) for w in wins])

    ref = logprobs(model())
    rows: list[tuple[str, str, float, float]] = []

    def row(group: str, name: str, lp: torch.Tensor) -> None:
        kl = float(kl_rows(ref, lp).mean())
        top1 = float((lp.argmax(-1) == ref.argmax(-1)).double().mean())
        rows.append((group, name, kl, top1))
        print(f"  {group:<10} {name:<52} KL {kl:.5f}  top-1 {top1:.4f}", flush=True)

    groups = set(a.groups.split(","))
    t0 = time.time()
    for label, wd, ad, grp in [("int8 weight-only, per channel", I8, None, None),
                               ("int8 W8A8, per-token activations", I8, I8, None),
                               ("fp8 e4m3 weight-only, per channel", E4, None, None),
                               ("fp8 e4m3 W8A8, per-token activations", E4, E4, None),
                               ("int8 W8A8, per-token-group-32 activations", I8, I8, 32),
                               ("fp8 e4m3 W8A8, per-token-group-32 activations", E4, E4, 32)]:
        if "linears" not in groups:
            break
        m = model()
        fake_quant_linears(m, wd, ad, grp)
        row("linears", label, logprobs(m))
    for p in PROJ if "a8" in groups else ():
        m = model()
        fake_quant_linears(m, None, I8, only=lambda n, p=p: n.endswith(p))
        row("A8 only", f"int8 per-token activations into {p} only", logprobs(m))
    for dt, dn in ((E4, "fp8_e4m3"), (E5, "fp8_e5m2")) if "kv" in groups else ():
        for scale in (1.0, 0.25, 4.0):
            m = model()
            with fake_quant_kv(m, dt, scale):
                row("KV cache", f"{dn}, per-tensor scale {scale}", logprobs(m))
        m = model()
        with fake_quant_kv(m, dt, per_token_head=True):
            row("KV cache", f"{dn}, dynamic per-token-head scale (not a cache format)", logprobs(m))

    print(f"\nSmolLM2-135M fp32 export, botchan.txt, {a.windows} windows x {a.ctx} tokens "
          f"({time.time() - t0:.0f} s); KL(fp32 || scheme) in nats, transformers + float64 fake quant\n")
    print("| group | scheme | mean KL vs fp32 | top-1 agreement |\n|---|---|---|---|")
    for g, n, kl, top1 in rows:
        print(f"| {g} | {n} | {kl:.5f} | {top1:.4f} |")


if __name__ == "__main__":
    main()
