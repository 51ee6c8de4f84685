"""The unified radix tree: the structure (radix) and its parts (full, swa, state, host)."""

from hybridkv.tree.full import FullPart
from hybridkv.tree.host import HostPart
from hybridkv.tree.node import Node
from hybridkv.tree.parts import LockHandle, Part
from hybridkv.tree.radix import EvictParams, EvictResult, MatchResult, RadixTree
from hybridkv.tree.state import StatePart
from hybridkv.tree.swa import SWA_EVICTION_POLICIES, SWAPart
from hybridkv.tree.tier import WRITE_POLICIES, HostTier, Transfers

__all__ = [
    "SWA_EVICTION_POLICIES",
    "EvictParams",
    "EvictResult",
    "FullPart",
    "HostPart",
    "HostTier",
    "LockHandle",
    "MatchResult",
    "Node",
    "Part",
    "RadixTree",
    "SWAPart",
    "StatePart",
    "Transfers",
    "WRITE_POLICIES",
]
