"""PDL launch of the weight-streaming GEMVs (`_common.stream_pdl`): the switch, and in the sm_90 PTX the order
that makes it safe and useful: step 0's weight loads before `griddepcontrol.wait` (the weights are never written
by the kernel before), every read of x after it, and the next PDL op released once, after the main loop (or, for
a small next op, `_common.pdl_release_at`, at the start).
Compiled with the triton wheel's ptxas in a subprocess without TRITON_INTERPRET (no GPU needed)."""

from __future__ import annotations

import os

import pytest
import torch

_COMPILE = r'''
import sys, torch
from quantrt.platforms.cuda.kernels import dense_gemv_triton as D, gemv_w8 as G
from tests._sm90 import compile_sm90

n, k, bn, bk = 256, 4096, 16, 1024
x, y = torch.zeros(1, k, dtype=torch.bfloat16), torch.zeros(1, n, dtype=torch.bfloat16)
ws, cnt = torch.zeros(2, 1, n), torch.zeros(16, dtype=torch.int32)
out = {}
for name, w, is_int, dp4a in (("fp8", torch.zeros(n, k, dtype=torch.float8_e4m3fn), False, False),
                              ("int8", torch.zeros(n, k // 4, dtype=torch.int32), True, True)):
    for pdl in (False, True):
        vals = [x, w, ws, ws, y, ws, cnt, n, k, k // 128, k // 2, 0, 1, 127.0 if is_int else 448.0, is_int,
                not is_int, bn, bk, 4096, 4096, 1, 1, dp4a, 2, True, pdl]
        out[name, pdl] = compile_sm90(G._gemv_w8_kernel, vals, num_warps=8, div16=True, gluon=False,
                                      options={"num_stages": 1})
for pdl in (False, True):
    vals = [x, torch.zeros(n, k, dtype=torch.bfloat16), y, ws, cnt, n, k, k, k // 2, 1, 1, 8, bk, False, pdl, 2,
            True]
    out["dense", pdl] = compile_sm90(D._dense_gemv_kernel, vals, num_warps=8, div16=True, gluon=False)
from quantrt.platforms.cuda import layer_ops as L
norm = {}
for pdl in (False, True):
    xb = torch.zeros(1, 4096, dtype=torch.bfloat16)
    vals = [xb, xb, xb[0], xb, xb, xb, ws, ws, 4096, 4096, 4096, 4096, 4096, 1e-5, 4096, pdl]
    norm[pdl] = compile_sm90(L._add_rms_norm_kernel, vals, num_warps=8, div16=True, gluon=False)
tr = torch.zeros(8, dtype=torch.int64)   # QUANTRT_CUDA_TRACE: %globaltimer reads (entry, wait, loop end, exit)
vals = [x, out_w := torch.zeros(n, k, dtype=torch.float8_e4m3fn), ws, ws, y, ws, cnt, n, k, k // 128, k // 2, 0, 1,
        448.0, False, True, bn, bk, 4096, 4096, 1, 1, False, 2, True, True, tr, 7, True]
traced = compile_sm90(G._gemv_w8_kernel, vals, num_warps=8, div16=True, gluon=False, options={"num_stages": 1})
vals = [xb, xb, xb[0], xb, xb, xb, ws, ws, 4096, 4096, 4096, 4096, 4096, 1e-5, 4096, True, False, 1.0, False, False,
        tr, 7, True]
traced_norm = compile_sm90(L._add_rms_norm_kernel, vals, num_warps=8, div16=True, gluon=False)
vals = [x, torch.zeros(n, k, dtype=torch.float8_e4m3fn), ws, ws, y, ws, cnt, n, k, k // 128, k // 2, 0, 1, 448.0,
        False, True, bn, bk, 4096, 4096, 1, 1, False, 2, False, True, None, 0, False, True]
early = {"fp8": compile_sm90(G._gemv_w8_kernel, vals, num_warps=8, div16=True, gluon=False,
                             options={"num_stages": 1})}
vals = [x, torch.zeros(n, k, dtype=torch.bfloat16), y, ws, cnt, n, k, k, k // 2, 1, 1, 8, bk, False, True, 2, False,
        None, 0, False, True]
early["dense"] = compile_sm90(D._dense_gemv_kernel, vals, num_warps=8, div16=True, gluon=False)
for name, ptx in early.items():
    body = ptx[ptx.index(".entry"):]
    print("EARLY", name, body.count("griddepcontrol.launch_dependents"), body.find("ld.global"),
          body.find("griddepcontrol.launch_dependents"), body.find("griddepcontrol.wait"))
print("TRACE", traced.count("%globaltimer"), traced_norm.count("%globaltimer"), out["fp8", True].count("globaltimer"))
body = norm[True][norm[True].index(".entry"):]
print("NORM", body.find("griddepcontrol.launch_dependents"), body.find("ld.global"), body.find("griddepcontrol.wait"),
      body.rfind("ld.global"), "griddepcontrol" in norm[False])
for (name, pdl), ptx in out.items():
    body = ptx[ptx.index(".entry"):]
    print(name, pdl, body.count("griddepcontrol.wait"), body.count("griddepcontrol.launch_dependents"),
          body.find("ld.global"), body.find("griddepcontrol.wait"), body.find("griddepcontrol.launch_dependents"),
          max(body[:body.find("atom.")].rfind(v) for v in ("ld.global.v4", "ld.global.nc.v4")), body.find("atom."))
'''


def test_stream_pdl_switch(monkeypatch):
    from quantrt.platforms.cuda.kernels import _common

    cpu = torch.zeros(1)
    monkeypatch.setenv("QUANTRT_CUDA_STREAM_PDL", "ring,w8")
    assert not _common.stream_pdl(cpu, "ring")        # not a CUDA sm_90 tensor: never
    monkeypatch.setattr(_common, "pdl_supported", lambda t: True)
    assert _common.stream_pdl(cpu, "ring") and _common.stream_pdl(cpu, "w8")
    assert not _common.stream_pdl(cpu, "dense")
    monkeypatch.setenv("QUANTRT_CUDA_STREAM_PDL", "")
    assert not _common.stream_pdl(cpu, "ring")


def test_release_point_switch(monkeypatch):
    """`_common.pdl_release_at`: after the main loop by default, at the start for a small next op, never without
    PDL; QUANTRT_CUDA_EARLY_RELEASE=0 keeps the release after the main loop."""
    from quantrt.platforms.cuda.kernels import _common

    t = torch.zeros(1)
    assert _common.pdl_release_at(t, True) == {"TRIGGER": False, "EARLY_RELEASE": False}   # CPU: no PDL
    monkeypatch.setattr(_common, "pdl_trigger", lambda x: True)
    assert _common.pdl_release_at(t, False) == {"TRIGGER": True, "EARLY_RELEASE": False}
    assert _common.pdl_release_at(t, True) == {"TRIGGER": False, "EARLY_RELEASE": True}
    monkeypatch.setenv("QUANTRT_CUDA_EARLY_RELEASE", "0")
    assert _common.pdl_release_at(t, True) == {"TRIGGER": True, "EARLY_RELEASE": False}


@pytest.mark.gluon_compile
def test_gemv_ptx_orders_weight_loads_wait_and_release():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {}
    lines = r.stdout.splitlines()
    norm = next(line for line in lines if line.startswith("NORM "))
    release, first_ld, wait, last_ld, plain_has_gdc = norm.split()[1:]
    # add + RMSNorm: release the next op, request the weight, wait, then read x and the residual
    assert -1 < int(release) < int(first_ld) < int(wait) < int(last_ld) and plain_has_gdc == "False"
    assert next(line for line in lines if line.startswith("TRACE ")).split()[1:] == ["4", "3", "0"]
    assert sum(line.startswith("EARLY ") for line in lines) == 2, r.stdout
    for line in (line for line in lines if line.startswith("EARLY ")):   # a small next op: released at the start
        name, releases, first_ld, release, wait = line.split()[1:]
        assert releases == "1" and -1 < int(first_ld) < int(release) < int(wait), line
    for line in (line for line in lines if not line.startswith(("NORM ", "TRACE ", "EARLY "))):
        name, pdl, *nums = line.split()
        rows[name, pdl == "True"] = [int(v) for v in nums]
    assert len(rows) == 6, r.stdout
    for (name, pdl), (waits, releases, first_ld, wait, release, last_ld, atom) in rows.items():
        assert releases == 1, (name, pdl)                 # once, after the weight stream, before the split-K sums
        assert last_ld < release < atom, (name, pdl)      # last_ld: the last 16-byte load before the split-K epilogue
        if pdl:
            assert waits == 1 and first_ld < wait < release, (name, pdl)
        else:
            assert waits == 0, (name, pdl)
