"""bench/_cuda_timeline.split_rows: each split-K launch's last split (the one that gathers the partials) against
the other splits, from the per-program records of a traced step.

CPU only: synthetic records (entry, wait met, loop end, exit in ns, programs in launch order) for a step of two
layer cycles; the numbers are known by construction.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _timeline(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    before = os.environ.get("QUANTRT_CUDA_TRACE")
    mod = importlib.import_module("_cuda_timeline")
    assert os.environ.get("QUANTRT_CUDA_TRACE") == before    # tracing is turned on by main() only
    return mod


def _ring(tiles: int, split: int, t0: int, last_loop_end: int, others_loop_end: int, last_exit: int) -> dict:
    """Programs p = k * tiles + n; the last split (k = split - 1) ends its loop at last_loop_end and exits at
    last_exit, the others end their loops at others_loop_end - n and exit 100 ns later."""
    rows = []
    for p in range(tiles * split):
        n, k = p % tiles, p // tiles
        if k == split - 1:
            rows.append([t0, t0 + 500, last_loop_end, last_exit])
        else:
            rows.append([t0, t0 + 500, others_loop_end - n, others_loop_end - n + 100])
    return {"kind": "ring", "meta": {"k": 4096, "n": 4096, "tiles": tiles, "split": split},
            "t": torch.tensor(rows, dtype=torch.int64), "t0": t0}


def _attn(t0: int) -> dict:
    return {"kind": "attn", "meta": {"b": 1, "hkv": 8, "s": 1}, "t": torch.tensor([[t0, t0, t0, t0 + 100]]), "t0": t0}


def test_last_split_against_the_others(monkeypatch):
    T = _timeline(monkeypatch)
    steps = [_attn(0), _ring(2, 3, 1000, 5000, 4000, 6200), _attn(7000), _ring(2, 3, 8000, 11000, 12000, 13500),
             _attn(14000)]
    rows = T.split_rows(steps, layers=32)
    assert list(rows) == [(0, "ring 4096x4096")]
    first, second = rows[0, "ring 4096x4096"]
    # layer 1: the last split ends its loop 1000 ns after the others' latest (4000) and exits 1200 ns later
    assert first["last_loop_vs_others"] == 1000 and first["tail"] == 1200
    assert first["last_epilogue"] == 1200 and first["other_epilogue"] == 100
    assert first["last_loop"] == 5000 - 1500 and first["other_loop"] == (4000 - 1500 + 3999 - 1500) / 2
    # layer 2: the last split waits for the others (ends its loop 1000 ns before them)
    assert second["last_loop_vs_others"] == -1000 and second["tail"] == 13500 - 12000
    assert second["last_epilogue"] == 2500


def test_launches_without_split_are_left_out(monkeypatch):
    T = _timeline(monkeypatch)
    one = _ring(4, 1, 1000, 3000, 3000, 3100)
    one["meta"]["split"] = 1
    assert T.split_rows([_attn(0), one, _attn(4000)], layers=32) == {}
