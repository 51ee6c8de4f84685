"""The unified radix tree: components, match/insert/evict."""

from hybridkv.tree.evict import EvictParams, EvictResult
from hybridkv.tree.host import WRITE_POLICIES, HostTier, Transfers
from hybridkv.tree.node import Node
from hybridkv.tree.radix import SWA_EVICTION_POLICIES, LockHandle, MatchResult, RadixTree

__all__ = [
    "SWA_EVICTION_POLICIES",
    "EvictParams",
    "EvictResult",
    "HostTier",
    "LockHandle",
    "MatchResult",
    "Node",
    "RadixTree",
    "Transfers",
    "WRITE_POLICIES",
]
