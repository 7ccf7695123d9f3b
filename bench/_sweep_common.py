"""What the offline H100 tile sweeps (_skinny_sweep.py, _tc_sweep.py, _tc_small_sweep.py, ...) share:
compiling every variant in parallel worker processes first (fills Triton's on-disk cache; the sweep then
compiles as it goes if that fails), timing one cell with its accuracy check, timing the baselines and every
config of one kind at one shape, and the best-config table.

A sweep module defines `_call(kind, cfg, x, wt)` and `_weights(kind, n, k, seed=0)` (and `use_extra()` if it
has second-round configs, `_reference(kind, x, wt)` for `Cells.configs`); a variant is (kind, K, N, M, cfg).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from types import ModuleType

import torch


def _compile(module: str, chunk: list, extra: bool | str) -> int:
    mod = importlib.import_module(module)            # a spawned worker: bench/ is on the parent's sys.path
    if extra:  # True: the module's second-round tiles; a name: that switch function (e.g. "use_round3")
        mod.use_extra() if extra is True else getattr(mod, extra)()
    done = 0
    for kind, k, n, m, cfg in chunk:
        try:
            mod._call(kind, cfg, torch.randn(m, k, device="cuda", dtype=torch.bfloat16), mod._weights(kind, n, k))
            done += 1
        except Exception as e:  # noqa: BLE001
            print(f"# compile {kind} {m} {cfg}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    torch.cuda.synchronize()
    return done


def precompile(module: str, variants: list[tuple], workers: int, extra: bool | str = False) -> None:
    t = time.time()
    try:
        ctx = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            chunks = [variants[i::workers] for i in range(workers)]
            n_ok = sum(ex.map(_compile, [module] * workers, chunks, [extra] * workers))
        print(f"# precompiled {n_ok}/{len(variants)} variants in {time.time() - t:.0f}s", flush=True)
    except Exception as e:  # noqa: BLE001 (the sweep then compiles as it goes)
        print(f"# precompile failed: {type(e).__name__}: {e}", flush=True)


def sweep_args(doc: str, default_json: str, lists: dict[str, list], flags: tuple[str, ...] = ()
               ) -> argparse.Namespace:
    """The sweep scripts' command line: --json, --rep-ms, one --NAME per entry of `lists` (a Python literal that
    replaces that module list's contents in place) and boolean `flags`."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", default=default_json)
    ap.add_argument("--rep-ms", type=int, default=20)
    for name in lists:
        ap.add_argument(f"--{name}", default=None)
    for flag in flags:
        ap.add_argument(f"--{flag}", action="store_true")
    a = ap.parse_args()
    for name, target in lists.items():
        if getattr(a, name) is not None:
            target[:] = ast.literal_eval(getattr(a, name))
    return a


class Cells:
    """The timed cells of one sweep: `timed` checks a variant against `ref` (relative Frobenius error) and
    times it with `time_us` (bench/kernels.py's CUDA-graph replay over weight copies)."""

    def __init__(self, time_us: Callable[[list[Callable]], float]):
        self.time_us = time_us
        self.res: list[dict] = []

    def timed(self, kind: str, k: int, n: int, m: int, cfg: tuple | None, fns: list[Callable],
              x: torch.Tensor, ref: torch.Tensor | None = None) -> None:
        try:
            y = fns[0](x)
            err = float((y.float() - ref).norm() / ref.norm()) if ref is not None else 0.0
            us = self.time_us([lambda f=f: f(x) for f in fns])
        except Exception as e:  # noqa: BLE001
            print(f"# {kind} {k}x{n} m={m} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return
        self.res.append(dict(kind=kind, k=k, n=n, m=m, cfg=list(cfg or []), us=us, err=err))
        print(f"{kind:18s} {k:5d}x{n:5d} m={m:3d} {us:7.2f}us err={err:.1e} {cfg}", flush=True)

    def baselines(self, build: Callable, names: tuple[str, ...], k: int, n: int, ms: list[int]) -> None:
        """Times `build(name, k, n)` (bench/kernels.py: bf16 cuBLAS, ...) at every M, without a check."""
        for name in names:
            fns = build(name, k, n)[0]
            for m in ms:
                self.timed(name, k, n, m, None, fns, torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            del fns

    def configs(self, mod: ModuleType, kind: str, k: int, n: int, ms: list[int],
                cfgs: list[tuple] | dict[int, list[tuple]], copies: int) -> None:
        """Checks each config of `kind` (a list, or a list per M) against `mod._reference(kind, x, wt)` and
        times `mod._call` over `copies` weight copies from `mod._weights`, at every M of `ms`."""
        ws = [mod._weights(kind, n, k, i) for i in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = mod._reference(kind, x, ws[0])
            for cfg in (cfgs[m] if isinstance(cfgs, dict) else cfgs):
                self.timed(kind, k, n, m, cfg, [lambda x, wt=wt, c=cfg: mod._call(kind, c, x, wt) for wt in ws],
                           x, ref)
            del ref
        del ws
        torch.cuda.empty_cache()

    def save(self, out: str) -> None:
        with open(out, "w") as f:
            json.dump(self.res, f, indent=0)

    def report(self) -> None:
        """Best passing config per (kind, K, N, M) and its ratio to bf16 cuBLAS of the same run."""
        bf = {(r["k"], r["n"], r["m"]): r["us"] for r in self.res if r["kind"] == "bf16"}
        best: dict = {}
        for r in self.res:
            key = (r["kind"], r["k"], r["n"], r["m"])
            if r["kind"] != "bf16" and r["err"] < 2e-2 and (key not in best or r["us"] < best[key]["us"]):
                best[key] = r
        print("| kind | K | N | M | us | x bf16 | cfg |")
        for key in sorted(best):
            r = best[key]
            ratio = bf.get(key[1:], float("nan")) / r["us"]
            print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {r['us']:.2f} | {ratio:.2f} | {tuple(r['cfg'])} |")
        bad = [(r["kind"], r["k"], r["n"], r["m"], r["cfg"], r["err"]) for r in self.res if r["err"] >= 2e-2]
        print(f"# {len(bad)} variants failed the 2e-2 check: {bad[:8]}")
