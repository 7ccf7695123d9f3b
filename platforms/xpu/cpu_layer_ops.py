"""CPU layer ops on quantrt's native extension (`csrc/decode_ops.cpp`, `torch.ops.quantrt_cpu.*`).

`CpuPlatform` hands these to the layers through the Platform hooks when the extension loaded
(`cpu_ext.load()`); otherwise every hook answers None and the layers keep their torch math, with the
reason in `quantrt env` (`layer_ops`). Each op computes what the torch path computes, rounding to the
activation dtype where the torch ops round (see the C++ file's header), so fp32 results equal the torch
path up to summation order and bf16 results agree up to one bf16 rounding:

- `cpu_rms_norm` / `cpu_add_rms_norm`: RMSNorm, and the residual add folded into it (Platform.rms_norm_op,
  fused_add_rms_norm_op); bf16/fp16 only, fp32 keeps torch's kernel (see cpu_add_rms_norm);
- `cpu_act_mul`: silu / gelu-tanh (gate) * up over the merged gate_up output (Platform.act_mul_op);
- `cpu_rotary_kv_store`: neox rotary on q and k plus the KV-pool write of k and v, plain and fp8 pages
  (Platform.rotary_kv_store_op; fp4 pages and MLA pools decline: None);
- `cpu_decode_attention`: one query per sequence over its paged KV, read in place (plain, fp8 and fp4 pages
  dequantized row by row), fp32 QK^T / softmax / P.V, sliding windows and sinks (Platform.decode_attention_ref).

Small work runs inline on the calling thread: at batch 1 a torch op's OpenMP fork/join (or the KV gather's
copy) costs more than the arithmetic.
"""

from __future__ import annotations

import torch

from quantrt.engine.kv_quant import KVKind
from quantrt.platforms.xpu import cpu_ext

_FP8_KIND = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
_AVAILABLE: list[bool] = []   # memo of available(): the extension loads once per process


def available() -> bool:
    """True when torch.ops.quantrt_cpu carries the decode ops (the extension built and loaded)."""
    if not _AVAILABLE:
        _AVAILABLE.append(cpu_ext.load() and hasattr(torch.ops.quantrt_cpu, "decode_attention"))
    return _AVAILABLE[0]


def unavailable_reason() -> str | None:
    """None when the ops are usable, else why not (the extension's own reason)."""
    if available():
        return None
    return cpu_ext.unavailable_reason() or "the extension loaded without the decode ops (stale build?)"


def pool_kind(pool) -> int | None:
    """The C++ ops' page kind of a KVPool: 0 plain, 1 fp8 e4m3fn, 2 fp8 e5m2, 3 fp4 e2m1; None when they
    cannot read it (no V side: MLA's latent cache; an fp8 flavour other than e4m3fn/e5m2)."""
    if not pool.has_v:
        return None
    kind = pool.spec.kind
    if kind is KVKind.PLAIN:
        return 0 if pool.dtype in (torch.float32, torch.bfloat16, torch.float16) else None
    if kind is KVKind.FP8:
        return _FP8_KIND.get(pool.spec.dtype)
    return 3


def cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., D], weight: [D] in x.dtype -> [..., D] x.dtype
    if x.dtype == torch.float32:  # torch's fp32 kernel: see cpu_add_rms_norm
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    return torch.ops.quantrt_cpu.rms_norm(x, weight, eps)


def cpu_add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    # x, delta: [T, D] -> (norm(x + delta), x + delta), both [T, D] x.dtype
    if x.dtype == torch.float32:
        # fp32 layer by layer keeps torch's RMSNorm kernel, bit for bit the earlier path: the native op sums in
        # another order (an ulp here and there), and per-token int8/fp8 activation quantizers downstream turn an
        # ulp at a rounding boundary into a code step (measured: W8A8 prompt logprobs vs the float64 fake-quant
        # reference moved 2e-6 -> 3e-2). bf16/fp16 are bit-identical to torch's path and take the native op.
        s = x + delta
        return torch.rms_norm(s, (s.shape[-1],), weight, eps), s
    return torch.ops.quantrt_cpu.add_rms_norm(x, delta, weight, eps)


def cpu_act_mul(gu: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
    # gu: [T, 2I] (gate columns, then up columns) -> [T, I]
    return torch.ops.quantrt_cpu.act_mul(gu, gelu_tanh)


def cpu_rotary_kv_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        positions: torch.Tensor, pool, layer: int, slots: torch.Tensor, k_scale: float = 1.0,
                        v_scale: float = 1.0) -> torch.Tensor | None:
    """q [T, H, D], k/v [T, Hkv, D], cos/sin [P, D/2] in q.dtype, positions/slots [T] -> q rotated [T, H, D],
    with k rotated and k, v written into `pool` layer `layer` at `slots`; None (nothing written) for pages
    it does not write (fp4, whose block rounding stays in KVPool.write, and MLA pools) or CPU-foreign tensors."""
    kind = pool_kind(pool)
    if kind is None or kind == 3 or q.device.type != "cpu" or cos.dtype != q.dtype:
        return None
    return torch.ops.quantrt_cpu.rope_store_kv(q, k, v, cos, sin, positions, pool.k[layer], pool.v[layer], slots,
                                               kind, float(k_scale), float(v_scale))


def cpu_decode_attention(layer, q: torch.Tensor, fb, sinks: torch.Tensor | None) -> torch.Tensor | None:
    """PagedAttention's decode on CPU (`Platform.decode_attention_ref`): q [B, H, D] -> [B, H*D] in q.dtype,
    or None (SDPA runs) for pools it cannot read or a batch without its decode slot table."""
    if not available() or fb.kv_slots is None:
        return None
    pool = fb.kv_pool
    kind = pool_kind(pool)
    if kind is None or q.dim() != 3 or q.device.type != "cpu":
        return None
    lens = fb.kv_lens_t if fb.kv_lens_t is not None else torch.tensor(fb.kv_lens, dtype=torch.long)
    i = layer.layer_id
    k_sc, v_sc = (pool.k_sc[i], pool.v_sc[i]) if kind == 3 else (None, None)
    return torch.ops.quantrt_cpu.decode_attention(q, pool.k[i], pool.v[i], k_sc, v_sc, fb.kv_slots, lens,
                                                  float(layer.scale), int(layer.window or 0), kind,
                                                  float(layer.k_scale), float(layer.v_scale), sinks)


cpu_decode_attention.runs_on_cpu = True  # type: ignore[attr-defined]  # PagedAttention calls it on CPU tensors
