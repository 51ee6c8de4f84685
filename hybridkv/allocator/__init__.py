"""Page allocators and pools: full, SWA (+ full->SWA map), host."""

from hybridkv.allocator.arena import Arena, ArenaLayout
from hybridkv.allocator.host import HostPool
from hybridkv.allocator.kv_pool import KVPool
from hybridkv.allocator.paged import PagedAllocator
from hybridkv.allocator.state_pool import StatePool
from hybridkv.allocator.swa import SWAAllocator

__all__ = [
    "Arena",
    "ArenaLayout",
    "HostPool",
    "KVPool",
    "PagedAllocator",
    "StatePool",
    "SWAAllocator",
]
