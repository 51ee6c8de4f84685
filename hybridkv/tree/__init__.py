"""The unified radix tree: components, match/insert/evict."""

from hybridkv.tree.node import Node
from hybridkv.tree.radix import (
    SWA_EVICTION_POLICIES,
    EvictParams,
    EvictResult,
    LockHandle,
    MatchResult,
    RadixTree,
)

__all__ = [
    "SWA_EVICTION_POLICIES",
    "EvictParams",
    "EvictResult",
    "LockHandle",
    "MatchResult",
    "Node",
    "RadixTree",
]
