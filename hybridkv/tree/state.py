"""The recurrent-state part of the radix tree: state snapshots (the mamba component).

A node's snapshot (``state``) is the recurrent state after exactly its ``end`` tokens (a
split keeps it on the lower part). A match is usable for recurrent layers only where it
ends at a snapshot; the request's working slot is then filled by copy, so the snapshot
stays intact. Snapshots are evicted by their own target, LRU, never while pinned
(``state_lock``: a copy from it is pending); the part counts the pinned ones. Only models
with recurrent layers have this part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hybridkv.allocator import StatePool
from hybridkv.errors import ensure
from hybridkv.tree.lru import LazyHeap, pop_unheld
from hybridkv.tree.node import Node
from hybridkv.tree.parts import Part

if TYPE_CHECKING:
    from hybridkv.tree.radix import RadixTree


def _has_state(node: Node) -> bool:
    return node.state is not None and node.parent is not None


def _pinned(node: Node) -> bool:
    return node.state is not None and node.state_lock > 0


class StatePart(Part):
    """Device snapshots in the state pool ``pool``: counters and the snapshot LRU."""

    COUNTERS = ("cached", "pinned")

    def __init__(self, tree: RadixTree, pool: StatePool) -> None:
        self.tree = tree
        self.pool = pool
        self.cached = 0  # device snapshots
        self.pinned = 0  # of those, with a state lock
        self.lru = LazyHeap(tree.undo)  # device snapshots

    def heaps(self) -> tuple[LazyHeap, ...]:
        return (self.lru,)

    def _slots(self, slots: list[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.int64, device=self.pool.device)

    @property
    def free_count(self) -> int:
        """Free state slots."""
        return self.pool.allocator.free_page_count

    def alloc(self) -> int | None:
        """One free state slot, or None."""
        got = self.pool.allocator.alloc_pages(1)
        return None if got is None else int(got[0])

    def attach(self, node: Node, slot: int, owned: bool) -> bool:
        """See :meth:`RadixTree.attach_state`."""
        if node.state is not None or node is self.tree.root:
            if owned:
                self.pool.allocator.free_pages(self._slots([slot]))
            return node.state is not None
        if not owned:
            got = self.tree.alloc_state()
            if got is None:
                return False
            self.pool.copy(self._slots([slot]), self._slots([got]))
            slot = got
        self.set(node, slot)
        return True

    def set(self, node: Node, slot: int) -> None:
        """Give ``node`` (without a snapshot) the snapshot in ``slot``."""
        self.tree.undo.save(node)
        node.state = slot
        self.cached += 1
        self.pinned += node.state_lock > 0
        self.lru.push(node)

    def pin(self, node: Node, delta: int) -> None:
        """Pin (``+1``) or unpin (``-1``) ``node``'s snapshot, counting the pinned ones."""
        before = _pinned(node)
        self.tree.undo.save(node)
        node.state_lock += delta
        ensure(node.state_lock >= 0, "unpinning an unpinned snapshot")
        self.pinned += _pinned(node) - before

    def pick(self, count: int) -> list[Node]:
        """The ``count`` least recently used unpinned snapshots (dequeued, not yet freed)."""
        return pop_unheld(self.lru, count, _has_state, lambda n: n.state_lock > 0)

    def free(self, nodes: list[Node]) -> None:
        """Free the snapshots of ``nodes``; a pinned one is refused (``CheckError``)."""
        nodes = [n for n in nodes if n.state is not None]
        if not nodes:
            return
        ensure(all(n.state_lock == 0 for n in nodes), "freeing a pinned snapshot")
        self.pool.allocator.free_pages(self._slots([n.state for n in nodes]))
        for n in nodes:
            self.tree.undo.save(n)
            n.state = None
        self.cached -= len(nodes)

    def held(self) -> list[int]:
        """The device state slots the tree holds."""
        return [n.state for n in self.tree.nodes() if n.state is not None]

    def usable(self, nodes: list[Node]) -> list[bool]:
        return [n.state is not None or n.host_state is not None for n in nodes]

    def before_drop(self, victims: list[Node]) -> None:
        ensure(not any(_pinned(n) for n in victims), "dropping a node whose snapshot is pinned")

    def on_drop(self, node: Node) -> None:
        self.free([node])

    def check(self, nodes: list[Node]) -> None:
        held = [n.state for n in nodes if n.state is not None]
        ensure(len(held) == len(set(held)) == self.cached, "state snapshots drifted")
        ensure(all(n.state_lock >= 0 for n in nodes), "a negative state lock")
        ensure(sum(_pinned(n) for n in nodes) == self.pinned, "pinned snapshot count drifted")
        self.lru.check([n for n in nodes if n.state is not None], "state")
