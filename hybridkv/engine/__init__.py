"""A reference engine: Hugging Face causal LMs with full and sliding-window layers, run
through :class:`hybridkv.MemoryManager` (needs the ``hf`` extra: transformers).

    from hybridkv.engine import Engine
    eng = Engine(hf_model, full_tokens=4096, swa_tokens=1024, page_size=16)
    outputs = eng.generate([[1, 2, 3], [1, 2, 4]], max_new_tokens=16)
"""

from __future__ import annotations

from hybridkv.engine.attention import paged_attention_torch, paged_kv
from hybridkv.engine.model import FAMILIES, HFModel, LayerSpec
from hybridkv.engine.runner import Engine

__all__ = ["FAMILIES", "Engine", "HFModel", "LayerSpec", "paged_attention_torch", "paged_kv"]
