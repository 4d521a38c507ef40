"""The dtype names a config may give (`model.dtype`, `model.autocast_dtype`, `model.ref_dtype`, `rollout.dtype`)
and the torch dtypes they stand for: one table for the trainer, both rollout engines and `scripts/gpu_check.py`.

Imports torch only, so a machine without vLLM, Ray or the HTTP clients (the GPU check's) can use it.
"""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config's dtype name; a ValueError naming the choices for any other."""
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {name!r}")
    return TORCH_DTYPES[name]
