"""Shared fixtures: tiny checkpoints are built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is first decorated, and several libraries (bitsandbytes,
# our ROCm kernels) import triton while tests are collected: set it before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers_models import ARCHS, build_model, build_tokenizer


@pytest.fixture(scope="session", autouse=True)
def keep_canonical_moe_weights():
    """MoE tests compare the canonical expert weights with the checkpoint: keep them after loading
    (production drops them; tests/test_weight_memory.py checks that with this switched off)."""
    from quantrt.layers.moe.layer import FusedMoE

    FusedMoE.keep_canonical = True
    yield


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir):
    """arch -> (model dir, the transformers model object)."""
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(f"tiny_{arch}")
        out[arch] = (d, build_model(arch, d, tokenizer_dir))
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked `gluon_compile` run first. Triton 3.6's interpreter leaves triton.language.core's builtins
    (program_id, arange, load, ...) patched after an interpreted kernel has called one of triton's own jit
    functions; a Gluon kernel compiled for sm_90 after that builds its IR through the interpreter's versions and
    fails. Order otherwise unchanged (stable sort)."""
    items.sort(key=lambda item: item.get_closest_marker("gluon_compile") is None)
