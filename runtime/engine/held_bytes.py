"""Bytes a loaded model holds: every distinct tensor storage reachable from it.

Kernels keep their repacked weights as plain attributes (not parameters), sometimes inside helper
objects (a packed GEMM, a closure), and may alias each other's storage; the KV budget must count
each storage once, whatever holds it.
"""

from __future__ import annotations

import types
from functools import partial

import torch

_ATOMS = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, type, types.ModuleType)


def held_bytes(root: object) -> int:
    """Sum of the distinct storages (by device and data pointer; opaque oneDNN tensors by identity)
    reachable from `root` through module/object attributes, containers and closures."""
    seen: set[int] = set()
    storages: dict[tuple, int] = {}
    stack = [root]
    while stack:
        o = stack.pop()
        if isinstance(o, _ATOMS) or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.is_mkldnn:  # oneDNN-blocked weights expose no storage
                storages[("mkldnn", id(o))] = o.numel() * o.element_size()
            elif o.device.type != "meta":
                s = o.untyped_storage()
                storages[(o.device, s.data_ptr())] = s.nbytes()
            continue
        if isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, types.FunctionType):
            for cell in o.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
        elif isinstance(o, partial):
            stack.extend((o.func, o.args, o.keywords))
        else:
            if hasattr(o, "__dict__"):
                stack.extend(vars(o).values())
            for name in getattr(type(o), "__slots__", ()):
                stack.append(getattr(o, name, None))
    return sum(storages.values())

