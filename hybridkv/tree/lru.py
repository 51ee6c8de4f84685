"""Eviction candidates in LRU order without scanning the tree: lazy heaps of nodes.

A :class:`LazyHeap` holds at most one entry ``(last_access, uid, node)`` per node. Two
rules keep it exact while costing nothing on the hot paths:

* **Keys only grow.** A node's ``last_access`` never decreases, so a match or an insert
  that touches a node leaves its entry's key stale (smaller) rather than pushing a new one.
  A stale top is re-keyed when it reaches the top; every candidate then has an entry with a
  key at most its current one, so the first valid entry with a current key is the exact
  least recently used candidate, ties broken by ``uid``.
* **Validity is checked on pop.** A node that stopped being a candidate (locked, dropped,
  tombstoned, detached) keeps its entry until it reaches the top and is then dropped; the
  tree pushes a node again whenever it may have become a candidate (unlock, a child gone,
  load back, backup, a new node). Pushing a node that is already queued does nothing.

So a call costs O((victims + entries it skips) * log n), and every entry skipped was paid
for by the push that made it. Entries of nodes detached from the tree are dropped by
:meth:`compact`, which the tree calls once they could make up half the heap.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from hybridkv.errors import ensure
from hybridkv.tree.node import Node
from hybridkv.undo import UndoLog


class LazyHeap:
    """Nodes of one candidate kind, least recently used first (see the module docstring)."""

    __slots__ = ("heap", "queued", "_undo")

    def __init__(self, undo: UndoLog | None = None) -> None:
        self.heap: list[tuple[int, int, Node]] = []
        self.queued: set[int] = set()  # uids with an entry in ``heap``
        self._undo = undo or UndoLog()

    def _added(self, entry: tuple[int, int, Node]) -> None:
        """For the running step's undo: ``entry`` went in (its uid is queued)."""
        if self._undo.active:
            self._undo.on_undo(lambda: self._take_out(entry))

    def _removed(self, entry: tuple[int, int, Node]) -> None:
        """For the running step's undo: ``entry`` came out (its uid is no longer queued)."""
        if self._undo.active:
            self._undo.on_undo(lambda: self._put_in(entry))

    def _take_out(self, entry: tuple[int, int, Node]) -> None:
        self.heap.remove(entry)
        heapq.heapify(self.heap)
        self.queued.discard(entry[1])

    def _put_in(self, entry: tuple[int, int, Node]) -> None:
        heapq.heappush(self.heap, entry)
        self.queued.add(entry[1])

    def __len__(self) -> int:
        return len(self.heap)

    def push(self, node: Node) -> None:
        """Queue ``node`` (a possible candidate) unless it already has an entry."""
        if node.uid not in self.queued:
            entry = (node.last_access, node.uid, node)
            self._put_in(entry)
            self._added(entry)

    def peek(self, valid: Callable[[Node], bool]) -> Node | None:
        """The least recently used node for which ``valid`` holds (left queued), or None.

        Re-keys stale entries on the way and drops the entries of nodes that fail ``valid``.
        """
        heap, queued = self.heap, self.queued
        while heap:
            top = heap[0]
            key, uid, node = top
            if node.last_access != key:
                rekeyed = (node.last_access, uid, node)
                heapq.heapreplace(heap, rekeyed)
                self._removed(top)
                self._added(rekeyed)
            elif valid(node):
                return node
            else:
                heapq.heappop(heap)
                queued.discard(uid)
                self._removed(top)
        return None

    def pop(self, valid: Callable[[Node], bool]) -> Node | None:
        """Remove and return the least recently used node for which ``valid`` holds."""
        node = self.peek(valid)
        if node is not None:
            top = heapq.heappop(self.heap)
            self.queued.discard(node.uid)
            self._removed(top)
        return node

    def compact(self) -> None:
        """Drop the entries of nodes no longer in the tree (``parent is None``)."""
        kept = []
        for entry in self.heap:
            if entry[2].parent is not None:
                kept.append(entry)
            else:
                self._removed(entry)
        heapq.heapify(kept)
        self.heap = kept
        self.queued = {e[1] for e in kept}

    def check(self, candidates: list[Node], what: str) -> None:
        """Verify one entry per queued uid and an entry, keyed at most its current key, for
        every node of ``candidates`` (a full scan's answer); raise ``CheckError`` if not."""
        keys = {uid: key for key, uid, _ in self.heap}
        ensure(len(keys) == len(self.heap) and set(keys) == self.queued, f"{what} LRU entries")
        for node in candidates:
            key = keys.get(node.uid)
            ensure(key is not None and key <= node.last_access, f"{what} LRU misses a candidate")


def pop_older(a: LazyHeap, b: LazyHeap, valid: Callable[[Node], bool]) -> Node | None:
    """Remove and return the least recently used valid node of two heaps (a node queued in
    both is returned once: once it is no longer valid, its other entry is dropped)."""
    x, y = a.peek(valid), b.peek(valid)
    if x is None and y is None:
        return None
    if y is None or (x is not None and (x.last_access, x.uid) < (y.last_access, y.uid)):
        return a.pop(valid)
    return b.pop(valid)


def pop_unheld(
    heap: LazyHeap, count: int, valid: Callable[[Node], bool], held: Callable[[Node], bool]
) -> list[Node]:
    """Pop the ``count`` least recently used ``valid`` nodes not ``held`` (held ones, pinned
    by a pending copy, are skipped and stay queued)."""
    victims: list[Node] = []
    skipped: list[Node] = []
    while len(victims) < count:
        node = heap.pop(valid)
        if node is None:
            break
        (skipped if held(node) else victims).append(node)
    for node in skipped:
        heap.push(node)
    return victims
