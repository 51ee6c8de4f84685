"""The tree's LRU heaps (``hybridkv.tree.lru``) against the full scans they replaced.

``ScanTree`` picks eviction victims the way the tree did before the heaps: it scans every
node on every call. The same random trace on both must evict exactly the same nodes in
the same order, for both SWA policies.
"""

from __future__ import annotations

import heapq

import torch
from helpers import DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tree import insert_new, pages

from hybridkv.allocator import SWAAllocator
from hybridkv.tree import EvictParams, FullPart, Node, RadixTree, SWAPart


class ScanFull(FullPart):
    """The reference full part: every candidate set recomputed by a scan of the whole tree."""

    def pick_leaves(self, target: int) -> list[Node]:
        heap = [(n.last_access, n.uid, n) for n in self.tree.nodes() if self.droppable(n, set())]
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
            if parent is not None and self.droppable(parent, gone):
                heapq.heappush(heap, (parent.last_access, parent.uid, parent))
        return picked


class ScanSWA(SWAPart):
    """The reference SWA part: every candidate set recomputed by a scan of the whole tree."""

    def evict_lru(self, target: int, dropped: list[torch.Tensor], tombstoned: list[Node]) -> None:
        tree, full = self.tree, self.tree.full_part
        heap = [(n.last_access, n.uid, n) for n in tree.nodes() if n.swa and n.swa_lock == 0]
        heapq.heapify(heap)
        start = self.cached
        while heap and start - self.cached < target:
            _, _, node = heapq.heappop(heap)
            if not node.on_device or not node.swa or node.parent is None:
                continue
            if full.droppable(node, set()):
                parent = node.parent
                tree.drop([node], dropped)
                if parent.swa and parent.swa_lock == 0 and full.droppable(parent, set()):
                    heapq.heappush(heap, (parent.last_access, parent.uid, parent))
            else:
                self.tombstone(node, tombstoned)

    def _scan_protected(self) -> dict[int, int]:
        nearest_end: dict[int, int] = {}
        for node in reversed(self.tree.nodes()):
            if len(node.children) == 1:
                (child,) = node.children.values()
                nearest_end[node.uid] = nearest_end[child.uid]
            else:
                nearest_end[node.uid] = node.end
        return {uid: self.window_start(end) for uid, end in nearest_end.items()}

    def tombstone_unprotected(self, target: int, tombstoned: list[Node]) -> int:
        if target <= 0:
            return 0
        protected = self._scan_protected()
        victims = [
            n for n in self.tree.nodes() if n.swa and n.swa_lock == 0 and protected[n.uid] > n.start
        ]
        victims.sort(key=lambda n: (n.last_access, n.uid))
        freed = 0
        for node in victims:
            if freed >= target:
                break
            if protected[node.uid] < node.end:
                node = self.tree.split(node, protected[node.uid] - node.start)
            freed += self.tombstone(node, tombstoned)
        return freed

    def tombstone_lru(self, target: int, tombstoned: list[Node]) -> int:
        if target <= 0:
            return 0
        victims = [n for n in self.tree.nodes() if n.swa and n.swa_lock == 0]
        victims.sort(key=lambda n: (n.last_access, n.uid))
        freed = 0
        for node in victims:
            if freed >= target:
                break
            freed += self.tombstone(node, tombstoned)
        return freed


class ScanTree(RadixTree):
    """The reference tree: its full and SWA parts scan instead of keeping heaps."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.full_part.__class__ = ScanFull
        if self.swa_part is not None:
            self.swa_part.__class__ = ScanSWA


def shape(tree: RadixTree) -> list[tuple]:
    """Every node's span, device and SWA presence, locks and LRU key (uids agree too)."""
    return sorted(
        (n.uid, n.start, n.end, n.on_device, n.swa, n.full_lock, n.swa_lock, n.last_access)
        for n in tree.nodes()
    )


def pair(ps: int, window: int | None, policy: str) -> list[tuple[SWAAllocator, RadixTree]]:
    out = []
    for cls in (RadixTree, ScanTree):
        alloc = SWAAllocator(64 * ps, 40 * ps, ps, DEVICE, "torch")
        out.append((alloc, cls(alloc, ps, window, policy)))
    return out


OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "match", "lock", "unlock", "evict"]), st.integers(0, 999)),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    cfg=st.sampled_from(
        [
            (1, 2, "window"),
            (2, 4, "window"),
            (2, 3, "lru"),
            (4, 8, "window"),
            (4, 4, "lru"),
            (2, None, "window"),
        ]
    ),
    ops=OPS,
)
def test_heaps_evict_exactly_what_a_scan_evicts(cfg: tuple, ops: list) -> None:
    """Random inserts (branching, extending leaves), matches, locks and evictions: the heap
    tree and the scanning tree stay identical, and check() (heaps vs a scan) holds."""
    ps, window, policy = cfg
    trees = pair(ps, window, policy)
    seqs: list[list[int]] = []
    locks: list[list] = [[] for _ in trees]
    for op, r in ops:
        results = []
        tokens: list[int] = []
        if op == "insert":
            base = seqs[r % len(seqs)] if seqs and r % 3 else []
            cut = (r // 3) % (len(base) // ps + 1) * ps
            first = 10 * len(seqs) + r % 7
            tokens = base[:cut] + pages(ps, *range(first, first + 1 + r % 3))
            seqs.append(tokens)
        for k, (alloc, tree) in enumerate(trees):
            if op == "insert":
                n = len(tokens)
                if alloc.full_available < n or alloc.swa_available < n:
                    tree.evict(EvictParams(full=n, swa=n))
                if alloc.full_available < n or alloc.swa_available < n:
                    results.append(None)
                    continue
                tree.match_prefix(tokens)
                insert_new(tree, alloc, tokens, (r % (n // ps + 1)) * ps)
            elif op == "match" and seqs:
                results.append(tree.match_prefix(seqs[r % len(seqs)]).length)
            elif op == "lock" and seqs:
                m = tree.match_prefix(seqs[r % len(seqs)])
                locks[k].append(tree.inc_lock(m.last_node))
            elif op == "unlock" and locks[k]:
                tree.dec_lock(locks[k].pop(r % len(locks[k])))
            elif op == "evict":
                results.append(tree.evict(EvictParams(full=r % 5 * ps, swa=r // 5 % 5 * ps)))
            tree.check()
        assert results[: len(results) // 2] == results[len(results) // 2 :]
        assert shape(trees[0][1]) == shape(trees[1][1])


def _chain(ps: int) -> tuple[SWAAllocator, RadixTree]:
    alloc = SWAAllocator(64 * ps, 48 * ps, ps, DEVICE, "torch")
    return alloc, RadixTree(alloc, ps, 2 * ps, "window")


def test_extended_leaf_unprotects_its_old_window() -> None:
    """A node found protected (it was its branch's last window) is unprotected once the
    branch grows past it, and the next window eviction takes it first (LRU)."""
    ps = 2
    alloc, tree = _chain(ps)
    a = pages(ps, 1, 2, 3, 4)
    insert_new(tree, alloc, a)
    assert tree.evict(EvictParams(swa=ps)).swa == 2 * ps  # pages 1-2 outside the window
    tree.check()
    insert_new(tree, alloc, a + pages(ps, 5, 6, 7, 8), swa_from=4 * ps)
    tree.check()
    assert tree.evict(EvictParams(swa=ps)).swa == 2 * ps
    by_start = {n.start: n for n in tree.nodes()}
    assert not by_start[2 * ps].swa and by_start[4 * ps].swa, "the old window went first"


def test_fork_losing_a_branch_unprotects_the_fork_window() -> None:
    """A fork's last window is protected; once one branch is dropped the fork is inside a
    chain, outside the remaining branch's last window, and its SWA goes first."""
    ps = 2
    alloc, tree = _chain(ps)
    shared, long, short = pages(ps, 1, 2), pages(ps, 3), pages(ps, 4)
    insert_new(tree, alloc, shared + long)
    insert_new(tree, alloc, shared + short)
    tree.match_prefix(shared + long)  # the short branch is the LRU leaf
    insert_new(tree, alloc, pages(ps, 20, 21, 22, 23, 24))  # newest, mostly unprotected
    assert tree.evict(EvictParams(swa=ps)).swa == 3 * ps  # the new one, outside its window
    tree.check()
    assert tree.evict(EvictParams(full=ps)).full == ps  # drops the short branch
    tree.check()
    fork = next(n for n in tree.nodes() if n.end == 2 * ps)
    assert fork.swa and len(fork.children) == 1
    assert tree.evict(EvictParams(swa=ps)).swa == ps
    tree.check()
    by_span = {(n.start, n.end): n for n in tree.nodes()}
    assert not by_span[0, ps].swa, "the former fork's first page is no longer protected"
    assert by_span[ps, 2 * ps].swa and by_span[2 * ps, 3 * ps].swa
