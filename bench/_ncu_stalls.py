"""Where the W4A16 ring's warps wait, per SASS instruction: Nsight Compute's warp-state samples of one launch
(H100, `ncu --page source`), the most-sampled instructions with their top stall reasons.

    cd bench && python _ncu_stalls.py --ring 4096 28672 [--top 40]     # profile the ring at M = 1 (model tile)
    python _ncu_stalls.py --csv saved.csv                               # only read a saved source-page CSV

The profiled process runs the ring 30 times on random compact weights (fp16 scales, symmetric) and ncu takes the
26th launch, with `--clock-control none` (the clocks the decode runs at). Isolated launches: no PDL overlap, so
read the stalls of the main loop, not its ramp.
"""

from __future__ import annotations

import argparse
import csv
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ring", nargs=2, type=int, metavar=("K", "N"), help="profile ring_wna16 at M = 1 over [K, N]")
    ap.add_argument("--csv", help="read a saved `ncu --page source --csv` output instead of profiling")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _run_ring(*a.ring)
        return
    if a.csv:
        text = open(a.csv).read()
    elif a.ring:
        with tempfile.TemporaryDirectory() as d:
            cmd = ["ncu", "--clock-control", "none", "-k", "regex:_ring_w4_kernel", "--launch-skip", "25",
                   "--launch-count", "1", "--section", "WarpStateStats", "--section", "SourceCounters", "--page",
                   "source", "--csv", "--print-source", "sass", sys.executable, os.path.abspath(__file__), "--child",
                   "--ring", *map(str, a.ring)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=d)
            if out.returncode:
                raise SystemExit(f"ncu failed ({out.returncode}): {out.stderr[-2000:]}")
            text = out.stdout
    else:
        ap.error("give --ring K N (profile) or --csv FILE (read)")
    print_table(*stall_table(text, a.top))


if __name__ == "__main__":
    main()
