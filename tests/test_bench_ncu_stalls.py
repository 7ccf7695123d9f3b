"""bench/_ncu_stalls.stall_table: reading Nsight Compute's source-page CSV (CPU only, a synthetic CSV in ncu's
column naming): instructions ranked by warp-state samples, their top stall reasons from the all-samples columns
(not the "(Not Issued)" copies), and clear errors for a CSV without the source page or the sampling section."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _ncu_stalls  # noqa: E402

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
          '"stall_barrier","stall_long_sb","stall_selected","stall_barrier (Not Issued)","stall_long_sb (Not Issued)"')


def _csv(rows: list[tuple]) -> str:
    lines = ['==PROF== Connected to process 1', '"Kernel Name","_ring_w4_kernel"', HEADER]
    lines += [",".join(f'"{v}"' for v in r) for r in rows]
    return "\n".join(lines) + "\n"


def test_instructions_ranked_by_samples_with_their_reasons():
    text = _csv([("0x10", "LDS R1, [R2]", "3", "1", "0", "0", "3", "0", "0"),
                 ("0x20", "HGMMA.64x8x16.F32.BF16 R24, R32", "1,200", "900", "1,150", "50", "0", "900", "40"),
                 ("0x30", "@!P1 BRA 0x7f00", "400", "380", "0", "390", "10", "0", "380"),
                 ("short", "row")])
    total, rows = _ncu_stalls.stall_table(text, top=2)
    assert total == 1603
    assert [(n, s) for n, s, _ in rows] == [(1200, "HGMMA.64x8x16.F32.BF16 R24, R32"), (400, "@!P1 BRA 0x7f00")]
    assert rows[0][2] == [(1150, "stall_barrier"), (50, "stall_long_sb")]      # "(Not Issued)" columns left out
    assert rows[1][2] == [(390, "stall_long_sb"), (10, "stall_selected")]


def test_csv_without_the_source_page_or_samples_is_named():
    with pytest.raises(ValueError, match="no source-page header"):
        _ncu_stalls.stall_table('"Kernel Name","Duration"\n"k","9"\n')
    with pytest.raises(ValueError, match="Warp Stall Sampling"):
        _ncu_stalls.stall_table('"Address","Source","# Samples"\n"0x1","NOP","3"\n')
