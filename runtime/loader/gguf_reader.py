"""Read a GGUF checkpoint into the Hugging Face layout (tensors dequantized to float32 at load).

Config and tokenizer come from transformers' own GGUF support; tensors are read through
`gguf.GGUFReader` (memory-mapped), renamed with `gguf.get_tensor_name_map` and put back into the HF
layout (llama q/k row order, gemma norm offset; see `gguf_names`).

Load cost on the 2-core CI box (SmolLM2-135M Q4_1): nearly all of it is `gguf.GGUFReader` parsing the
metadata (~5 s: the ~98k tokenizer strings, one numpy memmap slice each). transformers repeats that
parse in `AutoConfig` (~7 s) and `AutoTokenizer` (~11 s: it parses once to pick the class, then reads
the vocabulary again); the tokenizer conversion itself is ~0.2 s.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from quantrt.errors import CheckpointError, NotSupportedYet
from quantrt.loader.gguf_names import (
    build_name_map,
    check_arch,
    hf_param_shapes,
    mixtral_config,
    moe_config_fixups,
    norm_offset,
    qk_row_order,
)

_FLOAT_TYPES = {
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.BF16,
}


def find_gguf_file(path: str) -> str | None:
    """The GGUF file `path` names: itself if it ends in `.gguf`, or the one `*.gguf` in a directory.

    Returns None when `path` is not GGUF (a directory without `*.gguf`, or another file); a directory
    holding several is a CheckpointError listing them.
    """
    if path.endswith(".gguf") and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise CheckpointError(f"GGUF file {path} does not exist")
        return path
    if not os.path.isdir(path):
        return None
    found = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(found) > 1:
        names = ", ".join(os.path.basename(f) for f in found)
        raise CheckpointError(f"{path} holds several GGUF files ({names}); pass the path of one of them")
    return found[0] if found else None


class GgufCheckpoint:
    """One GGUF file seen as a Hugging Face checkpoint: config, tokenizer and HF-named tensors."""

    def __init__(self, path: str) -> None:
        """Open `path` (a `.gguf` file or a directory holding one) and check its architecture."""
        file = find_gguf_file(path)
        if file is None:
            raise CheckpointError(f"{path} is not a GGUF file and holds no *.gguf file")
        self.path: str = os.path.abspath(file)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"cannot read GGUF file {self.path}: {e}") from e
        arch_field = self._reader.fields.get("general.architecture")
        if arch_field is None:
            raise CheckpointError(f"GGUF file {self.path} has no general.architecture")
        self.architecture: str = str(arch_field.contents())
        self._model_arch = check_arch(self.architecture, self.path)
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._config: PretrainedConfig | None = None
        self._hf_to_gguf: dict[str, str] | None = None
        self._hf_shapes: dict[str, tuple[int, ...]] = {}

    # ---- metadata -------------------------------------------------------------------------------

    def field(self, key: str, default: object = None) -> object:
        """The value of metadata key `key` (e.g. `llama.block_count`), or `default`."""
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    def hf_config(self) -> PretrainedConfig:
        """The HF config (transformers' GGUF parser, computed once), with quantrt's fix-ups."""
        if self._config is None:
            folder, name = os.path.split(self.path)
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            if "output.weight" not in self._tensors:
                config.tie_word_embeddings = True
            # transformers maps `attention.key_length` -> head_dim for gemma3 only (qwen3's default 128
            # fits just the released sizes); llama.cpp writes it whenever the HF config had head_dim.
            key_length = self.field(f"{self.architecture}.attention.key_length")
            if key_length is not None:
                config.head_dim = int(key_length)
            # GGUF stores floats as float32 (1e-6 reads back as 9.99999997e-07): keep the shortest
            # decimal that rounds to the same float32, which is what the HF config said.
            if isinstance(getattr(config, "rms_norm_eps", None), float):
                config.rms_norm_eps = float(str(np.float32(config.rms_norm_eps)))
            if self.architecture.endswith("moe"):
                moe_config_fixups(config, self.field, self.architecture)
            config = mixtral_config(config, self.field, self.architecture) or config   # llama arch + experts
            self._config = config
        return self._config

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer and chat template stored in the GGUF metadata (transformers' converter)."""
        folder, name = os.path.split(self.path)
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)

    # ---- tensors --------------------------------------------------------------------------------

    def _name_map(self) -> dict[str, str]:
        """`{hf_name: gguf_name}`, checked both ways against the HF model skeleton."""
        if self._hf_to_gguf is None:
            config = self.hf_config()
            self._hf_shapes = hf_param_shapes(config)
            self._hf_to_gguf = build_name_map(
                self._model_arch,
                config.num_hidden_layers,
                self._hf_shapes,
                list(self._tensors),
                bool(config.tie_word_embeddings) and "output.weight" not in self._tensors,
                self.path,
            )
        return self._hf_to_gguf

    def tensor_names(self) -> list[str]:
        """HF names of every stored tensor, e.g. `model.layers.0.self_attn.q_proj.weight`."""
        return list(self._name_map())

    def _lookup(self, hf_name: str) -> gguf.ReaderTensor:
        gguf_name = self._name_map().get(hf_name)
        if gguf_name is None:
            raise CheckpointError(f"GGUF file {self.path} has no tensor for {hf_name}")
        t = self._tensors[gguf_name]
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml order is innermost first
        if shape != self._hf_shapes[hf_name]:
            raise CheckpointError(
                f"GGUF tensor {gguf_name} has shape {list(shape)}, {hf_name} needs {list(self._hf_shapes[hf_name])}"
            )
        return t

    def raw_tensor(self, hf_name: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType, tuple[int, ...]]:
        """`(data, ggml type, hf shape)` of one tensor as stored, but in HF row order.

        Quantized types: uint8 `[rows, bytes_per_row]` (rows are whole blocks, so the llama q/k row
        reorder is exact on bytes). Float types: the numeric array, with the gemma norm offset removed.
        """
        t = self._lookup(hf_name)
        shape = self._hf_shapes[hf_name]
        data = t.data  # memmap, row-major: [rows, bytes_per_row] (quantized) or the numeric shape
        order = qk_row_order(t.name, self.architecture, self.hf_config(), shape[0])
        if order is not None:
            data = data[order]
        offset = norm_offset(t.name, self.architecture)
        if offset:
            if t.tensor_type not in _FLOAT_TYPES:
                raise NotSupportedYet(f"{t.name}: quantized ({t.tensor_type.name}) gemma norm weights")
            data = (data.astype(np.float32) - np.float32(offset)).astype(data.dtype)
        return data, t.tensor_type, shape

    def load_tensor(self, hf_name: str) -> torch.Tensor:
        """One tensor dequantized to float32 in the HF layout."""
        t = self._lookup(hf_name)
        shape = self._hf_shapes[hf_name]
        values = self._dequantize(t).reshape(shape)  # float32 [rows, cols] in GGUF row order
        order = qk_row_order(t.name, self.architecture, self.hf_config(), shape[0])
        if order is not None:
            values = values[order]
        offset = norm_offset(t.name, self.architecture)
        if offset:
            values = values - np.float32(offset)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not values.flags.writeable:  # an F32 tensor still viewing the read-only mmap
            values = values.copy()
        return torch.from_numpy(values)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`(hf_name, float32 tensor in HF layout)`, dequantized lazily one at a time."""
        for hf_name in self._name_map():
            yield hf_name, self.load_tensor(hf_name)

    @staticmethod
    def _dequantize(t: gguf.ReaderTensor) -> np.ndarray:
        """float32 values, row-major `[rows, cols]` (F32/F16/BF16 converted exactly)."""
        try:
            return gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise NotSupportedYet(f"GGUF tensor {t.name}: {e}") from e
