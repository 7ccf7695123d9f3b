"""The KV pool: per-layer K and V tensors indexed by slot, grouped into pages of `page_size` slots.

Slots are handed out a page at a time by the PageAllocator (engine/page_allocator.py); the pool only
stores and gathers. Storage follows the KV cache spec (engine/kv_quant.py): the compute dtype or bf16
as is, fp8 as uint8 bits, fp4 as packed codes plus block scales. Quantized writes divide by the
layer's k_scale/v_scale; `gather` dequantizes (multiplying them back) into fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantrt.engine.kv_quant import KVCacheSpec, KVKind, fp4_dequantize, fp4_quantize


@dataclass(frozen=True)
class KVGeometry:
    """What one token costs per layer, as a model declares it (`CausalLM.kv_geometry()`): K rows of
    num_kv_heads x head_dim, and V rows alike unless has_v is False (MLA: one compressed latent row of
    kv_lora_rank + qk_rope_head_dim per token, stored in the K buffer, no V)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    has_v: bool = True

    def bytes_per_token(self, spec: KVCacheSpec) -> int:
        """Storage bytes of one token over all layers (scales included)."""
        per_buffer = spec.bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim) // 2
        return per_buffer * (2 if self.has_v else 1)


class KVPool:
    """k[l], v[l]: [num_slots, Hkv, D] (plain), [num_slots, Hkv, D] uint8 (fp8) or
    [num_slots, Hkv, D/2] uint8 with k_sc[l], v_sc[l]: [num_slots, Hkv*D/16] uint8 (fp4).
    has_v=False (MLA latent cache): only the K side exists; `write` takes v=None and `gather` returns
    (k, None)."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 spec: KVCacheSpec | torch.dtype, device: torch.device, has_v: bool = True):
        if isinstance(spec, torch.dtype):
            spec = KVCacheSpec("auto", KVKind.PLAIN, spec)
        spec.check_shape(num_kv_heads, head_dim)
        self.spec = spec
        self.num_slots = num_slots
        self.dtype = spec.dtype if spec.kind is KVKind.PLAIN else torch.uint8   # storage dtype
        d = head_dim // 2 if spec.kind is KVKind.FP4 else head_dim

        def buf() -> torch.Tensor:
            return torch.zeros(num_slots, num_kv_heads, d, dtype=self.dtype, device=device)

        self.k = [buf() for _ in range(num_layers)]
        self.v = [buf() for _ in range(num_layers)] if has_v else []
        self.has_v = has_v
        self.k_sc: list[torch.Tensor] = []
        self.v_sc: list[torch.Tensor] = []
        if spec.kind is KVKind.FP4:
            nb = num_kv_heads * head_dim // 16
            self.k_sc = [torch.zeros(num_slots, nb, dtype=torch.uint8, device=device) for _ in range(num_layers)]
            self.v_sc = [torch.zeros(num_slots, nb, dtype=torch.uint8, device=device)
                         for _ in range(num_layers if has_v else 0)]

    @property
    def quantized(self) -> bool:
        return self.spec.quantized

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                        spec: KVCacheSpec | torch.dtype) -> int:
        if isinstance(spec, torch.dtype):
            spec = KVCacheSpec("auto", KVKind.PLAIN, spec)
        return spec.bytes_per_token(num_layers, num_kv_heads, head_dim)

    def nbytes(self) -> int:
        """Bytes the pool holds (all layers, K and V, scales included)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.k_sc + self.v_sc)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw storage of layer i (plain dtype, or uint8 for quantized caches); V is None without V."""
        return self.k[i], self.v[i] if self.has_v else None

    def write(self, i: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
              k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        # slots: [T]; k, v: [T, Hkv, D] (v None when the pool has no V)
        kind = self.spec.kind
        sides = [(self.k[i], self.k_sc[i] if self.k_sc else None, k, k_scale)]
        if self.has_v:
            sides.append((self.v[i], self.v_sc[i] if self.v_sc else None, v, v_scale))
        for buf, sc, x, scale in sides:
            if kind is KVKind.PLAIN:
                buf.index_copy_(0, slots, x.to(self.dtype))
            elif kind is KVKind.FP8:
                buf.index_copy_(0, slots, (x.float() / scale).to(self.spec.dtype).view(torch.uint8))
            else:
                codes, scales = fp4_quantize(x.float() / scale)
                buf.index_copy_(0, slots, codes)
                sc.index_copy_(0, slots, scales)

    def _dequant(self, buf: torch.Tensor, sc: list[torch.Tensor], i: int, slots: torch.Tensor,
                 scale: float) -> torch.Tensor:
        if self.spec.kind is KVKind.FP8:
            x = buf[slots].view(self.spec.dtype).float()
        else:
            x = fp4_dequantize(buf[slots], sc[i][slots])
        return x * scale if scale != 1.0 else x

    def gather(self, i: int, slots: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K and V of `slots` ([L] or [B, L]) -> [..., Hkv, D] each: the storage dtype for plain caches,
        fp32 (dequantized, scales applied) for quantized ones; V is None when the pool has no V."""
        if self.spec.kind is KVKind.PLAIN:
            return self.k[i][slots], self.v[i][slots] if self.has_v else None
        return (self._dequant(self.k[i], self.k_sc, i, slots, k_scale),
                self._dequant(self.v[i], self.v_sc, i, slots, v_scale) if self.has_v else None)

    def read(self, pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Raw rows of one storage tensor: slots [L] or [B, L] -> [L, Hkv, D] or [B, L, Hkv, D]."""
        return pool[slots]
