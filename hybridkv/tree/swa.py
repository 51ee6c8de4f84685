"""The SWA part of the radix tree: device SWA KV, tombstones, SWA locks and SWA eviction.

A node's ``swa`` says whether its tokens' device SWA KV exists (reached through the
allocator's full->SWA map); ``False`` with full KV on device is a tombstone. A prefix is
usable for SWA layers only if its last window has SWA KV (on device or host)::

    positions: 0 ....... L-w ....... L
    SWA:       [tomb ][ present ........]   usable: [L-w, L) all present

SWA eviction tombstones (internal nodes keep their full KV) by one of two policies:
``"window"`` keeps each cached branch's last window whole as long as anything of the
branch is cached; ``"lru"`` (SGLang's) drops leaves and tombstones internal nodes in plain
LRU order. Only models with sliding-window layers have this part.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from typing import TYPE_CHECKING

import torch

from hybridkv.errors import ensure
from hybridkv.tree.lru import LazyHeap, pop_older
from hybridkv.tree.node import Node
from hybridkv.tree.parts import LockHandle, Part

if TYPE_CHECKING:
    from hybridkv.tree.radix import RadixTree

SWA_EVICTION_POLICIES = ("window", "lru")


def _candidate(node: Node) -> bool:
    return node.swa and node.swa_lock == 0 and node.parent is not None


def _unpinned(node: Node) -> int:
    """Tokens of ``node`` before its first partial SWA pin (all of them without one)."""
    return (node.swa_pins[0] if node.swa_pins else node.end) - node.start


def _evictable(node: Node) -> int:
    """Tokens of ``node``'s device SWA KV that no SWA lock pins."""
    return _unpinned(node) if node.swa and node.swa_lock == 0 else 0


def _pin(node: Node, start: int, delta: int) -> None:
    """Add (``+1``) or remove (``-1``) what a lock pinning SWA from ``start`` holds of
    ``node``: a lock count, a partial pin or nothing."""
    if start <= node.start:
        ensure(node.swa_lock + delta >= 0, "unlocking an unlocked node")
        node.swa_lock += delta
    elif start < node.end:
        pins = node.swa_pins
        if delta > 0:
            insort(pins, start)
        else:
            i = bisect_left(pins, start)
            ensure(i < len(pins) and pins[i] == start, "unpinning an unpinned position")
            del pins[i]


class SWAPart(Part):
    """Device SWA KV of a tree with window ``window`` tokens, evicted by ``policy``."""

    COUNTERS = ("cached", "evictable")

    def __init__(self, tree: RadixTree, window: int, policy: str) -> None:
        self.tree = tree
        self.window = window
        self.policy = policy
        self.page_size = tree.page_size
        self.cached = 0  # tokens with device SWA KV
        self.evictable = 0  # of those, in nodes without an SWA lock
        self.lru = LazyHeap(tree.undo)  # unlocked SWA nodes (window policy: maybe unprotected)
        self.kept = LazyHeap(tree.undo)  # unlocked SWA nodes found protected (window policy)
        tree.root.swa, tree.root.swa_lock = True, 1  # never evicted

    def heaps(self) -> tuple[LazyHeap, ...]:
        return (self.lru, self.kept)

    def window_start(self, end: int) -> int:
        """First position (page aligned) of the window ending at ``end``."""
        start = max(0, end - self.window)
        return start - start % self.page_size

    # ---------------------------------------------------------------- match

    def usable(self, nodes: list[Node]) -> list[bool]:
        ok, run_start = [], 0
        for node in nodes:
            if not node.swa and node.host_swa is None:
                run_start = node.end
                ok.append(False)
            else:
                ok.append(run_start == 0 or node.end - run_start >= self.window)
        return ok

    def window_to_load(self, nodes: list[Node]) -> tuple[list[Node], list[Node]]:
        """For a usable matched path ``nodes``: the path again (split at the last window's
        start if some of the window's SWA KV is only on host) and the window's nodes whose
        SWA KV must be loaded back."""
        start = self.window_start(nodes[-1].end)
        if all(n.swa or n.end <= start for n in nodes):
            return nodes, []
        # NOTE: split at the window start: only the window's SWA is loaded back.
        self.tree.split_at(nodes[-1], start)
        nodes = list(reversed(nodes[-1].path()))
        return nodes, [n for n in nodes if n.start >= start and not n.swa]

    # ---------------------------------------------------------------- locks

    def lock_start(self, node: Node, swa_start: int | None) -> int:
        """Where a lock on ``node`` starts pinning SWA (default: its last window). It may lie
        inside a node (a partial pin, no split), except inside a tombstone: that is split
        there, so only the pinned part is loaded back."""
        if swa_start is None:
            swa_start = self.window_start(node.end)
        swa_start = min(swa_start, node.end)
        ensure(swa_start % self.page_size == 0, "an SWA pin inside a page")
        n = node
        while n.start > swa_start:
            n = n.parent
        if not n.swa and n.start < swa_start < n.end:
            self.tree.split(n, swa_start - n.start)
        return swa_start

    def on_lock(self, handle: LockHandle, locked: list[Node]) -> None:
        self._move_pin(handle.node, handle.node.end, handle.swa_start)

    def on_unlock(self, handle: LockHandle, unlocked: list[Node]) -> None:
        self._move_pin(handle.node, handle.swa_start, handle.node.end)

    def slide_locks(self, handles: list[LockHandle], starts: list[int]) -> list[LockHandle]:
        """See :meth:`RadixTree.slide_swa_locks`."""
        moved = []
        for handle, start in zip(handles, starts, strict=True):
            node, old = handle.node, handle.swa_start
            start = min(start, node.end)
            ensure(start >= old, "an SWA pin only slides forward")
            ensure(start % self.page_size == 0, "an SWA pin inside a page")
            self._move_pin(node, old, start)
            moved.append(LockHandle(node, start))
        return moved

    def _move_pin(self, node: Node, old: int, new: int) -> None:
        """Move one lock's SWA pin on the path to ``node`` from position ``old`` to ``new``
        (``node.end``: no pin). Only the nodes between the two change (walking parents)."""
        if old == new:
            return
        lo, hi = min(old, new), max(old, new)
        n = node
        while n.start >= hi:  # pinned whole either way
            n = n.parent
        while n.parent is not None and n.end > lo:
            before, locked = _evictable(n), n.swa_lock
            self.tree.undo.save(n, "swa_lock", "swa_pins")
            _pin(n, old, -1)
            _pin(n, new, +1)
            self.evictable += _evictable(n) - before
            if locked and _candidate(n):
                self.lru.push(n)
            n = n.parent

    # ---------------------------------------------------------------- insert and split

    def cut(self, node: Node, at: int) -> Node | None:
        """Before an insert gives ``node`` the caller's SWA KV from ``at`` on: split a
        tombstone there (the upper part stays one); return the upper part, if any."""
        if node.swa or not node.start < at < node.end:
            return None
        return self.tree.split(node, at - node.start)

    def on_cache(self, node: Node, slots: torch.Tensor, swa_from: int, adopted: bool) -> None:
        if node.swa or node.start < swa_from:
            return
        if not adopted:
            self.tree.allocator.adopt_swa(node.full, slots[node.start : node.end])
        self.restore(node)

    def restore(self, node: Node) -> None:
        """``node``'s device SWA KV is mapped again (adopted or loaded back)."""
        self.tree.undo.save(node)
        node.swa = True
        self.cached += len(node)
        self.evictable += _evictable(node)
        self.queue(node)

    def on_split(self, upper: Node, lower: Node, k: int) -> None:
        """Partial pins before the cut stay partial pins of ``upper`` and become lock counts
        of ``lower``, as does one at the cut; those after it stay ``lower``'s. The evictable
        tokens of the two parts add up to those of the node."""
        at, pins = lower.start + k, lower.swa_pins
        upper.swa, upper.swa_lock = lower.swa, lower.swa_lock
        if pins:
            upper.swa_pins = pins[: bisect_left(pins, at)]
            through = bisect_right(pins, at)
            lower.swa_lock += through
            del pins[:through]
        self.queue(upper)

    def queue(self, node: Node) -> None:
        """Queue ``node`` for SWA eviction if it is a candidate (protection is found on pop)."""
        if _candidate(node):
            self.lru.push(node)

    # ---------------------------------------------------------------- evict

    def on_drop(self, node: Node) -> None:
        if node.swa:
            self.cached -= len(node)
            self.evictable -= _evictable(node)
            self.tree.undo.save(node)
            node.swa = False

    def evict(self, target: int, dropped: list[torch.Tensor], tombstoned: list[Node]) -> None:
        """Free ``target`` device SWA tokens by the policy: tombstoned nodes are appended to
        ``tombstoned`` (the tree frees their SWA KV), dropped full slots to ``dropped``."""
        if target <= 0:
            return
        if self.policy == "window":
            freed = self.tombstone_unprotected(target, tombstoned)
            self.tombstone_lru(target - freed, tombstoned)
        else:
            self.evict_lru(target, dropped, tombstoned)

    def evict_lru(self, target: int, dropped: list[torch.Tensor], tombstoned: list[Node]) -> None:
        """Free ``target`` SWA tokens in LRU order: drop leaves, tombstone internal nodes."""
        full = self.tree.full_part
        start = self.cached
        while start - self.cached < target:
            node = pop_older(self.lru, self.kept, _candidate)
            if node is None:
                break
            if full.droppable(node, set()):
                self.tree.drop([node], dropped)
            else:
                self.tombstone(node, tombstoned)

    def tombstone_unprotected(self, target: int, tombstoned: list[Node]) -> int:
        """Tombstone SWA KV outside every branch's last window, LRU first; tokens freed.

        A branch ends at a leaf or a fork (where requests diverged, so where later ones
        will end their match); its last ``window`` tokens are protected. A candidate's
        protection is computed when it is popped (:meth:`protected_from`); one found
        protected moves to the protected heap, and :meth:`on_branch_grew` moves nodes back
        when their branch end moves down.
        """
        freed = 0
        while freed < target:
            node = self.lru.pop(_candidate)
            if node is None:
                break
            protected = self.protected_from(node)
            if protected <= node.start:
                self.kept.push(node)
                continue
            if protected < node.end:
                self.kept.push(node)  # the lower part stays, protected
                node = self.tree.split(node, protected - node.start)
            freed += self.tombstone(node, tombstoned)
        return freed

    def tombstone_lru(self, target: int, tombstoned: list[Node]) -> int:
        """Tombstone any unlocked SWA KV, least recently used first; tokens freed."""
        freed = 0
        while freed < target:
            node = pop_older(self.lru, self.kept, _candidate)
            if node is None:
                break
            freed += self.tombstone(node, tombstoned)
        return freed

    def tombstone(self, node: Node, tombstoned: list[Node]) -> int:
        """Drop a node's device SWA KV up to its first partial pin (the tree frees it; the
        pinned rest is split off and keeps it); keep its full KV. Tokens freed."""
        ensure(node.swa and node.swa_lock == 0, "tombstoning a locked or absent SWA node")
        if node.swa_pins:
            node = self.tree.split(node, _unpinned(node))
        self.tree.undo.save(node)
        node.swa = False
        tombstoned.append(node)
        self.cached -= len(node)
        self.evictable -= len(node)
        return len(node)

    def branch_end(self, node: Node) -> int:
        """End of the branch through ``node``: the first leaf or fork at or below it."""
        while len(node.children) == 1:
            (node,) = node.children.values()
        return node.end

    def protected_from(self, node: Node) -> int:
        """The first position of ``node`` inside its branch's last window (O(chain below))."""
        return self.window_start(self.branch_end(node))

    def on_branch_grew(self, node: Node) -> None:
        """``node``'s branch end (and that of the single-child chain above it) moved down,
        so some protected SWA candidates on that chain are now unprotected. Queue them as
        such (walking up at most a window)."""
        if self.policy != "window" or node.parent is None:
            return
        old = self.window_start(node.end)
        new = self.protected_from(node)
        while True:
            if node.start < new and _candidate(node):
                self.lru.push(node)
            parent = node.parent
            if node.start < old or parent.parent is None or len(parent.children) != 1:
                return
            node = parent

    # ---------------------------------------------------------------- check

    def check(self, nodes: list[Node]) -> None:
        swa_map = self.tree.allocator.full_to_swa
        cached = evictable = 0
        for node in nodes:
            pins = node.swa_pins
            ensure(node.swa_lock >= 0, "a negative SWA lock")
            ensure(node.full_lock >= node.swa_lock + len(pins), "an SWA lock without a full lock")
            ensure(not pins or node.swa, "a partial SWA pin on a tombstone")
            ensure(
                all(node.start < p < node.end and p % self.page_size == 0 for p in pins)
                and pins == sorted(pins),
                "a partial SWA pin out of its node or order",
            )
            if not node.on_device:
                ensure(not node.swa, "an SWA host-only node")
                continue
            mapped = swa_map[node.full] != 0
            present = bool(mapped.all()) if node.swa else not bool(mapped.any())
            ensure(present, "SWA map mismatch")
            if node.swa:
                cached += len(node)
                evictable += _evictable(node)
        ensure((cached, evictable) == (self.cached, self.evictable), "SWA counters")
        candidates = [n for n in nodes if _candidate(n)]
        self.lru.check([], "swa")
        self.kept.check([], "protected swa")
        for n in candidates:
            queued = n.uid in self.lru.queued or n.uid in self.kept.queued
            ensure(queued, "swa LRU misses a candidate")
        if self.policy == "window":
            unprotected = [n for n in candidates if self.protected_from(n) > n.start]
            self.lru.check(unprotected, "unprotected swa")
