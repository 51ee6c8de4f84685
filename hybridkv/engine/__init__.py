"""A reference engine: Hugging Face causal LMs with full and sliding-window layers, run
through :class:`hybridkv.MemoryManager` (needs the ``hf`` extra: transformers).

    from hybridkv.engine import Engine
    eng = Engine(hf_model, full_tokens=4096, swa_tokens=1024, page_size=16)
    outputs = eng.generate([[1, 2, 3], [1, 2, 4]], max_new_tokens=16)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["FAMILIES", "Engine", "HFModel", "LayerSpec", "paged_attention_torch"]

if TYPE_CHECKING:
    from hybridkv.engine.attention import paged_attention_torch
    from hybridkv.engine.model import FAMILIES, HFModel, LayerSpec
    from hybridkv.engine.runner import Engine

_WHERE = {
    "FAMILIES": "model",
    "HFModel": "model",
    "LayerSpec": "model",
    "Engine": "runner",
    "paged_attention_torch": "attention",
}


def __getattr__(name: str) -> object:
    # NOTE: lazy, so `python -m hybridkv.engine` can set TRITON_INTERPRET before any kernel
    # is decorated (@triton.jit reads it then).
    if name in _WHERE:
        return getattr(importlib.import_module(f"hybridkv.engine.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'hybridkv.engine' has no attribute {name!r}")
