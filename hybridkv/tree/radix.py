"""The unified radix tree: a compact prefix tree keyed by pages of token ids.

Each node caches whole pages: an unaligned tail is never cached. A node's full KV is its
``full`` slots; its SWA KV is what the allocator's map gives for them (a node is either
all present or all tombstoned: splits keep it so). Memory work is batched: a match or an
insert frees with one allocator call, an eviction with one call per pool.

SWA usability of a match (window ``w``)::

    positions: 0 ....... L-w ....... L
    SWA:       [tomb ][ present ........]   usable: [L-w, L) all present
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch

from hybridkv.allocator import SWAAllocator
from hybridkv.tree.node import Node

SWA_EVICTION_POLICIES = ("window", "lru")


@dataclass(frozen=True, slots=True)
class MatchResult:
    """A device prefix: the full slots of ``length`` tokens, ending at ``last_node``."""

    prefix_slots: torch.Tensor
    last_node: Node

    @property
    def length(self) -> int:
        return self.prefix_slots.numel()


@dataclass(frozen=True, slots=True)
class LockHandle:
    """What ``inc_lock`` locked: the path to ``node``, SWA from position ``swa_start``."""

    node: Node
    swa_start: int


@dataclass(frozen=True, slots=True)
class EvictParams:
    """Tokens to free in each pool."""

    full: int = 0
    swa: int = 0


@dataclass(frozen=True, slots=True)
class EvictResult:
    """Tokens freed in each pool (removing a node frees both)."""

    full: int
    swa: int


class RadixTree:
    """Prefix cache over a :class:`SWAAllocator`.

    Args:
        allocator: the device pools; the tree frees into them.
        page_size: tokens per page; keys are whole pages.
        window: sliding window in tokens, or ``None`` for a model without SWA layers.
        swa_eviction: ``"window"`` keeps each cached branch's last window whole as long as
            anything of the branch is cached; ``"lru"`` tombstones in plain LRU order.
    """

    def __init__(
        self,
        allocator: SWAAllocator,
        page_size: int,
        window: int | None,
        swa_eviction: str = "window",
    ) -> None:
        if swa_eviction not in SWA_EVICTION_POLICIES:
            raise ValueError(f"swa_eviction must be one of {SWA_EVICTION_POLICIES}")
        self.allocator = allocator
        self.page_size = page_size
        self.window = window
        self.swa_eviction = swa_eviction
        empty = torch.empty(0, dtype=torch.int64, device=allocator.device)
        self._uids = itertools.count()
        self.root = Node(
            uid=next(self._uids), key=[], start=0, parent=None, full=empty, swa=window is not None
        )
        self.root.full_lock = self.root.swa_lock = 1  # never evicted
        self.cached_full = 0  # tokens with device full KV
        self.cached_swa = 0  # tokens with device SWA KV
        self.evictable_full = 0  # of those, in nodes without a full lock
        self.evictable_swa = 0  # of those, in nodes without an SWA lock
        self._clock = 0

    # ---------------------------------------------------------------- match

    def match_prefix(self, tokens: list[int], max_len: int | None = None) -> MatchResult:
        """Longest cached prefix of ``tokens[:max_len]`` usable by every layer kind.

        Splits the node the match ends in, so ``last_node`` ends exactly at the prefix.
        Updates LRU order of the matched nodes. Frees nothing, locks nothing.
        """
        limit = len(tokens) if max_len is None else min(max_len, len(tokens))
        limit -= limit % self.page_size
        nodes = self._walk(tokens, limit)
        if self.window is not None:
            nodes = nodes[: self._swa_usable(nodes)]
        self._clock += 1
        for node in nodes:
            node.last_access = self._clock
            node.hit_count += 1
        last = nodes[-1] if nodes else self.root
        slots = torch.cat([n.full for n in nodes]) if nodes else self.root.full
        return MatchResult(slots, last)

    def _walk(self, tokens: list[int], limit: int) -> list[Node]:
        """Nodes with device KV along ``tokens[:limit]``, the last one split to end there."""
        nodes: list[Node] = []
        node, pos, ps = self.root, 0, self.page_size
        while pos < limit:
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None or child.full is None:
                break
            m = self._common_len(child.key, tokens, pos, limit)
            if m < len(child):
                child = self._split(child, m)
            nodes.append(child)
            pos += m
            node = child
        return nodes

    def _swa_usable(self, nodes: list[Node]) -> int:
        """How many of ``nodes`` form the longest prefix whose last window has SWA KV."""
        usable, run_start = 0, 0
        for i, node in enumerate(nodes):
            if not node.swa:
                run_start = node.end
            elif run_start == 0 or node.end - run_start >= self.window:
                usable = i + 1
        return usable

    def _common_len(self, key: list[int], tokens: list[int], pos: int, limit: int) -> int:
        """Whole pages of ``key`` equal to ``tokens[pos:limit]`` (the first page is known equal)."""
        ps = self.page_size
        n = min(len(key), limit - pos)
        n -= n % ps
        if key[:n] == tokens[pos : pos + n]:
            return n
        lo, hi = 1, n // ps  # pages: lo match, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if key[: mid * ps] == tokens[pos : pos + mid * ps]:
                lo = mid
            else:
                hi = mid
        return lo * ps

    def _split(self, node: Node, k: int) -> Node:
        """Split ``node`` after ``k`` tokens; return the new upper part (``node`` keeps the rest).

        Both parts inherit the lock counts: every lock covers whole nodes (locks split the
        node at their window start), so a lock on the node is a lock on both parts.
        """
        ps = self.page_size
        upper = Node(
            uid=next(self._uids),
            key=node.key[:k],
            start=node.start,
            parent=node.parent,
            full=None if node.full is None else node.full[:k],
            swa=node.swa,
            full_lock=node.full_lock,
            swa_lock=node.swa_lock,
            last_access=node.last_access,
            hit_count=node.hit_count,
        )
        assert node.parent is not None
        node.parent.children[tuple(node.key[:ps])] = upper
        node.key = node.key[k:]
        node.full = None if node.full is None else node.full[k:]
        node.start += k
        node.parent = upper
        upper.children[tuple(node.key[:ps])] = node
        return upper

    # ---------------------------------------------------------------- locks

    def inc_lock(self, node: Node) -> LockHandle:
        """Pin the full KV of the path to ``node`` and the SWA KV of its last window."""
        swa_start = node.end
        if self.window is not None and node is not self.root:
            swa_start = max(0, node.end - self.window)
            swa_start -= swa_start % self.page_size
            self._split_at(node, swa_start)
        for n in node.path():
            if n.full_lock == 0:
                self.evictable_full -= len(n)
            n.full_lock += 1
            if n.start >= swa_start:
                assert n.swa, "locking a tombstone"
                if n.swa_lock == 0:
                    self.evictable_swa -= len(n)
                n.swa_lock += 1
        return LockHandle(node, swa_start)

    def dec_lock(self, handle: LockHandle) -> None:
        """Undo :meth:`inc_lock`."""
        for n in handle.node.path():
            n.full_lock -= 1
            if n.full_lock == 0:
                self.evictable_full += len(n)
            if n.start >= handle.swa_start:
                n.swa_lock -= 1
                if n.swa_lock == 0:
                    self.evictable_swa += len(n)
            assert n.full_lock >= 0 and n.swa_lock >= 0, "unlocking an unlocked node"

    def _split_at(self, node: Node, pos: int) -> None:
        """Make ``pos`` a node boundary on the path to ``node``."""
        for n in node.path():
            if n.start < pos < n.end:
                self._split(n, pos - n.start)
                return

    # ---------------------------------------------------------------- insert

    def insert(
        self, tokens: list[int], slots: torch.Tensor, own_from: int, swa_from: int
    ) -> tuple[Node, torch.Tensor]:
        """Cache ``tokens`` (a whole number of pages) whose full KV is at ``slots``.

        ``slots[:own_from]`` are the tree's own (the caller's locked, matched prefix);
        the rest are the caller's and pass to the tree: as new nodes, or freed as duplicates
        where the tree already holds the tokens. Positions ``>= swa_from`` still have the
        caller's SWA KV (it released the rest): a new node before ``swa_from`` is a tombstone,
        and a tombstoned cached node adopts the caller's SWA KV instead of dropping it.

        Returns the node ending at ``len(tokens)`` and the tree's full slots of ``tokens``
        (where duplicates were freed, they differ from ``slots``).
        """
        ps, n = self.page_size, len(tokens)
        assert n % ps == 0 and slots.numel() == n and own_from % ps == 0 and swa_from % ps == 0
        windowed = self.window is not None
        self._clock += 1
        node, pos = self.root, 0
        dups: list[torch.Tensor] = []
        path: list[torch.Tensor] = [self.root.full]
        while pos < n:
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None:
                node = self._add_path(node, tokens, slots, pos, swa_from if windowed else n)
                path.append(slots[pos:])
                break
            m = self._common_len(child.key, tokens, pos, n)
            if m < len(child):
                child = self._split(child, m)
            lo = max(pos, own_from)
            if lo < child.end:
                assert child.full is not None, "host-only nodes arrive with the host tier"
                adopt_from = max(lo, swa_from)
                if windowed and not child.swa and adopt_from < child.end:
                    if adopt_from > child.start:
                        upper = self._split(child, adopt_from - child.start)
                        upper.last_access = self._clock
                        path.append(upper.full)
                    self.allocator.adopt_swa(child.full, slots[child.start : child.end])
                    child.swa = True
                    self.cached_swa += len(child)
                    if child.swa_lock == 0:
                        self.evictable_swa += len(child)
                dups.append(slots[lo : child.end])
            child.last_access = self._clock
            path.append(child.full)
            node, pos = child, child.end
        if dups:
            self.allocator.free(torch.cat(dups))
        return node, torch.cat(path)

    def _add_path(
        self, parent: Node, tokens: list[int], slots: torch.Tensor, pos: int, swa_from: int
    ) -> Node:
        """Hang ``tokens[pos:]`` under ``parent``: a tombstone up to ``swa_from``, then present."""
        cuts = sorted({pos, min(max(swa_from, pos), len(tokens)), len(tokens)})
        for a, b in itertools.pairwise(cuts):
            child = Node(
                uid=next(self._uids),
                key=tokens[a:b],
                start=a,
                parent=parent,
                full=slots[a:b],
                swa=self.window is not None and a >= swa_from,
                last_access=self._clock,
            )
            parent.children[tuple(tokens[a : a + self.page_size])] = child
            self.cached_full += b - a
            self.evictable_full += b - a
            if child.swa:
                self.cached_swa += b - a
                self.evictable_swa += b - a
            parent = child
        return parent

    # ---------------------------------------------------------------- evict

    def evict(self, params: EvictParams) -> EvictResult:
        """Free at least ``params.full`` / ``params.swa`` tokens if that many are evictable.

        Full eviction removes unlocked leaves in LRU order, cascading to parents that
        become leaves. SWA eviction tombstones internal nodes and removes leaves; under the
        ``"window"`` policy it first takes only SWA KV outside every branch's last window.
        All victims are freed with one call per pool.
        """
        removed: list[torch.Tensor] = []
        tombstoned: list[torch.Tensor] = []
        freed = self._evict_leaves(params.full, removed)
        full, swa = freed.full, freed.swa
        if self.window is not None and swa < params.swa:
            if self.swa_eviction == "window":
                swa += self._tombstone_unprotected(params.swa - swa, tombstoned)
            if swa < params.swa:
                more = self._evict_lru_swa(params.swa - swa, removed, tombstoned)
                full, swa = full + more.full, swa + more.swa
        if tombstoned:
            self.allocator.free_swa(torch.cat(tombstoned))
        if removed:
            self.allocator.free(torch.cat(removed))
        return EvictResult(full, swa)

    def _evict_leaves(self, target: int, removed: list[torch.Tensor]) -> EvictResult:
        """Remove unlocked leaves, least recently used first, until ``target`` full tokens."""
        heap = [(n.last_access, n.uid, n) for n in self._nodes() if self._removable(n)]
        heapq.heapify(heap)
        full = swa = 0
        while heap and full < target:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            full_n, swa_n = self._remove(node, removed)
            full, swa = full + full_n, swa + swa_n
            if parent is not None and self._removable(parent):
                heapq.heappush(heap, (parent.last_access, parent.uid, parent))
        return EvictResult(full, swa)

    def _evict_lru_swa(
        self, target: int, removed: list[torch.Tensor], tombstoned: list[torch.Tensor]
    ) -> EvictResult:
        """Free ``target`` SWA tokens in LRU order: remove leaves, tombstone internal nodes."""
        heap = [(n.last_access, n.uid, n) for n in self._nodes() if n.swa and n.swa_lock == 0]
        heapq.heapify(heap)
        full = swa = 0
        while heap and swa < target:
            _, _, node = heapq.heappop(heap)
            if node.parent is None or not node.swa:
                continue  # removed or tombstoned since it was queued
            if self._removable(node):
                parent = node.parent
                full_n, swa_n = self._remove(node, removed)
                full, swa = full + full_n, swa + swa_n
                if parent.swa and parent.swa_lock == 0 and self._removable(parent):
                    heapq.heappush(heap, (parent.last_access, parent.uid, parent))
            else:
                swa += self._tombstone(node, tombstoned)
        return EvictResult(full, swa)

    def _tombstone_unprotected(self, target: int, tombstoned: list[torch.Tensor]) -> int:
        """Tombstone SWA KV outside every branch's last window, LRU first; tokens freed.

        A branch ends at a leaf or a fork (where requests diverged, so where later ones
        will end their match); its last ``window`` tokens are protected.
        """
        protected = self._protected_from()
        victims = [
            n for n in self._nodes() if n.swa and n.swa_lock == 0 and protected[id(n)] > n.start
        ]
        victims.sort(key=lambda n: (n.last_access, n.uid))
        freed = 0
        for node in victims:
            if freed >= target:
                break
            if protected[id(node)] < node.end:
                node = self._split(node, protected[id(node)] - node.start)
            freed += self._tombstone(node, tombstoned)
        return freed

    def _protected_from(self) -> dict[int, int]:
        """For each node (by id), the first position of it inside some branch's last window."""
        nearest_end: dict[int, int] = {}
        for node in reversed(self._nodes()):  # children before parents
            if len(node.children) == 1:
                (child,) = node.children.values()
                nearest_end[id(node)] = nearest_end[id(child)]
            else:
                nearest_end[id(node)] = node.end
        ps = self.page_size
        out = {}
        for key, end in nearest_end.items():
            start = max(0, end - self.window)
            out[key] = start - start % ps
        return out

    def _removable(self, node: Node) -> bool:
        return node.parent is not None and node.is_leaf and node.full_lock == 0

    def _remove(self, node: Node, removed: list[torch.Tensor]) -> tuple[int, int]:
        """Detach a leaf; queue its slots for freeing. Returns (full, swa) tokens freed."""
        assert node.parent is not None and node.is_leaf and node.full_lock == 0
        del node.parent.children[tuple(node.key[: self.page_size])]
        node.parent = None
        n = len(node)
        removed.append(node.full)
        self.cached_full -= n
        self.evictable_full -= n
        if node.swa:
            self.cached_swa -= n
            self.evictable_swa -= n
            return n, n
        return n, 0

    def _tombstone(self, node: Node, tombstoned: list[torch.Tensor]) -> int:
        """Drop a node's SWA KV (queued for freeing); keep its full KV."""
        assert node.swa and node.swa_lock == 0
        node.swa = False
        tombstoned.append(node.full)
        self.cached_swa -= len(node)
        self.evictable_swa -= len(node)
        return len(node)

    def _nodes(self) -> list[Node]:
        """Every node but the root, parents before children."""
        out: list[Node] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    # ---------------------------------------------------------------- check

    def cached_slots(self) -> torch.Tensor:
        """Full slots of every cached token (for the manager's conservation check)."""
        slots = [n.full for n in self._nodes() if n.full is not None]
        return torch.cat(slots) if slots else self.root.full

    def check(self) -> None:
        """Assert the tree's structure, counters and lock counts are consistent."""
        ps = self.page_size
        cached_full = cached_swa = evictable_full = evictable_swa = 0
        swa_map = self.allocator.full_to_swa
        for node in self._nodes():
            parent = node.parent
            assert parent is not None and parent.children[tuple(node.key[:ps])] is node
            assert len(node) > 0 and len(node) % ps == 0 and node.start == parent.end
            assert node.full is not None and node.full.numel() == len(node)
            assert node.full_lock >= 0 and node.swa_lock >= 0
            assert parent is self.root or parent.full_lock >= node.full_lock, "lock not on a path"
            cached_full += len(node)
            evictable_full += len(node) if node.full_lock == 0 else 0
            if self.window is None:
                assert not node.swa and node.swa_lock == 0
                continue
            assert node.swa or node.swa_lock == 0, "an SWA-locked tombstone"
            mapped = swa_map[node.full] != 0
            assert bool(mapped.all()) if node.swa else not bool(mapped.any()), "SWA map mismatch"
            if node.swa:
                cached_swa += len(node)
                evictable_swa += len(node) if node.swa_lock == 0 else 0
        assert (cached_full, cached_swa) == (self.cached_full, self.cached_swa), "cached counters"
        assert (evictable_full, evictable_swa) == (self.evictable_full, self.evictable_swa), (
            "evictable counters"
        )
