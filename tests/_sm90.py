"""Compiling a Triton or Gluon kernel for sm_90 on a machine without a GPU (the triton wheel's ptxas). No import
side effects: the tc_wna16 compile check imports this in a subprocess where TRITON_INTERPRET must stay unset."""

from __future__ import annotations

import torch


def compile_sm90(fn, vals: list, num_warps: int = 4, div16: bool = False, gluon: bool = True,
                 options: dict | None = None) -> str:
    """PTX of kernel `fn` (Gluon, or with `gluon=False` a triton.jit one) for sm_90, with `vals` the kernel's
    arguments in order (tensors, TMA descriptors, ints, floats, constexprs; trailing parameters with defaults may
    be left out). `div16`: tensor pointers and ints that are multiples of 16 carry `tt.divisibility` 16, as a real
    launch specializes them (what lets loads vectorize). `options`: more compile options (e.g. num_stages)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import mangle_type

    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as Source
    else:
        from triton.compiler import ASTSource as Source
    sig, consts, attrs = {}, {}, {}
    vals = list(vals) + [p.default for p in fn.params[len(vals):]]   # trailing parameters: their defaults
    for i, (p, v) in enumerate(zip(fn.params, vals, strict=True)):
        sig[p.name] = "constexpr" if p.is_constexpr else mangle_type(v)
        if p.is_constexpr:
            consts[(i,)] = v
        elif div16 and (isinstance(v, torch.Tensor) or (type(v) is int and v % 16 == 0)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    ck = triton.compile(Source(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": num_warps, **(options or {})})
    return ck.asm["ptx"]


def ptxas_registers(ptx: str) -> tuple[int, int]:
    """(registers per thread, spilled bytes stored) of `ptx` assembled for sm_90a by the triton wheel's ptxas."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    ptxas = next((Path(triton.__file__).parent / "backends" / "nvidia" / "bin").glob("ptxas*"))
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    return regs, int(re.search(r"(\d+) bytes spill stores", out).group(1))
