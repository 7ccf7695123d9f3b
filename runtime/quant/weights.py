"""Canonical quantized weights: the contract between formats and kernels.

Every format converts its on-disk tensors into one of these; every kernel consumes them. Shapes use
N = out_features, K = in_features. Unpack bits in the format, never in a kernel: codes here are
already one value per element.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from quantrt.errors import CheckpointError


class ActKind(str, enum.Enum):
    """How activations are quantized before the matmul."""

    NONE = "none"                    # weight-only: activations stay in compute dtype
    DYNAMIC_TOKEN = "dynamic_token"  # one scale per token (row), computed at run time
    DYNAMIC_GROUP = "dynamic_group"  # one scale per token per `group` channels (block fp8)
    DYNAMIC_TENSOR = "dynamic_tensor"  # one scale for the whole activation, computed at run time
    STATIC_TENSOR = "static_tensor"  # one scale from the checkpoint

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, eq=False)
class ActScheme:
    kind: ActKind = ActKind.NONE
    dtype: torch.dtype | None = None      # torch.int8 / torch.int4 (codes held in int8) / torch.float8_e4m3fn
    group: int = 0                        # DYNAMIC_GROUP only
    scale: torch.Tensor | None = None     # STATIC_TENSOR only: scalar fp32
    # STATIC_TENSOR int8 only: scalar zero point (msModelSlim input_offset): q = clamp(round(x/scale) + zero),
    # x ~ (q - zero) * scale. None = symmetric.
    zero: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind is ActKind.NONE:
            if self.dtype is not None:
                raise ValueError("ActScheme(kind=none) takes no dtype")
            return
        if self.dtype not in (torch.int8, torch.int4, torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"activation dtype {self.dtype} is not int8/int4/float8_e4m3fn/float8_e5m2")
        if self.kind is ActKind.DYNAMIC_GROUP and self.group <= 0:
            raise ValueError("dynamic_group activations need group > 0")
        if self.kind is ActKind.STATIC_TENSOR and (self.scale is None or self.scale.numel() != 1):
            raise ValueError("static_tensor activations need one scalar scale")
        if self.zero is not None and (self.kind is not ActKind.STATIC_TENSOR or self.dtype != torch.int8
                                      or self.zero.numel() != 1):
            raise ValueError("an activation zero point is a scalar for static_tensor int8 activations only")

    def __str__(self) -> str:
        if self.kind is ActKind.NONE:
            return "a16"
        d = str(self.dtype).removeprefix("torch.")
        return f"{d}-{self.kind.value}" + (f"{self.group}" if self.group else "")


WEIGHT_ONLY = ActScheme()


@dataclass(frozen=True, eq=False)
class IntWeight:
    """Integer codes with group scales: w[n, k] = (codes[n, k] - zero[n, g]) * scale[n, g]
    (or codes * scale + offset when `offset` is given), g = g_idx[k] if g_idx else k // group_size.

    codes: [N, K] int8 (signed, no zero) or uint8 (unsigned, with zero/offset); bits 2..8.
    scale: [N, K/G] float;  zero: [N, K/G] int (integer zero point) or None;
    offset: [N, K/G] float (GGUF/K-quant style additive min) or None;  g_idx: [K] int or None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int                      # K for per-channel
    zero: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        if not 2 <= self.bits <= 8:
            raise CheckpointError(f"IntWeight bits={self.bits}; supported bits are 2..8")
        if self.group_size <= 0 or k % self.group_size:
            raise CheckpointError(f"group size {self.group_size} does not divide K={k}")
        g = k // self.group_size
        if tuple(self.scale.shape) != (n, g):
            raise CheckpointError(f"scale shape {tuple(self.scale.shape)} != expected {(n, g)}")
        if self.zero is not None and self.offset is not None:
            raise CheckpointError("IntWeight takes an integer zero or a float offset, not both")
        for t, name in ((self.zero, "zero"), (self.offset, "offset")):
            if t is not None and tuple(t.shape) != (n, g):
                raise CheckpointError(f"{name} shape {tuple(t.shape)} != expected {(n, g)}")
        if self.g_idx is not None and tuple(self.g_idx.shape) != (k,):
            raise CheckpointError(f"g_idx shape {tuple(self.g_idx.shape)} != expected {(k,)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def _expand(self, t: torch.Tensor) -> torch.Tensor:  # [N, G] -> [N, K]
        if self.g_idx is not None:
            return t[:, self.g_idx.long()]
        return t.repeat_interleave(self.group_size, dim=1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.codes.to(torch.float32)
        s = self._expand(self.scale.to(torch.float32))
        if self.offset is not None:
            return (q * s + self._expand(self.offset.to(torch.float32))).to(dtype)
        if self.zero is not None:
            q = q - self._expand(self.zero.to(torch.float32))
        return (q * s).to(dtype)


class ScaleGranularity(str, enum.Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, eq=False)
class FloatWeight:
    """fp8 weights: w = data * scale. data: [N, K] float8_e4m3fn/e5m2 (or fnuz).
    scale fp32: TENSOR [] ; CHANNEL [N] ; BLOCK [ceil(N/bn), ceil(K/bk)] with block=(bn, bk).
    """

    data: torch.Tensor
    scale: torch.Tensor
    granularity: ScaleGranularity
    block: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        n, k = self.data.shape
        if not self.data.dtype.is_floating_point or self.data.element_size() != 1:
            raise CheckpointError(f"FloatWeight data must be an fp8 dtype, got {self.data.dtype}")
        want: tuple[int, ...]
        if self.granularity is ScaleGranularity.TENSOR:
            want = ()
        elif self.granularity is ScaleGranularity.CHANNEL:
            want = (n,)
        else:
            if self.block is None:
                raise CheckpointError("block-scaled FloatWeight needs block=(bn, bk)")
            bn, bk = self.block
            want = (-(-n // bn), -(-k // bk))
        if tuple(self.scale.shape) != want:
            raise CheckpointError(f"fp8 {self.granularity} scale shape {tuple(self.scale.shape)} "
                                  f"!= expected {want} for weight {(n, k)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    def expanded_scale(self) -> torch.Tensor:
        """Scale broadcast to [N, K] (fp32)."""
        n, k = self.shape
        s = self.scale.to(torch.float32)
        if self.granularity is ScaleGranularity.TENSOR:
            return s.expand(n, k)
        if self.granularity is ScaleGranularity.CHANNEL:
            return s[:, None].expand(n, k)
        bn, bk = self.block  # type: ignore[misc]
        return s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.to(torch.float32) * self.expanded_scale()).to(dtype)


# e2m1 magnitudes by 3-bit index; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> fp32 values."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def e8m0_decode(exps: torch.Tensor) -> torch.Tensor:
    """OCP MX E8M0 scale bytes -> fp32 powers of two 2^(b - 127) (exact, 2^-127 included; fp32 holds it
    as a subnormal). Byte 0xFF is NaN in E8M0 and is rejected."""
    if exps.dtype != torch.uint8:
        raise CheckpointError(f"E8M0 scales must be uint8 bytes, got {exps.dtype}")
    if bool((exps == 255).any()):
        raise CheckpointError("E8M0 scales contain 0xFF, which is NaN in the OCP MX spec")
    return torch.ldexp(torch.ones(exps.shape, dtype=torch.float32, device=exps.device), exps.to(torch.int32) - 127)


MICRO_BLOCKS = (16, 32)  # NVFP4, MXFP4


@dataclass(frozen=True, eq=False)
class MicroWeight:
    """fp4 e2m1 with micro-block scales: w = e2m1(codes) * scale[n, k // block] * global_scale.
    codes: [N, K] uint8 0..15 (unpacked); scale: [N, K/block] fp32 (decoded e4m3 or e8m0);
    block 16 (NVFP4, global_scale set) or 32 (MXFP4 = OCP MX: e8m0 scales decoded by `e8m0_decode`,
    global_scale None).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    block: int
    global_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        if self.block not in MICRO_BLOCKS:
            raise CheckpointError(f"fp4 micro-block size {self.block}; supported: 16 (NVFP4), 32 (MXFP4)")
        if self.codes.dtype != torch.uint8:
            raise CheckpointError(f"fp4 codes must be unpacked uint8 (0..15), got {self.codes.dtype}")
        if k % self.block or tuple(self.scale.shape) != (n, k // self.block):
            raise CheckpointError(f"fp4 scale shape {tuple(self.scale.shape)} != {(n, k // self.block)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = e2m1_decode(self.codes) * self.scale.to(torch.float32).repeat_interleave(self.block, 1)
        if self.global_scale is not None:
            w = w * self.global_scale.to(torch.float32)
        return w.to(dtype)


@dataclass(frozen=True, eq=False)
class CodebookWeight:
    """4-bit codes into a 16-entry table with blockwise absmax (bitsandbytes nf4/fp4).
    codes: [N, K] uint8 0..15; codebook: [16] fp32; absmax: [N*K/blocksize] fp32 over row-major blocks.
    """

    codes: torch.Tensor
    codebook: torch.Tensor
    absmax: torch.Tensor
    blocksize: int

    def __post_init__(self) -> None:
        if self.codes.numel() % self.blocksize or self.absmax.numel() != self.codes.numel() // self.blocksize:
            raise CheckpointError(f"absmax has {self.absmax.numel()} entries; expected "
                                  f"{self.codes.numel() // self.blocksize} blocks of {self.blocksize}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        v = self.codebook.to(torch.float32)[self.codes.long()].reshape(-1, self.blocksize)
        return (v * self.absmax.to(torch.float32)[:, None]).reshape(self.shape).to(dtype)


@dataclass(frozen=True, eq=False)
class DenseWeight:
    """An unquantized weight [N, K] (the identity member of the family)."""

    data: torch.Tensor = field()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.data.to(dtype)


QuantizedWeight = IntWeight | FloatWeight | MicroWeight | CodebookWeight | DenseWeight
