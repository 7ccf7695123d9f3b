"""Export the demo GGUF (SmolLM2-135M-Instruct, Q4_1) once to a float32 HF safetensors directory.

Online methods such as `--quantization fp8` need a float checkpoint; the GGUF is already quantized.
The export holds the GGUF's dequantized values (so fp32 runs on it and on the GGUF compute the same).
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from quantrt.demo_model import default_model_path
from quantrt.loader.gguf_reader import GgufCheckpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXPORT_DIR = REPO_ROOT / ".cache" / "smollm2-hf"


def export_smollm2(gguf_path: str | None = None, out_dir: Path = DEFAULT_EXPORT_DIR) -> str:
    """Write config, tokenizer and model.safetensors to `out_dir` unless already there; return it."""
    out_dir = Path(out_dir)
    weights = out_dir / "model.safetensors"
    if weights.is_file() and (out_dir / "config.json").is_file():
        return str(out_dir)
    ckpt = GgufCheckpoint(gguf_path or default_model_path())
    config = ckpt.hf_config()
    config.architectures = ["LlamaForCausalLM"]
    tensors = {
        name: t.contiguous()  # fp32, HF layout
        for name, t in ckpt.iter_tensors()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    ckpt.tokenizer().save_pretrained(out_dir)
    os.replace(tmp, weights)  # last, so a half-written export is never mistaken for a complete one
    return str(out_dir)


if __name__ == "__main__":
    print(export_smollm2())
