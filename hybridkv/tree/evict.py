"""Device eviction for the radix tree: full (remove leaves) and SWA (tombstone) targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkv.tree.lru import pop_older
from hybridkv.tree.node import Node


@dataclass(frozen=True, slots=True)
class EvictParams:
    """Tokens to free in each pool."""

    full: int = 0
    swa: int = 0


@dataclass(frozen=True, slots=True)
class EvictResult:
    """Tokens freed in each pool (dropping a node's device KV frees both)."""

    full: int
    swa: int


class EvictionMixin:
    """Eviction of device KV; part of :class:`RadixTree` (uses its state and helpers).

    Dropping a node's device KV keeps the node when it has a host copy (it becomes
    host-only) and removes it otherwise. Under ``write_back`` the victims are backed up
    first, in one copy per pool.
    """

    def evict(self, params: EvictParams) -> EvictResult:
        """Free at least ``params.full`` / ``params.swa`` device tokens if that many are evictable.

        Full eviction drops unlocked device leaves in LRU order, cascading to parents that
        become leaves. SWA eviction under the ``"window"`` policy tombstones SWA KV outside
        every branch's last window first, then the rest LRU first, and never drops full KV;
        the ``"lru"`` policy (SGLang's) removes leaves and tombstones internal nodes in plain
        LRU order. All victims are freed with one call per pool. Candidates come from the
        LRU heaps (:mod:`hybridkv.tree.lru`): no scan of the tree.
        """
        dropped: list[torch.Tensor] = []
        tombstoned: list[torch.Tensor] = []
        freed = self._evict_leaves(params.full, dropped)
        full, swa = freed.full, freed.swa
        if self.window is not None and swa < params.swa:
            if self.swa_eviction == "window":
                swa += self._tombstone_unprotected(params.swa - swa, tombstoned)
                swa += self._tombstone_lru(params.swa - swa, tombstoned)
            else:
                more = self._evict_lru_swa(params.swa - swa, dropped, tombstoned)
                full, swa = full + more.full, swa + more.swa
        if tombstoned:
            self.allocator.free_swa(torch.cat(tombstoned), whole_pages=True)
        if dropped:
            self.allocator.free(torch.cat(dropped), whole_pages=True)
        return EvictResult(full, swa)

    def _evict_leaves(self, target: int, dropped: list[torch.Tensor]) -> EvictResult:
        """Drop unlocked device leaves, least recently used first, until ``target`` tokens."""
        if target <= 0:
            return EvictResult(0, 0)
        return self._drop_all(self._pick_leaves(target), dropped)

    def _pick_leaves(self, target: int) -> list[Node]:
        """Device leaves to drop for ``target`` tokens, LRU first, cascading (no mutation)."""
        picked: list[Node] = []
        gone: set[int] = set()
        total = 0
        heap = self._full_lru
        while total < target:
            node = heap.pop(lambda n: self._droppable(n, gone))
            if node is None:
                break
            picked.append(node)
            gone.add(node.uid)
            total += len(node)
            parent = node.parent
            if parent is not None and self._droppable(parent, gone):
                heap.push(parent)
        return picked

    def _drop_all(self, victims: list[Node], dropped: list[torch.Tensor]) -> EvictResult:
        if self.host is not None and self.host.write_policy == "write_back":
            self._backup([n for n in victims if not n.on_host])
        full = swa = 0
        for node in victims:
            full_n, swa_n = self._drop(node, dropped)
            full, swa = full + full_n, swa + swa_n
        return EvictResult(full, swa)

    def _evict_lru_swa(
        self, target: int, dropped: list[torch.Tensor], tombstoned: list[torch.Tensor]
    ) -> EvictResult:
        """Free ``target`` SWA tokens in LRU order: drop leaves, tombstone internal nodes."""
        full = swa = 0
        while swa < target:
            node = pop_older(self._swa_lru, self._swa_kept, _swa_candidate)
            if node is None:
                break
            if self._droppable(node, set()):
                more = self._drop_all([node], dropped)
                full, swa = full + more.full, swa + more.swa
            else:
                swa += self._tombstone(node, tombstoned)
        return EvictResult(full, swa)

    def _tombstone_unprotected(self, target: int, tombstoned: list[torch.Tensor]) -> int:
        """Tombstone SWA KV outside every branch's last window, LRU first; tokens freed.

        A branch ends at a leaf or a fork (where requests diverged, so where later ones
        will end their match); its last ``window`` tokens are protected. A candidate's
        protection is computed when it is popped (:meth:`_protected_from`); one found
        protected moves to the protected heap, and :meth:`_on_branch_grew` moves nodes back
        when their branch end moves down.
        """
        freed = 0
        while freed < target:
            node = self._swa_lru.pop(_swa_candidate)
            if node is None:
                break
            protected = self._protected_from(node)
            if protected <= node.start:
                self._swa_kept.push(node)
                continue
            if protected < node.end:
                self._swa_kept.push(node)  # the lower part stays, protected
                node = self._split(node, protected - node.start)
            freed += self._tombstone(node, tombstoned)
        return freed

    def _tombstone_lru(self, target: int, tombstoned: list[torch.Tensor]) -> int:
        """Tombstone any unlocked SWA KV, least recently used first; tokens freed."""
        freed = 0
        while freed < target:
            node = pop_older(self._swa_lru, self._swa_kept, _swa_candidate)
            if node is None:
                break
            freed += self._tombstone(node, tombstoned)
        return freed

    def _branch_end(self, node: Node) -> int:
        """End of the branch through ``node``: the first leaf or fork at or below it."""
        while len(node.children) == 1:
            (node,) = node.children.values()
        return node.end

    def _protected_from(self, node: Node) -> int:
        """The first position of ``node`` inside its branch's last window (O(chain below))."""
        start = max(0, self._branch_end(node) - self.window)
        return start - start % self.page_size

    def _on_branch_grew(self, node: Node) -> None:
        """``node``, a leaf or a fork, now has exactly one child: its branch end (and that of
        the single-child chain above it) moved down, so some protected SWA candidates on that
        chain are now unprotected. Queue them as such (walking up at most a window)."""
        if self.window is None or self.swa_eviction != "window" or node.parent is None:
            return
        ps = self.page_size
        old = max(0, node.end - self.window)
        old -= old % ps
        new = self._protected_from(node)
        while True:
            if node.start < new and _swa_candidate(node):
                self._swa_lru.push(node)
            parent = node.parent
            if node.start < old or parent.parent is None or len(parent.children) != 1:
                return
            node = parent

    def _queue_full(self, node: Node) -> None:
        """Queue ``node`` for full eviction if it is droppable."""
        if self._droppable(node, set()):
            self._full_lru.push(node)

    def _queue_swa(self, node: Node) -> None:
        """Queue ``node`` for SWA eviction if it is a candidate (protection is found on pop)."""
        if node.swa and node.swa_lock == 0 and node.parent is not None:
            self._swa_lru.push(node)

    def _check_lru(self) -> None:
        """Assert the LRU heaps hold every candidate a full scan finds."""
        nodes = self._nodes()
        assert self._live == len(nodes), "live node count"
        self._full_lru.check([n for n in nodes if self._droppable(n, set())], "full")
        swa = [n for n in nodes if _swa_candidate(n)]
        self._swa_lru.check([], "swa")
        self._swa_kept.check([], "protected swa")
        for n in swa:
            queued = n.uid in self._swa_lru.queued or n.uid in self._swa_kept.queued
            assert queued, "swa LRU misses a candidate"
        if self.window is not None and self.swa_eviction == "window":
            unprotected = [n for n in swa if self._protected_from(n) > n.start]
            self._swa_lru.check(unprotected, "unprotected swa")
        if self.host is not None:
            self._host_lru.check([n for n in nodes if self._host_leaf(n)], "host")
        self._state_lru.check([n for n in nodes if n.state is not None], "state")
        self._host_state_lru.check([n for n in nodes if n.host_state is not None], "host state")

    def _droppable(self, node: Node, gone: set[int]) -> bool:
        """An unlocked device node none of whose children (but those in ``gone``) is on device."""
        if node.parent is None or not node.on_device or node.full_lock:
            return False
        return all(not c.on_device or c.uid in gone for c in node.children.values())

    def _drop(self, node: Node, dropped: list[torch.Tensor]) -> tuple[int, int]:
        """Drop a device leaf's KV (queued for freeing); remove the node unless it is on host.

        Returns (full, swa) device tokens freed.
        """
        assert node.on_device and node.full_lock == 0
        n = len(node)
        dropped.append(node.full)
        self.cached_full -= n
        self.evictable_full -= n
        swa = 0
        if node.swa:
            self.cached_swa -= n
            self.evictable_swa -= n
            swa = n
        node.full, node.swa = None, False
        if node.state is not None:
            self._free_states([node])
        parent = node.parent
        if not node.on_host:
            assert not node.children, "a node without KV anywhere has children"
            self._detach(node)
        self._queue_full(parent)
        return n, swa

    def _tombstone(self, node: Node, tombstoned: list[torch.Tensor]) -> int:
        """Drop a node's device SWA KV (queued for freeing); keep its full KV."""
        assert node.swa and node.swa_lock == 0
        node.swa = False
        tombstoned.append(node.full)
        self.cached_swa -= len(node)
        self.evictable_swa -= len(node)
        return len(node)


def _swa_candidate(node: Node) -> bool:
    return node.swa and node.swa_lock == 0 and node.parent is not None
