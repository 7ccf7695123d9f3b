"""llm-compressor as a producer of compressed-tensors checkpoints, in its own virtualenv.

llmcompressor 0.14.0.1 pins transformers <= 5.17 and compressed-tensors 0.19 (reference/CPU.md), so it
cannot share the test venv. `llmc_python()` builds `.cache/venvs/llmc` once (torch 2.13 CPU first, or pip
pulls a CUDA torch) and `produce()` runs a one-shot quantization in a subprocess on a checkpoint our
fixtures wrote. `decompress()` asks compressed-tensors itself for the dequantized weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".cache" / "venvs" / "llmc"
PINS = ("torch==2.13.0", "llmcompressor==0.14.0.1")

_SCRIPT = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier, GPTQModifier
def one(src, dst, spec):
  torch.manual_seed(0)
  model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
  tok = AutoTokenizer.from_pretrained(src)
  kw = dict(targets="Linear", ignore=spec.get("ignore", ["lm_head"]))
  if "config_groups" in spec:
      kw = dict(config_groups=spec["config_groups"], ignore=spec.get("ignore", ["lm_head"]))
  else:
      kw["scheme"] = spec["scheme"]
  if spec.get("kv_cache_scheme"):
      kw["kv_cache_scheme"] = spec["kv_cache_scheme"]
  mod = GPTQModifier(**kw, **spec.get("gptq", {})) if "gptq" in spec else QuantizationModifier(**kw)
  args = {}
  if spec.get("calibrate"):
      from datasets import Dataset
      g = torch.Generator().manual_seed(0)
      ids = torch.randint(5, model.config.vocab_size, (8, 32), generator=g).tolist()
      args = dict(dataset=Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 8}),
                  num_calibration_samples=8, max_seq_length=32)
  oneshot(model=model, recipe=[mod], **args)
  model.save_pretrained(dst, save_compressed=True)
  tok.save_pretrained(dst)
for job in json.loads(sys.argv[1]):
  one(*job)
'''

_DECOMPRESS = r'''
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig
for src, out in json.loads(sys.argv[1]):
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(run_compressed=False))
    save_file({k: v.float().contiguous() for k, v in m.state_dict().items() if k.endswith("proj.weight")}, out)
'''


def llmc_python() -> Path:
    """The producer venv's python, built once (minutes) and reused from `.cache/venvs/llmc`."""
    py = VENV / "bin" / "python"
    marker = VENV / ".complete"
    if marker.exists():
        return py
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    for pin in PINS:  # torch first: otherwise pip resolves a CUDA torch for llmcompressor
        subprocess.run([str(py), "-m", "pip", "install", "-q", pin], check=True)
    marker.write_text(" ".join(PINS))
    return py


def _run(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([str(llmc_python()), *args], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode:
        raise RuntimeError(f"llm-compressor producer failed:\n{r.stderr[-4000:]}")


def produce(jobs: list[tuple[Path, Path, dict]]) -> None:
    """Quantize HF checkpoints with llm-compressor, all in one subprocess (its import costs ~10 s).
    Each job: (src, dst, spec) with spec {"scheme": "W4A16"} or {"config_groups": {...}}, plus optional
    "ignore", "kv_cache_scheme", "calibrate", "gptq": {...} (GPTQModifier arguments)."""
    _run(["-c", _SCRIPT, json.dumps([[str(a), str(b), spec] for a, b, spec in jobs])])


def decompress(jobs: list[tuple[Path, Path]]) -> None:
    """compressed-tensors' own decompression (through transformers in the producer venv): for each
    (checkpoint, out), every `*proj.weight` as fp32 in one safetensors file `out`."""
    _run(["-c", _DECOMPRESS, json.dumps([[str(a), str(b)] for a, b in jobs])])
