"""Device eviction for the radix tree: full (remove leaves) and SWA (tombstone) targets."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

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
        LRU order. All victims are freed with one call per pool.
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
            self.allocator.free_swa(torch.cat(tombstoned))
        if dropped:
            self.allocator.free(torch.cat(dropped))
        return EvictResult(full, swa)

    def _evict_leaves(self, target: int, dropped: list[torch.Tensor]) -> EvictResult:
        """Drop unlocked device leaves, least recently used first, until ``target`` tokens."""
        return self._drop_all(self._pick_leaves(target), dropped)

    def _pick_leaves(self, target: int) -> list[Node]:
        """Device leaves to drop for ``target`` tokens, LRU first, cascading (no mutation)."""
        heap = [(n.last_access, n.uid, n) for n in self._nodes() if self._droppable(n, set())]
        heapq.heapify(heap)
        picked: list[Node] = []
        gone: set[int] = set()
        total = 0
        while heap and total < target:
            _, _, node = heapq.heappop(heap)
            picked.append(node)
            gone.add(node.uid)
            total += len(node)
            parent = node.parent
            if parent is not None and self._droppable(parent, gone):
                heapq.heappush(heap, (parent.last_access, parent.uid, parent))
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
        heap = [(n.last_access, n.uid, n) for n in self._nodes() if n.swa and n.swa_lock == 0]
        heapq.heapify(heap)
        full = swa = 0
        while heap and swa < target:
            _, _, node = heapq.heappop(heap)
            if not node.on_device or not node.swa or node.parent is None:
                continue  # dropped or tombstoned since it was queued
            if self._droppable(node, set()):
                parent = node.parent
                more = self._drop_all([node], dropped)
                full, swa = full + more.full, swa + more.swa
                if parent.swa and parent.swa_lock == 0 and self._droppable(parent, set()):
                    heapq.heappush(heap, (parent.last_access, parent.uid, parent))
            else:
                swa += self._tombstone(node, tombstoned)
        return EvictResult(full, swa)

    def _tombstone_unprotected(self, target: int, tombstoned: list[torch.Tensor]) -> int:
        """Tombstone SWA KV outside every branch's last window, LRU first; tokens freed.

        A branch ends at a leaf or a fork (where requests diverged, so where later ones
        will end their match); its last ``window`` tokens are protected.
        """
        if target <= 0:
            return 0
        protected = self._protected_from()
        victims = [
            n for n in self._nodes() if n.swa and n.swa_lock == 0 and protected[n.uid] > n.start
        ]
        victims.sort(key=lambda n: (n.last_access, n.uid))
        freed = 0
        for node in victims:
            if freed >= target:
                break
            if protected[node.uid] < node.end:
                node = self._split(node, protected[node.uid] - node.start)
            freed += self._tombstone(node, tombstoned)
        return freed

    def _tombstone_lru(self, target: int, tombstoned: list[torch.Tensor]) -> int:
        """Tombstone any unlocked SWA KV, least recently used first; tokens freed."""
        if target <= 0:
            return 0
        victims = [n for n in self._nodes() if n.swa and n.swa_lock == 0]
        victims.sort(key=lambda n: (n.last_access, n.uid))
        freed = 0
        for node in victims:
            if freed >= target:
                break
            freed += self._tombstone(node, tombstoned)
        return freed

    def _protected_from(self) -> dict[int, int]:
        """For each node (by uid), the first position of it inside some branch's last window."""
        nearest_end: dict[int, int] = {}
        for node in reversed(self._nodes()):  # children before parents
            if len(node.children) == 1:
                (child,) = node.children.values()
                nearest_end[node.uid] = nearest_end[child.uid]
            else:
                nearest_end[node.uid] = node.end
        ps = self.page_size
        out = {}
        for uid, end in nearest_end.items():
            start = max(0, end - self.window)
            out[uid] = start - start % ps
        return out

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
        if not node.on_host:
            assert not node.children, "a node without KV anywhere has children"
            self._detach(node)
        return n, swa

    def _tombstone(self, node: Node, tombstoned: list[torch.Tensor]) -> int:
        """Drop a node's device SWA KV (queued for freeing); keep its full KV."""
        assert node.swa and node.swa_lock == 0
        node.swa = False
        tombstoned.append(node.full)
        self.cached_swa -= len(node)
        self.evictable_swa -= len(node)
        return len(node)
