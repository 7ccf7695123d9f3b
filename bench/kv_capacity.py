"""Tokens the KV cache holds per GiB for each --kv-cache-dtype, from the real bytes per token
(fp4 counts its block scales), for a few model shapes; with --model-path, the engine's own figures.

    .venv/bin/python bench/kv_capacity.py [--model-path DIR --mem-fraction-static F]
"""

from __future__ import annotations

import argparse

import torch

from quantrt.engine.kv_quant import resolve_kv_cache_dtype

KV = ("bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1")
SHAPES = {  # layers, kv heads, head_dim
    "SmolLM2-135M": (30, 3, 64),
    "Llama-3.1-8B": (32, 8, 128),
    "Qwen3-30B-A3B": (48, 4, 128),
    "Llama-3.1-70B": (80, 8, 128),
}


class _Cpu:
    name = "cpu"

    @staticmethod
    def fp8_dtype() -> torch.dtype:
        return torch.float8_e4m3fn

    @staticmethod
    def supported_dtypes() -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)


def table() -> None:
    print("| model | " + " | ".join(f"{k} bytes/token | {k} tokens/GiB" for k in KV) + " | fp8 / bf16 | fp4 / bf16 |")
    print("|---" * (2 * len(KV) + 3) + "|")
    for name, shape in SHAPES.items():
        bpt = {k: resolve_kv_cache_dtype(k, torch.bfloat16, _Cpu).bytes_per_token(*shape) for k in KV}
        cells = " | ".join(f"{bpt[k]:,} | {2**30 // bpt[k]:,}" for k in KV)
        print(f"| {name} | {cells} | {bpt['bf16'] / bpt['fp8_e4m3']:.2f}x | {bpt['bf16'] / bpt['fp4_e2m1']:.2f}x |")


def engine_rows(path: str, frac: float) -> None:
    from quantrt.engine.engine import Engine

    print("| kv_cache_dtype | bytes/token | max_total_tokens | pool MiB | vs bf16 |")
    print("|---|---|---|---|---|")
    for k in KV:
        info = Engine(model_path=path, kv_cache_dtype=k, mem_fraction_static=frac,
                      max_running_requests=1_000_000).kv_info()
        print(f"| {k} | {info['bytes_per_token']} | {info['max_total_tokens']} | "
              f"{info['pool_bytes'] / 2**20:.1f} | {info['capacity_vs_bf16']:.2f}x |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path")
    ap.add_argument("--mem-fraction-static", type=float, default=0.01)
    a = ap.parse_args()
    table()
    if a.model_path:
        engine_rows(a.model_path, a.mem_fraction_static)
