"""hybridkv: a Triton-kernel-first KV-cache memory manager for hybrid LLM serving."""

from hybridkv.scheduler import CacheConfig, MemoryManager, Request, ScheduledReq, StepPlan

__all__ = ["CacheConfig", "MemoryManager", "Request", "ScheduledReq", "StepPlan"]
__version__ = "0.1.0"
