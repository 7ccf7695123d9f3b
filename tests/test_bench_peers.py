"""bench/kernels.py's peers (bench/_peers.py: gemlite, torchao) degrade cleanly without their packages or a GPU.

CPU only and fast: a missing package and a missing CUDA device each produce the printed skip reason (and a
`skipped` row in the table), never a crash; the correctness guard that keeps a wrong peer out of the timing
is checked against a float64 computation.
"""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _peers  # noqa: E402
import kernels  # noqa: E402

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU degradation")


@pytest.fixture
def gemlite_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemlite", None)  # `import gemlite` fails; find_spec() says None


@pytest.fixture
def torchao_present(monkeypatch):
    fake = types.ModuleType("torchao")
    fake.__spec__ = importlib.machinery.ModuleSpec("torchao", None)
    monkeypatch.setitem(sys.modules, "torchao", fake)


@no_gpu
def test_missing_package_and_gpu_are_both_named(gemlite_missing):
    with pytest.raises(_peers.PeerSkipped) as e:
        _peers.build_peer("gemlite_w4_bf16", 4096, 4096, lambda nbytes: 1)
    msg = str(e.value)
    assert "gemlite is not installed" in msg
    assert ".devcarry_peers/gemlite-0.6.0.post2-py3-none-any.whl" in msg
    assert "no CUDA device" in msg


@no_gpu
def test_installed_package_without_gpu_names_only_the_gpu(torchao_present):
    for name in ("ao_int4", "ao_fp8_row", "ao_int8"):
        with pytest.raises(_peers.PeerSkipped, match=r"^no CUDA device \(torch.cuda.is_available\(\) is False\)$"):
            _peers.build_peer(name, 4096, 4096, lambda nbytes: 1)


def test_unknown_peer_lists_the_peers():
    with pytest.raises(ValueError, match="unknown peer 'marlin'; peers: gemlite_w4_bf16, gemlite_w4_fp16, "
                                         "gemlite_fp8, ao_int4, ao_fp8_row, ao_int8"):
        _peers.build_peer("marlin", 4096, 4096, lambda nbytes: 1)


@no_gpu
def test_bench_prints_skip_reasons_and_tabulates_them(gemlite_missing, capsys):
    peers = list(_peers.PEERS)
    rows = kernels.bench([(256, 512)], [1, 16], peers)
    assert [(r["kernel"], r["m"]) for r in rows] == [(p, None) for p in peers]
    assert all("no CUDA device" in r["skipped"] for r in rows)
    err = capsys.readouterr().err
    assert err.count("# skip ") == len(peers)
    assert "# skip gemlite_fp8 256x512: gemlite is not installed" in err
    kernels.print_table(rows)
    out = capsys.readouterr().out
    assert "(K, N) = (256, 512)" in out
    assert "| ao_int8 | skipped: " in out


def test_table_marks_a_wrong_peer_and_reports_its_error(capsys):
    rows = [dict(k=64, n=64, m=1, kernel="bf16", us=10.0, gbs=1.0),
            dict(k=64, n=64, m=1, kernel="gemlite_fp8", us=math.nan, gbs=math.nan, wrong=True, err=0.9),
            dict(k=64, n=64, m=1, kernel="ao_int4", us=5.0, gbs=2.0, err=2e-3)]
    kernels.add_ratios(rows)
    kernels.print_table(rows)
    out = capsys.readouterr().out
    assert "| gemlite_fp8 | WRONG (err 9.0e-01) | 9.0e-01 |" in out
    assert "| ao_int4 | 5.0 2.00x 0% | 2.0e-03 |" in out


def _entry(fn, w, act=None):
    return _peers.PeerEntry([fn], 0, w.float(), torch.bfloat16, act)


def test_guard_passes_a_correct_peer_and_fails_a_wrong_one():
    torch.manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64)
    x = torch.randn(3, 64).to(torch.bfloat16)
    ref = x.double() @ w.t()
    good = _entry(lambda x: (x.double() @ w.t()).to(torch.bfloat16), w)
    assert good.rel_error(x) < 5e-3
    assert torch.allclose(good.reference(x).double(), ref, rtol=1e-5, atol=1e-5)
    transposed = _entry(lambda x: (x.double() @ w.t()).to(torch.bfloat16), w[torch.randperm(48)])
    assert transposed.rel_error(x) > _peers.TOL
    nan = _entry(lambda x: torch.full((3, 48), math.nan, dtype=torch.bfloat16), w)
    assert nan.rel_error(x) == math.inf
    short = _entry(lambda x: torch.zeros(3, 47, dtype=torch.bfloat16), w)
    assert short.rel_error(x) == math.inf


def test_guard_reference_quantizes_activations_per_token_for_a8_peers():
    torch.manual_seed(1)
    w = torch.randn(32, 64, dtype=torch.float64)
    x = torch.randn(4, 64).to(torch.bfloat16)
    x8 = x.double()
    s = x8.abs().amax(dim=1, keepdim=True) / 127                            # [M, 1]
    exact = ((x8 / s).round().clamp(-127, 127) * s) @ w.t()
    peer = _entry(lambda x: exact.to(torch.bfloat16), w, act=torch.int8)
    assert peer.rel_error(x) < 5e-3
    assert (peer.reference(x).double() - (x8 @ w.t())).abs().max() > 1e-3  # it is not the unquantized product


def test_grid_int4_is_exact_and_spans_every_group(monkeypatch):
    real_randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, **kw: real_randint(*a, **{**kw, "device": "cpu"}))
    codes, scale, w = _peers.grid_int4(8, 256, 128)
    assert codes.shape == (8, 256) and scale.shape == (8, 2) and w.shape == (8, 256)
    g = codes.view(8, 2, 128)
    assert (g.amin(-1) == 0).all() and (g.amax(-1) == 15).all()
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())       # powers of two
    assert torch.equal(w.to(torch.bfloat16).float(), w)                    # exact in bf16
    assert torch.equal(w.view(8, 2, 128), (g.float() - 8) * scale[..., None])


def test_cuda_decode_config_names_take_env_overrides():
    from bench._cuda_decode import config_kw

    assert config_kw("quantrt fp8") == {"quantization": "fp8"}
    kw = config_kw("quantrt fp8 (codes unfused) (no overlap) [QUANTRT_CUDA_STREAM_PDL=w8; QUANTRT_X=]")
    assert kw["disable_overlap_schedule"] is True
    assert kw["env"] == {"QUANTRT_CUDA_FUSED_CODES": "0", "QUANTRT_CUDA_STREAM_PDL": "w8", "QUANTRT_X": ""}
    with pytest.raises(ValueError, match="unknown config 'quantrt fp9'.*quantrt bf16"):
        config_kw("quantrt fp9")
    with pytest.raises(ValueError, match="'QUANTRT_CUDA_PDL' is not KEY=VALUE"):
        config_kw("quantrt fp8 [QUANTRT_CUDA_PDL]")
