"""The KV pool: per-layer K and V tensors indexed by slot, grouped into pages of `page_size` slots.

Slots are handed out a page at a time by the PageAllocator (engine/page_allocator.py); the pool only
stores and gathers. Storage follows the KV cache spec (engine/kv_quant.py): the compute dtype or bf16
as is, fp8 as uint8 bits, fp4 as packed codes plus block scales. Quantized writes divide by the
layer's k_scale/v_scale; `gather` dequantizes (multiplying them back) into fp32.
"""

from __future__ import annotations

import torch

from quantrt.engine.kv_quant import KVCacheSpec, KVKind, fp4_dequantize, fp4_quantize


class KVPool:
    """k[l], v[l]: [num_slots, Hkv, D] (plain), [num_slots, Hkv, D] uint8 (fp8) or
    [num_slots, Hkv, D/2] uint8 with k_sc[l], v_sc[l]: [num_slots, Hkv*D/16] uint8 (fp4)."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 spec: KVCacheSpec | torch.dtype, device: torch.device):
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
        self.v = [buf() for _ in range(num_layers)]
        self.k_sc: list[torch.Tensor] = []
        self.v_sc: list[torch.Tensor] = []
        if spec.kind is KVKind.FP4:
            nb = num_kv_heads * head_dim // 16
            self.k_sc = [torch.zeros(num_slots, nb, dtype=torch.uint8, device=device) for _ in range(num_layers)]
            self.v_sc = [torch.zeros(num_slots, nb, dtype=torch.uint8, device=device) for _ in range(num_layers)]

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

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw storage of layer i (plain dtype, or uint8 for quantized caches)."""
        return self.k[i], self.v[i]

    def write(self, i: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        # slots: [T]; k, v: [T, Hkv, D]
        kind = self.spec.kind
        if kind is KVKind.PLAIN:
            self.k[i].index_copy_(0, slots, k.to(self.dtype))
            self.v[i].index_copy_(0, slots, v.to(self.dtype))
            return
        kf, vf = k.float() / k_scale, v.float() / v_scale
        if kind is KVKind.FP8:
            fp8 = self.spec.dtype
            self.k[i].index_copy_(0, slots, kf.to(fp8).view(torch.uint8))
            self.v[i].index_copy_(0, slots, vf.to(fp8).view(torch.uint8))
            return
        for buf, sc, x in ((self.k[i], self.k_sc[i], kf), (self.v[i], self.v_sc[i], vf)):
            codes, scales = fp4_quantize(x)
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
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `slots` ([L] or [B, L]) -> [..., Hkv, D] each: the storage dtype for plain caches,
        fp32 (dequantized, scales applied) for quantized ones."""
        if self.spec.kind is KVKind.PLAIN:
            return self.k[i][slots], self.v[i][slots]
        return (self._dequant(self.k[i], self.k_sc, i, slots, k_scale),
                self._dequant(self.v[i], self.v_sc, i, slots, v_scale))

    def read(self, pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Raw rows of one storage tensor: slots [L] or [B, L] -> [L, Hkv, D] or [B, L, Hkv, D]."""
        return pool[slots]
