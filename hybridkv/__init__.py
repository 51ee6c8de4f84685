"""hybridkv: a Triton-kernel-first KV-cache memory manager for hybrid LLM serving."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["CacheConfig", "MemoryManager", "Request", "ScheduledReq", "StepPlan"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from hybridkv.scheduler import CacheConfig, MemoryManager, Request, ScheduledReq, StepPlan


def __getattr__(name: str) -> object:
    # NOTE: lazy, so `python -m hybridkv` can set TRITON_INTERPRET before any kernel is
    # decorated (@triton.jit reads it then).
    if name in __all__:
        return getattr(importlib.import_module("hybridkv.scheduler"), name)
    raise AttributeError(f"module 'hybridkv' has no attribute {name!r}")
