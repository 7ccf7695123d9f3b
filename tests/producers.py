"""Producer libraries in their own virtualenvs: llm-compressor (compressed-tensors checkpoints) and
auto-round (auto_round / auto_gptq / auto_awq / llm_compressor / GGUF exports).

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
PINS = (  # llmcompressor 0.14.0.1's resolved dependency set, installed with --no-deps (no resolver run)
    "accelerate==1.15.0", "annotated-doc==0.0.7", "annotated-types==0.8.0", "anyio==4.16.0",
    "auto-round==0.15.1", "certifi==2026.10.18", "charset-normalizer==3.5.2", "click==8.5.1",
    "compressed-tensors==0.19.0", "datasets==5.2.0", "dill==0.4.1", "filelock==4.2.11", "fsspec==2026.9.0",
    "h11==0.16.0", "hf-xet==1.8.0", "httpcore==1.0.9", "httpx==0.28.1", "huggingface_hub==1.33.0", "idna==3.20",
    "Jinja2==3.1.6", "llmcompressor==0.14.0.1", "loguru==0.7.3", "markdown-it-py==4.3.0", "MarkupSafe==3.0.4",
    "mdurl==0.1.2", "mpmath==1.3.0", "multiprocess==0.70.19", "networkx==3.6.1", "numpy==2.4.6",
    "nvidia-ml-py==13.615.71", "packaging==26.3", "pandas==3.1.1", "pillow==13.0.0", "psutil==7.2.2",
    "py-cpuinfo==9.0.0", "pyarrow==26.0.1", "pydantic==2.14.3", "pydantic_core==2.50.4", "Pygments==2.21.0",
    "python-dateutil==4.0.0", "PyYAML==6.0.3", "regex==2026.11.15", "requests==2.34.2", "rich==15.0.0",
    "safetensors==0.8.0", "shellingham==1.5.4", "sympy==1.14.0", "tokenizers==0.23.3", "tqdm==4.70.1",
    "transformers==5.17.0", "typer==0.29.2", "typing-inspection==0.4.5", "typing_extensions==4.16.0",
    "tzdata==2026.6", "urllib3==2.8.0", "xxhash==4.1.0",
)

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
    """The producer venv's python, built once and reused from `.cache/venvs/llmc`.

    torch is not reinstalled: the test venv's torch 2.13 CPU (the same version llmcompressor accepts) is
    linked in, and the other packages are installed from exact pins without a resolver run (about 1 min
    on an idle 2-core box; 3-5 min when a plain `pip install llmcompressor` has to resolve and unpack torch)."""
    py = VENV / "bin" / "python"
    marker = VENV / ".complete"
    if marker.exists():
        return py
    import sysconfig

    import torch

    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    dist = f"torch-{torch.__version__}.dist-info"
    if torch.__version__.startswith("2.13.0") and (ours / dist).is_dir():
        for name in ("torch", dist, "torchgen"):
            (site / name).symlink_to(ours / name)
    else:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *PINS], check=True)
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


# ---- auto-round ---------------------------------------------------------------------------------
AR_VENV = REPO / ".cache" / "venvs" / "autoround"
# torch first (else pip resolves a CUDA torch); compressed-tensors for its llm_compressor export, gguf +
# sentencepiece for its GGUF export (llama.cpp's converter, bundled with auto-round, imports both)
AR_PINS = ("torch==2.13.0", "auto-round==0.16.1", "compressed-tensors==0.19.0", "loguru==0.7.3", "gguf==0.19.0",
           "sentencepiece==0.2.3")

_AR_PRODUCE = r"""
import json, sys, torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer
from safetensors.torch import save_file
for src, dst, spec in json.loads(sys.argv[1]):
    if spec["format"].startswith("gguf"):
        # the converter picks a pre-tokenizer by hashing the tokenizer's output and refuses unknown ones
        # (our tiny test tokenizer); the weights do not depend on it
        from auto_round.export.export_to_gguf.llama_cpp_conversion import get_conversion
        get_conversion(src).module.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    kw = {k: spec[k] for k in ("bits", "group_size", "sym", "layer_config", "to_quant_block_names") if k in spec}
    # amp=False: fp32 throughout (with amp, auto-round casts the model to bf16 on CPUs that support it, so its
    # fake-quantized weights would depend on the machine)
    ar = AutoRound(model, tok, iters=0, disable_opt_rtn=True, nsamples=2, seqlen=8, amp=False,
                   dataset=["the quick brown fox jumps over the lazy dog"] * 4, **kw)
    ar.quantize_and_save(dst, format=spec["format"], inplace=False)
    # auto-round's own dequantized (fake-quantized) weights, what its packers wrote (GGUF export frees them)
    qdq = {n + ".weight": m.weight.detach().float().contiguous() for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and hasattr(m, "scale") and m.weight is not None}
    if qdq:
        save_file(qdq, dst + "/qdq.safetensors")
"""


def autoround_python() -> Path:
    """The auto-round venv's python, built once (minutes) and reused; pins added later are installed
    into an existing venv (the marker records what is in)."""
    py = AR_VENV / "bin" / "python"
    marker = AR_VENV / ".complete"
    have = marker.read_text().split() if marker.exists() else []
    if all(p in have for p in AR_PINS):
        return py
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AR_VENV)], check=True)
    for pin in AR_PINS:
        if pin not in have:
            subprocess.run([str(py), "-m", "pip", "install", "-q", pin], check=True)
    marker.write_text(" ".join(AR_PINS))
    return py


def autoround_produce(jobs: list[tuple[Path, Path, dict]], timeout: int = 900) -> None:
    """auto-round RTN (iters=0) exports, all in one subprocess. Each job: (src, dst, spec) with spec the
    AutoRound arguments (bits, group_size, sym, layer_config, to_quant_block_names) and "format" (its
    export format string). dst/qdq.safetensors gets auto-round's fake-quantized weights when it keeps them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               AUTO_ROUND_GGUF_AUTO_UPDATE="0")
    r = subprocess.run([str(autoround_python()), "-c", _AR_PRODUCE,
                        json.dumps([[str(a), str(b), spec] for a, b, spec in jobs])],
                       capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"auto-round producer failed:\n{r.stderr[-4000:]}")
