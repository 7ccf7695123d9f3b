"""Timeline of one graph-replayed batch-1 decode step from per-program timestamps (QUANTRT_CUDA_TRACE=1,
`platforms/cuda/kernels/trace.py`): for each traced kernel of a layer (W4A16 rings, `gemv_w8`, the bf16 GEMV, add +
RMSNorm, act * up and the decode attention), when its first program's grid dependency was met after the previous
kernel's last program ended, how long it streamed, and its tail.

    cd bench && python _cuda_timeline.py [--layers 32] \
        [--configs "quantrt int4 (gptq g128),,quantrt int4 (gptq g128) [K=V]"]    (configs separated by ",,")
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

os.environ["QUANTRT_CUDA_TRACE"] = "1"


def _name(o: dict) -> str:
    m = o["meta"]
    if "k" in m and "n" in m:
        return f"{o['kind']} {m['k']}x{m['n']}" + (f" pro {m['pro']}" if m.get("pro") else "")
    return o["kind"]


def _grid(o: dict) -> str:
    m = o["meta"]
    return f"{m['tiles']}x{m['split']}" if "tiles" in m else f"{m['b']}x{m['hkv']}" if "hkv" in m else "-"


def per_layer(launches: list[dict], layers: int) -> None:
    """Means over the step's layer cycles (the launches after one decode attention up to and including the next:
    every cycle has the same kernels), each kernel timed against the end of the kernel before it."""
    att = [i for i, o in enumerate(launches) if o["kind"] == "attn"][-layers:]
    cycles = [launches[a + 1:b + 1] for a, b in zip(att, att[1:])]
    if not cycles or len({tuple(o["kind"] for o in c) for c in cycles}) != 1:
        print(f"  no repeating layer pattern in the last step's {len(launches)} traced launches", flush=True)
        return
    print(f"  {len(cycles)} layer cycles of {len(cycles[0])} traced launches: {[_name(o) for o in cycles[0]]}")
    rows: dict[int, list[dict]] = {}
    for a, cyc in zip(att, cycles):
        prev_end = launches[a]["t"][:, 3].max().double()
        for pos, o in enumerate(cyc):
            t = o["t"].double()
            e0, w0, w1 = t[:, 0].min(), t[:, 1].min(), t[:, 1].max()
            l1, x1, xmed = t[:, 2].max(), t[:, 3].max(), t[:, 3].median()
            rows.setdefault(pos, []).append({
                "entry_before_prev_end": float(prev_end - e0), "wait_after_prev_end": float(w0 - prev_end),
                "wait_spread": float(w1 - w0), "loop": float(l1 - w0), "tail": float(x1 - l1),
                "median_end": float(xmed - w0), "exposed": float(x1 - prev_end)})
            prev_end = torch.maximum(prev_end, x1)
    keys = ["entry_before_prev_end", "wait_after_prev_end", "wait_spread", "loop", "tail", "median_end", "exposed"]
    print("| # | kernel | grid | entered before prev end | wait after prev end | wait spread | loop | tail | "
          "median end | exposed (us) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for pos, lst in sorted(rows.items()):   # the mean over layers (the timer ticks in 256 ns)
        vals = " | ".join(f"{statistics.fmean(r[k] for r in lst) / 1e3:.2f}" for k in keys)
        print(f"| {pos} | {_name(cycles[0][pos])} | {_grid(cycles[0][pos])} | {vals} |")
    total = sum(statistics.fmean(r["exposed"] for r in lst) for lst in rows.values()) / 1e3
    print(f"  a layer: {total:.2f} us (the sum of the exposed times)", flush=True)


def main() -> None:
    import _cuda_decode as cd  # bench/ is sys.path[0]

    from quantrt.platforms.cuda.kernels import trace

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", default="quantrt int4 (gptq g128)", help="configs separated by ',,'")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--checkpoint", default="/tmp/llama8b-random")
    p.add_argument("--new", type=int, default=24)
    a = p.parse_args()
    args = argparse.Namespace(batches=[1], new=a.new, short=8, repeats=1, graphs="on", layers=a.layers)
    bw = cd.copy_bandwidth()
    base = cd.write_checkpoint(Path(a.checkpoint), a.layers)
    for name in a.configs.split(",,"):
        kw = cd.config_kw(name.strip())
        cd.bench_quantrt(cd.config_checkpoint(kw, base, a.checkpoint, a.layers), name, kw, args, bw, [])   # launch ids stay unique across engines: records of an
                                                         # earlier engine keep their own launches
        torch.cuda.synchronize()
        per_layer(trace.timeline(), a.layers)


if __name__ == "__main__":
    main()
