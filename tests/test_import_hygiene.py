"""`import quantrt` stays cheap and device-neutral; runtime/ never touches torch.cuda or torch_npu.

DESIGN.md §1/§7: importing the package must not import vendor SDKs or initialise a device, and the
runtime asks the Platform instead of the hardware.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
HEAVY = ("torch_npu", "aiter", "intel_extension_for_pytorch", "triton")

IMPORT_SNIPPET = f"""
import json, sys
import quantrt, quantrt.platforms, quantrt.platform
import torch
print(json.dumps({{
    "heavy": [m for m in {HEAVY!r} if m in sys.modules],
    "platform_classes": sorted(m for m in sys.modules if m.startswith("quantrt.platforms.") and m.endswith("platform")),
    "cuda_initialized": torch.cuda.is_initialized(),
}}))
"""


def test_import_quantrt_is_light_and_touches_no_device() -> None:
    out = subprocess.run([sys.executable, "-c", IMPORT_SNIPPET], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"import quantrt pulled in {report['heavy']}"
    assert report["platform_classes"] == [], "a platform was resolved at import time"
    assert report["cuda_initialized"] is False


def _docstring_nodes(tree: ast.AST) -> set[int]:
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, nodes) and n.body and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }  # fmt: skip


def _violations(path: Path) -> list[str]:
    """Code (not comments or docstrings) in `path` that reaches torch.cuda or torch_npu."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docs, found = _docstring_nodes(tree), []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute) and node.attr == "cuda":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                found.append(f"{path}:{line}: torch.cuda")
        elif isinstance(node, ast.Name) and node.id == "torch_npu":
            found.append(f"{path}:{line}: torch_npu")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            mod = getattr(node, "module", None) or ""
            names = [mod] + [f"{mod}.{a.name}" if mod else a.name for a in node.names]
            if any(n == "torch_npu" or n.startswith(("torch_npu.", "torch.cuda")) for n in names):
                found.append(f"{path}:{line}: imports {names}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if "torch.cuda" in node.value or "torch_npu" in node.value:
                found.append(f"{path}:{line}: string mentions {node.value!r}")
    return found


def test_runtime_never_mentions_torch_cuda_or_torch_npu() -> None:
    files = sorted(RUNTIME.rglob("*.py"))
    assert files
    bad = [v for f in files for v in _violations(f)]
    assert bad == [], "the runtime must ask the Platform, not the hardware:\n" + "\n".join(bad)


def test_violation_finder_sees_code_but_not_comments(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        '"""Never use torch.cuda here."""\n# torch.cuda in a comment\nimport torch\ntorch.cuda.synchronize()\n'
    )
    assert [v.split(": ", 1)[1] for v in _violations(src)] == ["torch.cuda"]
    src.write_text('import importlib\nimportlib.import_module("torch_npu")\nfrom torch import cuda\n')
    assert len(_violations(src)) == 2
