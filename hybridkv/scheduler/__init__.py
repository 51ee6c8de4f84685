"""Cost accounting, admission, retraction and the engine facade."""

from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.cost import Cost, cost
from hybridkv.scheduler.manager import MemoryManager
from hybridkv.scheduler.plan import PageTable, Request, ScheduledReq, StepPlan

__all__ = [
    "CacheConfig",
    "Cost",
    "MemoryManager",
    "PageTable",
    "Request",
    "ScheduledReq",
    "StepPlan",
    "cost",
]
