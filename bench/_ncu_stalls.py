"""Where the W4A16 ring's (or the decode attention's) warps wait, per SASS instruction: Nsight Compute's warp-state
samples of one launch (H100, `ncu --page source`), the most-sampled instructions with their top stall reasons.

    cd bench && python _ncu_stalls.py --ring 4096 28672 [--top 40]     # profile the ring at M = 1 (model tile)
    python _ncu_stalls.py --attn 2000 [--times-only]                    # the decode attention over 2000 keys
    python _ncu_stalls.py --csv saved.csv                               # only read a saved source-page CSV

The profiled process runs the kernel 30 times on random inputs and ncu takes the 26th launch, with
`--clock-control none` (the clocks the decode runs at). Ring: random compact weights (fp16 scales, symmetric).
Attention: Llama-3.1-8B heads (32 q, 8 KV, 128 wide) at batch 1 over bf16 pages, the split the model picks; the
parent first prints launch times (`kernels.time_us`, over copies of the keys and values 4x the L2) over slot
layouts, splits and warps against the keys' and values' bytes (TB/s, and % of a device copy measured in the same
run), and ncu profiles the model's launch over contiguous slots.
Isolated launches: no PDL overlap, so read the stalls of the main loop, not its ramp.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import os
import subprocess
import sys
import tempfile


def _num(v: str) -> float:
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return 0.0


def stall_table(text: str, top: int = 40) -> tuple[float, list[tuple[float, str, list[tuple[float, str]]]]]:
    """A source-page CSV -> (all samples, [(samples, SASS, [(samples, stall reason) top 3])] most-sampled first).
    Stall reasons are the `stall_*` columns of all samples (not the "(Not Issued)" copies)."""
    rows = list(csv.reader(io.StringIO(text)))
    head = next((i for i, r in enumerate(rows) if "Source" in [c.strip() for c in r]), None)
    if head is None:
        raise ValueError("no source-page header (a 'Source' column) in the CSV: was ncu run with --page source --csv?")
    hdr = rows[head]
    col = {h: i for i, h in enumerate(hdr)}
    samples = next((i for h, i in col.items() if h.startswith("Warp Stall Sampling (All")), None)
    if samples is None:
        raise ValueError("the CSV has no 'Warp Stall Sampling (All Samples)' column (ncu --section SourceCounters)")
    reasons = [(i, h) for h, i in col.items() if h.startswith("stall_") and "(Not Issued)" not in h]
    data = [r for r in rows[head + 1:] if len(r) == len(hdr)]
    total = sum(_num(r[samples]) for r in data)
    out = []
    for r in sorted(data, key=lambda r: -_num(r[samples]))[:top]:
        why = sorted(((_num(r[i]), h) for i, h in reasons if _num(r[i]) > 0), reverse=True)[:3]
        out.append((_num(r[samples]), r[col["Source"]].strip(), why))
    return total, out


def print_table(total: float, rows: list) -> None:
    print(f"{total:.0f} samples\n\n| samples | share | SASS | top stall reasons |\n|---|---|---|---|")
    for n, sass, why in rows:
        reasons = ", ".join(f"{h.removeprefix('stall_')} {v:.0f}" for v, h in why)
        print(f"| {n:.0f} | {100 * n / max(total, 1):.1f}% | `{sass[:70]}` | {reasons} |")


def _run_ring(k: int, n: int) -> None:
    import torch

    from quantrt.platforms.cuda.kernels.ring_wna16 import ring_wna16

    g = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randint(-2**31, 2**31 - 1, (k // 8, n), device="cuda", dtype=torch.int32, generator=g)
    scale = (torch.rand(k // 128, n, device="cuda", generator=g) * 0.01).half()
    x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
    for _ in range(30):
        ring_wna16(x, packed, scale, None, 128)
    torch.cuda.synchronize()


def _run_attn(keys: int, sweep: bool = True) -> None:
    """Run the attention 30 times (the profiled launches); with `sweep` first a table of launch times (`kernels.time_us`:
    one CUDA graph over enough copies of the keys and values that the working set is 4x the L2) over slot layouts,
    key splits and warps against the bytes of the keys and values."""
    import torch

    from quantrt.platforms.cuda.kernels.paged_attention_triton import key_chunks, paged_decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    hkv, h, d, width = 8, 32, 128, 1 << max(0, (keys - 1).bit_length())   # the slot table's graph bucket
    k = torch.randn(width + 64, hkv, d, device="cuda", generator=g).bfloat16()
    v = torch.randn_like(k)
    runs = torch.arange(width, device="cuda").view(1, width)
    scattered = torch.randperm(width + 64, device="cuda", generator=g)[:width].view(1, width)
    lens = torch.tensor([keys], device="cuda", dtype=torch.int32)
    q = torch.randn(1, h, d, device="cuda", generator=g).bfloat16()
    model_splits, _ = key_chunks(1, hkv, width, 64)

    def launch(kv, slots, splits=0, warps=0):
        return paged_decode_attention(q, *kv, slots, lens, d ** -0.5, 0, splits=splits, num_warps=warps)

    if sweep:
        from _cuda_decode import copy_bandwidth
        from kernels import copies_for, time_us

        pools = [(k, v)] + [(k.clone(), v.clone()) for _ in range(copies_for(2 * k.numel() * k.element_size()) - 1)]
        mb, copy = 2 * keys * hkv * d * 2 / 1e6, copy_bandwidth() / 1e12
        print(f"attention over {keys} keys, batch 1 ({mb:.1f} MB of keys and values, {len(pools)} copies; the model's "
              f"split: {model_splits}; copy {copy:.2f} TB/s)\n\n| slots | splits | warps | us a launch (decode + "
              "combine) | TB/s | % of copy |\n|---|---|---|---|---|---|")
        for name, slots in (("contiguous", runs), ("scattered", scattered)):
            for splits in (model_splits // 2, model_splits, model_splits * 2):
                for warps in (4, 8):
                    us = time_us([functools.partial(launch, kv, slots, splits, warps) for kv in pools])
                    print(f"| {name} | {splits} | {warps} | {us:.2f} | {mb / us:.2f} | {100 * mb / us / copy:.0f}% |",
                          flush=True)
        print()
    for _ in range(30):
        launch((k, v), runs)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ring", nargs=2, type=int, metavar=("K", "N"), help="profile ring_wna16 at M = 1 over [K, N]")
    ap.add_argument("--attn", type=int, metavar="KEYS", help="profile the decode attention over KEYS keys")
    ap.add_argument("--csv", help="read a saved `ncu --page source --csv` output instead of profiling")
    ap.add_argument("--times-only", action="store_true", help="--attn: only the launch-time table, no ncu")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _run_ring(*a.ring) if a.ring else _run_attn(a.attn, sweep=False)
        return
    if a.csv:
        text = open(a.csv).read()
    elif a.ring or a.attn:
        if a.attn:
            _run_attn(a.attn)
            if a.times_only:
                return
        kernel, what = ("_ring_w4_kernel", ["--ring", *map(str, a.ring)]) if a.ring else \
            ("_decode_kernel", ["--attn", str(a.attn)])
        with tempfile.TemporaryDirectory() as d:
            cmd = ["ncu", "--clock-control", "none", "-k", f"regex:{kernel}", "--launch-skip", "25",
                   "--launch-count", "1", "--section", "WarpStateStats", "--section", "SourceCounters", "--page",
                   "source", "--csv", "--print-source", "sass", sys.executable, os.path.abspath(__file__), "--child",
                   *what]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=d)
            if out.returncode:
                raise SystemExit(f"ncu failed ({out.returncode}): {out.stderr[-2000:]}")
            text = out.stdout
    else:
        ap.error("give --ring K N or --attn KEYS (profile) or --csv FILE (read)")
    print_table(*stall_table(text, a.top))


if __name__ == "__main__":
    main()
