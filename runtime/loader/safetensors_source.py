"""Tensor sources: where a checkpoint's tensors come from, streamed one at a time."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import torch

from quantrt.errors import CheckpointError


class SafetensorsSource:
    """All *.safetensors files of a directory, read lazily (mmap) one tensor at a time."""

    def __init__(self, model_dir: str):
        self.files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
        if not self.files:
            raise CheckpointError(f"no *.safetensors files in {model_dir}")
        from safetensors import safe_open

        self._handles = [safe_open(f, framework="pt") for f in self.files]
        self._where: dict[str, int] = {}
        for i, h in enumerate(self._handles):
            for name in h.keys():
                if name in self._where:
                    raise CheckpointError(f"tensor {name} appears in both {self.files[self._where[name]]} "
                                          f"and {self.files[i]}")
                self._where[name] = i

    def names(self) -> list[str]:
        return list(self._where)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i, h in enumerate(self._handles):
            for name in h.keys():
                try:
                    yield name, h.get_tensor(name)
                except Exception as e:  # truncated or corrupt file
                    raise CheckpointError(f"cannot read tensor {name} from {self.files[i]}: {e}") from e


class PickleSource:
    """*.bin / *.pt files: only with --load-format pt (they can execute code; torch.load weights_only)."""

    def __init__(self, model_dir: str):
        self.files = sorted(glob.glob(os.path.join(model_dir, "*.bin")) + glob.glob(os.path.join(model_dir, "*.pt")))
        if not self.files:
            raise CheckpointError(f"no *.bin/*.pt files in {model_dir}")

    def names(self) -> list[str]:
        return [n for f in self.files for n in torch.load(f, map_location="cpu", weights_only=True)]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for f in self.files:
            yield from torch.load(f, map_location="cpu", weights_only=True).items()


def open_source(model_dir: str, load_format: str):
    """Pick the tensor source for a model directory; refuse pickle files unless asked for."""
    has_st = bool(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if load_format in ("auto", "safetensors"):
        if has_st:
            return SafetensorsSource(model_dir)
        if glob.glob(os.path.join(model_dir, "*.bin")) or glob.glob(os.path.join(model_dir, "*.pt")):
            raise CheckpointError(f"{model_dir} holds only pickle weights (*.bin/*.pt), which can run code "
                                  "when loaded; convert them to safetensors or pass --load-format pt to allow them")
        raise CheckpointError(f"no model weights (*.safetensors) found in {model_dir}")
    if load_format == "pt":
        return PickleSource(model_dir)
    raise CheckpointError(f"--load-format {load_format} cannot read {model_dir}")
