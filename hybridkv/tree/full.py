"""The full-KV part of the radix tree: device full slots and full eviction.

A node's ``full`` is its device full slots (one per token), ``None`` once dropped from the
device. Full eviction drops unlocked device leaves, least recently used first, cascading
to parents that become leaves; the candidates wait in a :class:`LazyHeap`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hybridkv.errors import ensure
from hybridkv.tree.lru import LazyHeap
from hybridkv.tree.node import Node
from hybridkv.tree.parts import LockHandle, Part

if TYPE_CHECKING:
    from hybridkv.tree.radix import RadixTree


class FullPart(Part):
    """Device full KV: counters and the full eviction LRU."""

    COUNTERS = ("cached", "evictable")

    def __init__(self, tree: RadixTree) -> None:
        self.tree = tree
        self.cached = 0  # tokens with device full KV
        self.evictable = 0  # of those, in nodes without a full lock
        self.lru = LazyHeap(tree.undo)  # device nodes droppable for full eviction

    def heaps(self) -> tuple[LazyHeap, ...]:
        return (self.lru,)

    def evict(self, target: int, dropped: list[torch.Tensor]) -> None:
        """Drop unlocked device leaves, least recently used first, until ``target`` tokens
        (their full slots queued on ``dropped``)."""
        if target > 0:
            self.tree.drop(self.pick_leaves(target), dropped)

    def pick_leaves(self, target: int) -> list[Node]:
        """Device leaves to drop for ``target`` tokens, LRU first, cascading (no mutation)."""
        picked: list[Node] = []
        gone: set[int] = set()
        total = 0
        heap = self.lru
        while total < target:
            node = heap.pop(lambda n: self.droppable(n, gone))
            if node is None:
                break
            picked.append(node)
            gone.add(node.uid)
            total += len(node)
            parent = node.parent
            if parent is not None and self.droppable(parent, gone):
                heap.push(parent)
        return picked

    def droppable(self, node: Node, gone: set[int]) -> bool:
        """An unlocked device node none of whose children (but those in ``gone``) is on device."""
        if node.parent is None or not node.on_device or node.full_lock:
            return False
        return all(not c.on_device or c.uid in gone for c in node.children.values())

    def queue(self, node: Node) -> None:
        """Queue ``node`` for full eviction if it is droppable."""
        if self.droppable(node, set()):
            self.lru.push(node)

    def attach(self, node: Node, slots: torch.Tensor) -> None:
        """Give a node without device KV the device full slots ``slots`` of its tokens."""
        self.tree.undo.save(node)
        node.full = slots
        self.cached += len(node)
        self.evictable += len(node) if node.full_lock == 0 else 0
        self.queue(node)

    def on_split(self, upper: Node, lower: Node, k: int) -> None:
        if lower.full is not None:
            upper.full, lower.full = lower.full[:k], lower.full[k:]

    def on_cache(self, node: Node, slots: torch.Tensor, swa_from: int, adopted: bool) -> None:
        if adopted:
            self.attach(node, slots[node.start : node.end])

    def on_lock(self, handle: LockHandle, locked: list[Node]) -> None:
        self.evictable -= sum(len(n) for n in locked)

    def on_unlock(self, handle: LockHandle, unlocked: list[Node]) -> None:
        for n in unlocked:
            self.evictable += len(n)
            self.queue(n)

    def on_drop(self, node: Node) -> None:
        self.cached -= len(node)
        self.evictable -= len(node)
        self.tree.undo.save(node)
        node.full = None

    def check(self, nodes: list[Node]) -> None:
        cached = evictable = 0
        for node in nodes:
            if not node.on_device:
                continue
            ensure(node.full.numel() == len(node), "a node's full slots are not its tokens")
            parent = node.parent
            ensure(
                parent is self.tree.root or parent.on_device, "a device node under a host-only one"
            )
            cached += len(node)
            evictable += len(node) if node.full_lock == 0 else 0
        ensure((cached, evictable) == (self.cached, self.evictable), "full counters")
        self.lru.check([n for n in nodes if self.droppable(n, set())], "full")
