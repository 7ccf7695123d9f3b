"""QuantLinear: a linear layer whose weight comes from a checkpoint format and runs on a platform kernel.

A QuantLinear may fuse several checkpoint linears along N (q/k/v -> qkv_proj, gate/up -> gate_up_proj).
Each shard is converted by the format on its own; shards are then merged into one canonical weight
when the scheme allows (quantrt.quant.merge), otherwise each shard keeps its own kernel.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantrt.errors import CheckpointError
from quantrt.quant.kernel import (
    LinearKernel,
    LinearSpec,
    QuantizedRows,
    RowCodes,
    WeightInfo,
    select_linear_kernel,
)
from quantrt.quant.merge import concat_n, merge_act_schemes
from quantrt.quant.pending import RESIDUAL_ADD, PendingRows, SummedRows
from quantrt.quant.weights import WEIGHT_ONLY, DenseWeight, QuantizedWeight

if TYPE_CHECKING:
    from quantrt.platform.interface import Platform
    from quantrt.quant.format import QuantFormat


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W = concat of `shards` along N.

    prefix: module path of the first shard's parent, e.g. "model.layers.0.self_attn".
    shards: [(checkpoint name, out_features)], e.g. [("q_proj", 576), ("k_proj", 192), ("v_proj", 192)].
    """

    def __init__(self, prefix: str, shards: list[tuple[str, int]], in_features: int, bias: bool = False):
        super().__init__()
        self.parent = prefix
        self.shards = shards
        self.in_features = in_features
        self.out_features = sum(n for _, n in shards)
        self.has_bias = bias
        self.bias: torch.Tensor | None = None          # [N]
        self.kernels: list[LinearKernel] = []          # quantized path (one, or one per shard)
        self.weight_infos: list[WeightInfo] = []       # per kernel: the canonical weight it was built from
        self.kernel_desc: str = "unloaded"
        self.is_quantized = False
        self.release_early = False      # the op after is small (`LinearKernel.release_early`; one kernel only)

    def shard_prefix(self, i: int) -> str:
        return f"{self.parent}.{self.shards[i][0]}" if self.parent else self.shards[i][0]

    def shard_prefixes(self) -> list[str]:
        return [self.shard_prefix(i) for i in range(len(self.shards))]

    def expected_tensors(self, fmt: QuantFormat | None, i: int) -> tuple[frozenset[str], frozenset[str]]:
        """(required, optional) tensor suffixes of shard i."""
        prefix = self.shard_prefix(i)
        if fmt is None or not fmt.is_quantized(prefix):
            req, opt = frozenset({"weight"}), frozenset()
        else:
            req, opt = fmt.tensor_names(prefix)
        if self.has_bias:
            req = req | {"bias"}
        return req, opt

    def load(self, shard_tensors: list[dict[str, torch.Tensor]], fmt: QuantFormat | None,
             platform: Platform, compute_dtype: torch.dtype) -> None:
        """Build the weight(s) from each shard's tensors, then choose and prepare kernels."""
        weights: list[QuantizedWeight] = []
        acts = []
        biases = []
        extra: list[torch.Tensor | None] = []  # format-folded output biases (msModelSlim quant_bias)
        for i, tensors in enumerate(shard_tensors):
            prefix = self.shard_prefix(i)
            n = self.shards[i][1]
            if self.has_bias:
                b = tensors.pop("bias")
                if tuple(b.shape) != (n,):
                    raise CheckpointError(f"{prefix}.bias has shape {tuple(b.shape)}, expected {(n,)}")
                biases.append(b)
            if fmt is None or not fmt.is_quantized(prefix):
                w = tensors["weight"]
                if tuple(w.shape) != (n, self.in_features):
                    raise CheckpointError(f"{prefix}.weight has shape {tuple(w.shape)}, "
                                          f"expected {(n, self.in_features)}")
                weights.append(DenseWeight(w))
                acts.append(WEIGHT_ONLY)
            else:
                qw = fmt.make_weight(prefix, tensors, (n, self.in_features))
                if tuple(qw.shape) != (n, self.in_features):
                    raise CheckpointError(f"{prefix}: quantized weight has shape {tuple(qw.shape)}, "
                                          f"expected {(n, self.in_features)}")
                weights.append(qw)
                acts.append(fmt.act_scheme(prefix))
            extra.append(fmt.output_bias(prefix) if fmt is not None and fmt.is_quantized(prefix) else None)
        if any(e is not None for e in extra):
            own = torch.cat(biases).to(torch.float32) if biases else torch.zeros(self.out_features)
            folded = torch.cat([e.to(torch.float32) if e is not None else torch.zeros(n)
                                for e, (_, n) in zip(extra, self.shards)])
            biases = [own + folded]
        dev = platform.device()
        if biases:
            self.bias = torch.cat(biases).to(device=dev, dtype=compute_dtype)
        self.is_quantized = not all(isinstance(w, DenseWeight) for w in weights)
        if not self.is_quantized:
            weights = [DenseWeight(torch.cat([w.data for w in weights]))]
        act = merge_act_schemes(acts)  # static fp8 input scales merge to their max (SGLang's rule)
        merged = concat_n(weights) if act is not None else None
        groups = [(merged, act)] if merged is not None else list(zip(weights, acts))
        descs = []
        for w, act in groups:
            spec = LinearSpec(_on_device(w, dev), act, compute_dtype)   # kernels choose by where it lives
            choice = select_linear_kernel(spec, platform)
            self.kernels.append(choice.kernel.prepare(spec, platform))
            self.weight_infos.append(WeightInfo.of(w))     # kernels keep no canonical weight: describe it
            descs.append(choice.explain())
        self.kernel_desc = descs[0] if len(set(descs)) == 1 else " | ".join(descs)
        if len(self.kernels) == 1:      # several shard kernels end in torch.cat: nothing small follows them
            self.kernels[0].release_early = self.release_early

    def release_next(self, on: bool) -> None:
        """For the next calls: whether this layer's one kernel releases the op after it at its start. Only layers
        built with `release_early`; the op after decides per step (the decode attention: only while its grid is
        small, `PagedAttention.small_decode`)."""
        if self.release_early and len(self.kernels) == 1:
            self.kernels[0].release_early = on

    def row_codes(self, m: int) -> RowCodes | None:
        """The activation codes this layer's one kernel makes of M rows first (`LinearKernel.row_codes`): the op
        producing x may hand them over as `QuantizedRows`. None with several shard kernels."""
        return self.kernels[0].row_codes(m) if len(self.kernels) == 1 else None

    def takes_pending(self, m: int, kind: str) -> bool:
        """Whether this layer's one kernel computes M input rows from the producing op's inputs, or (RESIDUAL_ADD)
        adds the residual to its output itself (`quant.pending`); False with several shard kernels, and for
        RESIDUAL_ADD with a bias (the kernel adds the residual before the bias could be)."""
        if kind == RESIDUAL_ADD and self.bias is not None:
            return False
        return len(self.kernels) == 1 and self.kernels[0].takes_pending(m, kind)

    def forward_residual(self, x: torch.Tensor | PendingRows, residual: torch.Tensor) -> SummedRows:
        """residual + this layer's output (x [M, K], residual [M, N]) as `SummedRows`: added in the kernel's
        epilogue, with the partial sums of squares for the next norm, where the kernel takes RESIDUAL_ADD; else
        with torch's add (no partials)."""
        m = x.shape[0]
        if self.takes_pending(m, RESIDUAL_ADD):
            if isinstance(x, PendingRows) and not self.takes_pending(m, x.kind):
                x = x.materialize()
            return self.kernels[0].apply_residual(x, residual)
        return SummedRows(residual + self(x))

    def forward(self, x: torch.Tensor | QuantizedRows | PendingRows, add_bias: bool = True) -> torch.Tensor:
        """x [..., K] -> [..., N]; add_bias False leaves the bias to the op after (`QKVPrologue`)."""
        if isinstance(x, PendingRows) and not self.takes_pending(x.shape[0], x.kind):
            x = x.materialize()
        bias = self.bias if add_bias else None
        if len(self.kernels) == 1:
            return self.kernels[0].apply(x, bias)
        y = torch.cat([k.apply(x, None) for k in self.kernels], dim=-1)
        return y + bias if bias is not None else y


def _on_device(w: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    """`w` with every tensor field on `device` (checkpoint tensors arrive on the CPU)."""
    moved = {f.name: v.to(device) for f in dataclasses.fields(w)
             if isinstance(v := getattr(w, f.name), torch.Tensor) and v.device != device}
    return dataclasses.replace(w, **moved) if moved else w
