"""Radix tree: exact scenarios, a hypothesis state machine against a naive model, and the
SWA hit rate of window-aware versus LRU SWA eviction.

Token ranges of the scenarios are written in pages: ``pages(ps, 1, 2, 3)`` is three pages
whose ids are 1, 2, 3 (page ``p`` holds tokens ``p * 100 + j``), so two sequences share a
prefix exactly where they share page ids.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import DEVICE
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from hybridkv.allocator import SWAAllocator
from hybridkv.errors import CheckError
from hybridkv.tree import EvictParams, EvictResult, LockHandle, MatchResult, Node, RadixTree, radix

# ------------------------------------------------------------------------------- helpers


def pages(ps: int, *ids: int) -> list[int]:
    """Tokens of whole pages: page id ``p`` is ``[p * 100 + j for j < ps]``."""
    return [p * 100 + j for p in ids for j in range(ps)]


def make_tree(
    ps: int,
    window: int | None,
    policy: str = "window",
    full_tokens: int = 64,
    swa_tokens: int = 48,
    backend: str = "torch",
) -> tuple[SWAAllocator, RadixTree]:
    """A fresh allocator (pool sizes in units of ``ps`` tokens) and its tree."""
    alloc = SWAAllocator(full_tokens * ps, swa_tokens * ps, ps, DEVICE, backend)
    return alloc, RadixTree(alloc, ps, window, policy)


def fresh(alloc: SWAAllocator, n: int) -> torch.Tensor:
    """``n`` new full slots (whole pages, SWA mapped) for a request with no prefix."""
    slots = alloc.alloc_extend(
        torch.tensor([0]), torch.tensor([n]), torch.tensor([-1], device=alloc.device)
    )
    assert slots is not None, "pool too small for the scenario"
    return slots


def insert_new(
    tree: RadixTree, alloc: SWAAllocator, tokens: list[int], swa_from: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert ``tokens`` with all-new slots (``own_from=0``), tombstoned before ``swa_from``.

    Returns (the caller's slots, the tree's slots of ``tokens``)."""
    slots = fresh(alloc, len(tokens))
    alloc.free_swa(slots[:swa_from])
    node, tree_slots = tree.insert(tokens, slots, 0, swa_from)
    assert node.end == len(tokens)
    return slots, tree_slots


def page_range(ps: int, *ranges: tuple[int, int]) -> list[int]:
    """Slots of whole pages ``[a, b)`` of each range, concatenated (as ints)."""
    return [s for a, b in ranges for s in range(a * ps, b * ps)]


def free_full(alloc: SWAAllocator) -> list[int]:
    """Free full pages in allocation order."""
    return alloc.full.free_pages_view().tolist()


def free_swa(alloc: SWAAllocator) -> list[int]:
    """Free SWA pages in allocation order."""
    return alloc.swa.free_pages_view().tolist()


def cached_path(tree: RadixTree, tokens: list[int]) -> torch.Tensor:
    """Full slots of the longest cached whole-page prefix of ``tokens`` (read-only walk)."""
    ps, node, pos, out = tree.page_size, tree.root, 0, [tree.root.full]
    while pos + ps <= len(tokens):
        child = node.children.get(tuple(tokens[pos : pos + ps]))
        if child is None:
            break
        k = 0
        while k < len(child) and pos + k + ps <= len(tokens):
            if child.key[k : k + ps] != tokens[pos + k : pos + k + ps]:
                break
            k += ps
        out.append(child.full[:k])
        pos += k
        if k < len(child):
            break
        node = child
    return torch.cat(out)


def expected_match_len(
    tree: RadixTree, alloc: SWAAllocator, tokens: list[int], max_len: int | None = None
) -> int:
    """Naive oracle: longest cached page-multiple prefix whose last window maps to SWA KV."""
    ps = tree.page_size
    slots = cached_path(tree, tokens)
    limit = slots.numel() if max_len is None else min(max_len, slots.numel())
    limit -= limit % ps
    if tree.window is None:
        return limit
    present = (alloc.full_to_swa[slots] != 0).tolist()
    for end in range(limit, 0, -ps):
        if all(present[max(0, end - tree.window) : end]):
            return end
    return 0


def node_tokens(node: Node) -> list[int]:
    """Tokens of the path from the root to the end of ``node``."""
    out: list[int] = []
    for n in reversed(node.path()):
        out += n.key
    return out


def assert_conserved(tree: RadixTree, alloc: SWAAllocator) -> None:
    """Every full page is free or in exactly one node; every SWA page free or mapped once."""
    ps = alloc.page_size
    cached = tree.cached_slots()
    assert cached.numel() == torch.unique(cached).numel(), "a slot is cached twice"
    pages_, counts = torch.unique(cached // ps, return_counts=True)
    assert bool((counts == ps).all()), "a cached page is split between nodes or partial"
    held = sorted(pages_.tolist() + free_full(alloc))
    assert held == list(range(1, alloc.full.num_pages)), "full pages leaked or double-held"
    mapped = alloc.full_to_swa[cached]
    mapped = mapped[mapped != 0]
    if tree.window is not None:
        assert mapped.numel() == tree.cached_swa
    swa_held = sorted(torch.unique(mapped // ps).tolist() + free_swa(alloc))
    assert swa_held == list(range(1, alloc.swa.num_pages)), "SWA pages leaked or double-held"


def verify(tree: RadixTree, alloc: SWAAllocator) -> None:
    """``check()`` of both, plus conservation of both pools."""
    tree.check()
    alloc.check()
    assert_conserved(tree, alloc)


def counters(tree: RadixTree) -> tuple[int, int, int, int]:
    """(cached_full, cached_swa, evictable_full, evictable_swa)."""
    return (tree.cached_full, tree.cached_swa, tree.evictable_full, tree.evictable_swa)


# ------------------------------------------------------------------ insert / match / split


@pytest.mark.parametrize("ps", [1, 4])
@pytest.mark.parametrize("window", [None, 2, 4, 16])
def test_insert_match_and_split(ps: int, window: int | None) -> None:
    """Insert one sequence; an exact match returns its slots; a divergent one splits the node."""
    alloc, tree = make_tree(ps, window)
    a = pages(ps, 1, 2, 3)
    slots, tree_slots = insert_new(tree, alloc, a)
    assert tree_slots.tolist() == slots.tolist() == page_range(ps, (1, 4))
    verify(tree, alloc)
    assert counters(tree) == (3 * ps, 0 if window is None else 3 * ps) * 2

    m = tree.match_prefix(a)
    assert m.prefix_slots.tolist() == slots.tolist() and m.last_node.end == 3 * ps
    verify(tree, alloc)

    m = tree.match_prefix(pages(ps, 1, 2, 9))
    assert m.prefix_slots.tolist() == page_range(ps, (1, 3))
    assert m.last_node.end == 2 * ps and m.last_node.key == pages(ps, 1, 2)
    (lower,) = m.last_node.children.values()
    assert lower.key == pages(ps, 3) and lower.full.tolist() == page_range(ps, (3, 4))
    verify(tree, alloc)
    assert tree.match_prefix(pages(ps, 9)).length == 0
    assert tree.match_prefix(a).prefix_slots.tolist() == slots.tolist()
    verify(tree, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_match_never_caches_or_returns_unaligned_tails(ps: int) -> None:
    """A query with a partial last page (or diverging mid-page) matches whole pages only."""
    alloc, tree = make_tree(ps, 2 * ps)
    a = pages(ps, 1, 2, 3)
    insert_new(tree, alloc, a)
    for tail in range(ps):
        m = tree.match_prefix(a + [7] * tail)
        assert m.length == 3 * ps
    if ps > 1:
        diverging = a[: 2 * ps + ps // 2] + [999] * (ps - ps // 2)
        m = tree.match_prefix(diverging)
        assert m.length == 2 * ps and m.last_node.end == 2 * ps
        verify(tree, alloc)
        short = a[: ps - 1]
        assert tree.match_prefix(short).length == 0
    verify(tree, alloc)


@pytest.mark.parametrize("ps", [1, 4])
@pytest.mark.parametrize("window", [None, 3])
def test_match_respects_max_len(ps: int, window: int | None) -> None:
    """``max_len`` caps the match, rounded down to a page; the node is split there."""
    alloc, tree = make_tree(ps, window)
    a = pages(ps, 1, 2, 3)
    slots, _ = insert_new(tree, alloc, a)
    for max_len in range(0, 4 * ps + 2):
        m = tree.match_prefix(a + [5] * ps, max_len=max_len)
        expected = min(max_len, 3 * ps) // ps * ps
        assert m.length == expected, max_len
        assert m.prefix_slots.tolist() == slots[:expected].tolist()
        assert m.last_node.end == expected
        verify(tree, alloc)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ps", [1, 4])
def test_duplicates_are_freed_exactly(ps: int, backend: str) -> None:
    """Re-inserting cached pages frees the caller's copies (both pools), in exact order."""
    alloc, tree = make_tree(ps, 2, full_tokens=16, swa_tokens=16, backend=backend)
    a = pages(ps, 1, 2, 3)
    first, _ = insert_new(tree, alloc, a)  # pages 1, 2, 3
    assert free_full(alloc) == list(range(4, 17)) and free_swa(alloc) == list(range(4, 17))

    dup, tree_slots = insert_new(tree, alloc, a)  # takes pages 4, 5, 6, frees them back
    assert dup.tolist() == page_range(ps, (4, 7))
    assert tree_slots.tolist() == first.tolist()
    assert free_full(alloc) == list(range(4, 17)) and free_swa(alloc) == list(range(4, 17))
    assert counters(tree) == (3 * ps,) * 4
    verify(tree, alloc)

    b = pages(ps, 1, 2, 7)  # shares two pages: pages 4, 5 freed, page 6 kept
    _, tree_slots = insert_new(tree, alloc, b)
    assert tree_slots.tolist() == page_range(ps, (1, 3), (6, 7))
    assert free_full(alloc) == [4, 5] + list(range(7, 17))
    assert free_swa(alloc) == [4, 5] + list(range(7, 17))
    assert counters(tree) == (4 * ps,) * 4
    assert tree.match_prefix(b).prefix_slots.tolist() == tree_slots.tolist()
    verify(tree, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_insert_with_own_prefix_frees_nothing(ps: int) -> None:
    """The server path: match, lock, allocate only the new pages, insert with ``own_from``."""
    alloc, tree = make_tree(ps, ps)
    insert_new(tree, alloc, pages(ps, 1, 2))
    m = tree.match_prefix(pages(ps, 1, 2, 3, 4))
    h = tree.inc_lock(m.last_node)
    new = fresh(alloc, 2 * ps)
    before = free_full(alloc), free_swa(alloc)
    node, tree_slots = tree.insert(
        pages(ps, 1, 2, 3, 4), torch.cat([m.prefix_slots, new]), m.length, m.length
    )
    assert (free_full(alloc), free_swa(alloc)) == before
    assert tree_slots.tolist() == m.prefix_slots.tolist() + new.tolist()
    assert node.end == 4 * ps and node_tokens(node) == pages(ps, 1, 2, 3, 4)
    verify(tree, alloc)
    tree.dec_lock(h)
    assert counters(tree) == (4 * ps,) * 4
    verify(tree, alloc)


# ------------------------------------------------------------------------ SWA tombstones


@pytest.mark.parametrize("ps", [1, 4])
def test_tombstoned_node_adopts_callers_swa(ps: int) -> None:
    """A cached tombstone takes over the SWA KV of a duplicate insert; its full copy is freed."""
    alloc, tree = make_tree(ps, ps, full_tokens=16, swa_tokens=16)
    a = pages(ps, 1, 2, 3)
    first, _ = insert_new(tree, alloc, a, swa_from=3 * ps)  # all tombstoned
    assert counters(tree) == (3 * ps, 0, 3 * ps, 0)
    assert free_swa(alloc) == list(range(1, 17))
    assert tree.match_prefix(a).length == 0
    verify(tree, alloc)

    dup, tree_slots = insert_new(tree, alloc, a)  # full pages 4-6, SWA pages 1-3
    assert tree_slots.tolist() == first.tolist()
    assert alloc.full_to_swa[first].tolist() == page_range(ps, (1, 4))
    assert alloc.full_to_swa[dup].tolist() == [0] * (3 * ps)
    assert free_full(alloc) == list(range(4, 17)) and free_swa(alloc) == list(range(4, 17))
    assert counters(tree) == (3 * ps,) * 4
    assert tree.match_prefix(a).prefix_slots.tolist() == first.tolist()
    verify(tree, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_partial_adoption_splits_the_tombstone(ps: int) -> None:
    """An insert with SWA only from page 1 splits the tombstone: page 0 stays one."""
    alloc, tree = make_tree(ps, ps, full_tokens=16, swa_tokens=16)
    a = pages(ps, 1, 2, 3)
    first, _ = insert_new(tree, alloc, a, swa_from=3 * ps)
    dup = fresh(alloc, 3 * ps)  # full pages 4-6, SWA pages 1-3
    alloc.free_swa(dup[:ps])  # SWA page 1 back
    node, _ = tree.insert(a, dup, 0, ps)
    assert node.end == 3 * ps and node.start == ps and node.swa
    assert not node.parent.swa and node.parent.key == pages(ps, 1)
    assert alloc.full_to_swa[first].tolist() == [0] * ps + page_range(ps, (2, 4))
    assert free_full(alloc) == list(range(4, 17))
    assert free_swa(alloc) == [1] + list(range(4, 17))
    assert counters(tree) == (3 * ps, 2 * ps, 3 * ps, 2 * ps)
    verify(tree, alloc)
    # window == ps: the last page alone must be present.
    assert tree.match_prefix(a).prefix_slots.tolist() == first.tolist()
    verify(tree, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_partial_adoption_returns_every_tree_slot(ps: int) -> None:
    """insert()'s tree slots cover all of ``tokens`` even when adoption splits a tombstone."""
    alloc, tree = make_tree(ps, ps, full_tokens=16, swa_tokens=16)
    a = pages(ps, 1, 2, 3)
    first, _ = insert_new(tree, alloc, a, swa_from=3 * ps)
    _, tree_slots = insert_new(tree, alloc, a, swa_from=ps)
    assert tree_slots.tolist() == first.tolist()


# present [0, 2p), tombstone [2p, 4p), present [4p, 6p); (page size, window, match of all)
TOMB_CASES = [
    (1, 1, 6),
    (1, 2, 6),
    (1, 3, 2),
    (4, 2, 24),  # window smaller than a page
    (4, 4, 24),  # equal
    (4, 8, 24),  # exactly the present run
    (4, 9, 8),  # one token into the tombstone: falls back to the end of page 2
    (4, 12, 8),
]


def build_island(ps: int, window: int) -> tuple[SWAAllocator, RadixTree, list[int]]:
    """Tree holding pages 1..6 with SWA on pages 1-2 and 5-6 only (3-4 tombstoned)."""
    alloc, tree = make_tree(ps, window)
    insert_new(tree, alloc, pages(ps, 1, 2))
    y = pages(ps, 1, 2, 3, 4, 5, 6)
    insert_new(tree, alloc, y, swa_from=4 * ps)
    verify(tree, alloc)
    assert counters(tree) == (6 * ps, 4 * ps, 6 * ps, 4 * ps)
    return alloc, tree, y


@pytest.mark.parametrize(("ps", "window", "expected"), TOMB_CASES)
def test_tombstone_in_window_falls_back(ps: int, window: int, expected: int) -> None:
    """A tombstone inside the last window breaks the match; it falls back to an earlier end."""
    alloc, tree, y = build_island(ps, window)
    for max_len in (None, 5 * ps, 3 * ps, 2 * ps, ps):
        want = expected_match_len(tree, alloc, y, max_len)
        m = tree.match_prefix(y, max_len)
        assert m.length == want and m.last_node.end == want
        verify(tree, alloc)
    assert tree.match_prefix(y).length == expected
    # max_len in the second present run: usable only if the window fits in one page.
    assert tree.match_prefix(y, 5 * ps).length == (5 * ps if window <= ps else 2 * ps)
    verify(tree, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_prefix_shorter_than_window(ps: int) -> None:
    """A prefix shorter than the window counts only if nothing of it is tombstoned."""
    alloc, tree = make_tree(ps, 5 * ps)
    insert_new(tree, alloc, pages(ps, 1, 2))
    insert_new(tree, alloc, pages(ps, 3, 4), swa_from=ps)
    assert tree.match_prefix(pages(ps, 1, 2)).length == 2 * ps
    assert tree.match_prefix(pages(ps, 3, 4)).length == 0
    verify(tree, alloc)


def test_window_none_ignores_swa() -> None:
    """Without a window nothing is SWA state: counters stay 0 and tombstones do not matter."""
    alloc, tree = make_tree(4, None)
    insert_new(tree, alloc, pages(4, 1, 2, 3), swa_from=8)
    assert counters(tree) == (12, 0, 12, 0)
    assert tree.match_prefix(pages(4, 1, 2, 3)).length == 12
    assert tree.evict(EvictParams(swa=100)) == EvictResult(0, 0)
    verify(tree, alloc)


# ------------------------------------------------------------------------------- eviction


@pytest.mark.parametrize("ps", [1, 4])
@pytest.mark.parametrize("window", [None, 2])
def test_full_eviction_lru_order(ps: int, window: int | None) -> None:
    """Full eviction removes unlocked leaves least recently used first: exact victims."""
    alloc, tree = make_tree(ps, window, full_tokens=16, swa_tokens=16)
    a, b, c = pages(ps, 1, 2), pages(ps, 3, 4), pages(ps, 5, 6)
    for seq in (a, b, c):
        insert_new(tree, alloc, seq)  # pages 1-2, 3-4, 5-6
    tree.match_prefix(b)  # LRU order now a, c, b
    swa = 0 if window is None else 2 * ps
    assert tree.evict(EvictParams(full=1)) == EvictResult(2 * ps, swa)
    assert free_full(alloc) == [1, 2] + list(range(7, 17))
    assert tree.match_prefix(a).length == 0 and tree.match_prefix(c).length == 2 * ps
    verify(tree, alloc)
    # the match above made c the most recent: b goes next, then c
    assert tree.evict(EvictParams(full=2 * ps)) == EvictResult(2 * ps, swa)
    assert free_full(alloc) == [3, 4, 1, 2] + list(range(7, 17))
    assert tree.evict(EvictParams(full=100)) == EvictResult(2 * ps, swa)
    assert free_full(alloc) == [5, 6, 3, 4, 1, 2] + list(range(7, 17))
    assert counters(tree) == (0, 0, 0, 0)
    assert tree.evict(EvictParams(full=1, swa=1)) == EvictResult(0, 0)
    verify(tree, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_full_eviction_cascades_to_parents(ps: int) -> None:
    """Removing the last child makes the parent a leaf, evicted in the same call."""
    alloc, tree = make_tree(ps, ps, full_tokens=16, swa_tokens=16)
    insert_new(tree, alloc, pages(ps, 1, 2, 3))  # pages 1, 2, 3
    insert_new(tree, alloc, pages(ps, 1, 2, 4))  # pages 4, 5 freed, 6 kept
    assert free_full(alloc) == [4, 5] + list(range(7, 17))
    assert tree.evict(EvictParams(full=1)) == EvictResult(ps, ps)  # the older leaf [3]
    assert free_full(alloc) == [3, 4, 5] + list(range(7, 17))
    assert tree.match_prefix(pages(ps, 1, 2, 4)).length == 3 * ps
    verify(tree, alloc)
    assert tree.evict(EvictParams(full=ps + 1)) == EvictResult(3 * ps, 3 * ps)
    assert free_full(alloc) == [1, 2, 6, 3, 4, 5] + list(range(7, 17))
    assert counters(tree) == (0, 0, 0, 0) and not tree.root.children
    verify(tree, alloc)


@pytest.mark.parametrize("ps", [1, 4])
@pytest.mark.parametrize("policy", ["window", "lru"])
def test_locked_path_survives_any_eviction(ps: int, policy: str) -> None:
    """Eviction never takes a locked path's full KV nor its last window's SWA KV."""
    window = 2 * ps - 1
    alloc, tree = make_tree(ps, window, policy)
    a = pages(ps, 1, 2, 3, 4, 5, 6)
    insert_new(tree, alloc, a)
    insert_new(tree, alloc, pages(ps, 7, 8))
    m = tree.match_prefix(a)
    h = tree.inc_lock(m.last_node)
    swa_start = (6 * ps - window) // ps * ps
    assert h.swa_start == swa_start
    assert counters(tree) == (8 * ps, 8 * ps, 2 * ps, 2 * ps + swa_start)
    verify(tree, alloc)

    res = tree.evict(EvictParams(full=1000, swa=1000))
    assert res == EvictResult(2 * ps, 2 * ps + swa_start)
    assert counters(tree) == (6 * ps, 6 * ps - swa_start, 0, 0)
    assert tree.evict(EvictParams(full=1, swa=1)) == EvictResult(0, 0)
    verify(tree, alloc)
    present = (alloc.full_to_swa[m.prefix_slots] != 0).tolist()
    assert present == [False] * swa_start + [True] * (6 * ps - swa_start)
    assert tree.match_prefix(a).prefix_slots.tolist() == m.prefix_slots.tolist()

    tree.dec_lock(h)
    assert counters(tree) == (6 * ps, 6 * ps - swa_start, 6 * ps, 6 * ps - swa_start)
    assert tree.evict(EvictParams(full=1000)) == EvictResult(6 * ps, 6 * ps - swa_start)
    assert alloc.full_available == 64 * ps and alloc.swa_available == 48 * ps
    verify(tree, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_lock_unlock_restores_counters(ps: int) -> None:
    """Overlapping locks subtract each node once; unlocking in any order restores counters."""
    window = 3 * ps
    alloc, tree = make_tree(ps, window)
    a = pages(ps, 1, 2, 3, 4, 5, 6)
    insert_new(tree, alloc, a)
    insert_new(tree, alloc, pages(ps, 1, 2, 3, 9))
    base = counters(tree)
    assert base == (7 * ps,) * 4

    h1 = tree.inc_lock(tree.match_prefix(a).last_node)  # full [0, 6p), SWA [3p, 6p)
    assert counters(tree) == (7 * ps, 7 * ps, ps, 4 * ps)
    h2 = tree.inc_lock(tree.match_prefix(a[: 4 * ps]).last_node)  # full [0, 4p), SWA [p, 4p)
    assert counters(tree) == (7 * ps, 7 * ps, ps, 2 * ps)
    h3 = tree.inc_lock(tree.match_prefix(a).last_node)  # same as h1
    assert counters(tree) == (7 * ps, 7 * ps, ps, 2 * ps)
    verify(tree, alloc)
    tree.dec_lock(h1)
    assert counters(tree) == (7 * ps, 7 * ps, ps, 2 * ps)
    tree.dec_lock(h2)
    assert counters(tree) == (7 * ps, 7 * ps, ps, 4 * ps)
    verify(tree, alloc)
    tree.dec_lock(h3)
    assert counters(tree) == base
    verify(tree, alloc)
    h4 = tree.inc_lock(tree.root)  # the empty match locks nothing
    assert counters(tree) == base
    tree.dec_lock(h4)
    assert counters(tree) == base


@pytest.mark.parametrize("policy", ["window", "lru"])
def test_lock_survives_splits_inside_and_outside_its_window(policy: str) -> None:
    """Later matches split a locked path inside and outside its SWA window; unlock is exact."""
    ps, window = 4, 8
    alloc, tree = make_tree(ps, window, policy)
    a = pages(ps, 1, 2, 3, 4, 5, 6)
    insert_new(tree, alloc, a)
    h = tree.inc_lock(tree.match_prefix(a).last_node)  # a partial pin at 16, no split
    assert h.swa_start == 16 and h.node.start == 0 and h.node.swa_pins == [16]
    assert counters(tree) == (24, 24, 0, 16)
    assert tree.match_prefix(a[:20]).last_node.end == 20  # split inside the window
    assert counters(tree) == (24, 24, 0, 16)
    verify(tree, alloc)
    assert tree.match_prefix(a[:8]).last_node.end == 8  # split outside it
    assert counters(tree) == (24, 24, 0, 16)
    verify(tree, alloc)
    assert tree.evict(EvictParams(full=100, swa=100)) == EvictResult(0, 16)
    assert tree.match_prefix(a).length == 24
    verify(tree, alloc)
    tree.dec_lock(h)
    assert counters(tree) == (24, 8, 24, 8)
    verify(tree, alloc)
    assert tree.evict(EvictParams(full=1)) == EvictResult(4, 4)  # the leaf [20, 24)
    assert tree.match_prefix(a).length == 0  # [16, 20) alone is shorter than the window
    verify(tree, alloc)


def build_fork(
    ps: int, window: int, policy: str
) -> tuple[SWAAllocator, RadixTree, list[int], list[int]]:
    """A 4-page system prompt and two 4-page branches under it (branch 1 older)."""
    alloc, tree = make_tree(ps, window, policy)
    b1 = pages(ps, 1, 2, 3, 4, 10, 11, 12, 13)
    b2 = pages(ps, 1, 2, 3, 4, 20, 21, 22, 23)
    insert_new(tree, alloc, b1)
    insert_new(tree, alloc, b2)
    verify(tree, alloc)
    return alloc, tree, b1, b2


def swa_present(alloc: SWAAllocator, tree: RadixTree, tokens: list[int]) -> list[bool]:
    """Per cached position of ``tokens``: does it map to SWA KV?"""
    return (alloc.full_to_swa[cached_path(tree, tokens)] != 0).tolist()


@pytest.mark.parametrize("ps", [1, 4])
def test_window_policy_keeps_each_branch_window(ps: int) -> None:
    """'window' tombstones outside every branch's last window first, oldest first."""
    alloc, tree, b1, b2 = build_fork(ps, 2 * ps, "window")
    # unprotected: [0, 2p) of the prompt, [4p, 6p) of each branch; branch 1 is the oldest
    assert tree.evict(EvictParams(swa=1)) == EvictResult(0, 2 * ps)
    assert swa_present(alloc, tree, b1) == [True] * 4 * ps + [False] * 2 * ps + [True] * 2 * ps
    assert tree.match_prefix(b1).length == 8 * ps
    verify(tree, alloc)
    # b1 (and the prompt) are now the newest: b2's head goes next, then the prompt's head
    assert tree.evict(EvictParams(swa=3 * ps)) == EvictResult(0, 4 * ps)
    assert (
        swa_present(alloc, tree, b2)
        == [False] * 2 * ps + [True] * 2 * ps + [False] * 2 * ps + [True] * 2 * ps
    )
    for seq in (b1, b2, b1[: 4 * ps]):
        assert tree.match_prefix(seq).length == len(seq)
    verify(tree, alloc)
    # only protected SWA left: now plain LRU, which breaks a branch
    assert tree.cached_swa == 6 * ps
    res = tree.evict(EvictParams(swa=1))
    assert res.swa >= 1 and tree.cached_swa == 6 * ps - res.swa
    verify(tree, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_lru_policy_drops_the_oldest_branch(ps: int) -> None:
    """'lru' takes the oldest branch's leaf whole, losing its hit (window keeps it)."""
    alloc, tree, b1, b2 = build_fork(ps, 2 * ps, "lru")
    assert tree.evict(EvictParams(swa=1)) == EvictResult(4 * ps, 4 * ps)
    assert tree.match_prefix(b1).length == 4 * ps
    assert tree.match_prefix(b2).length == 8 * ps
    verify(tree, alloc)


def _tie_scenario(ps: int) -> tuple[EvictResult, list[bool]]:
    """LRU SWA eviction where an internal node and a leaf share their last access."""
    alloc, tree = make_tree(ps, ps, "lru")
    insert_new(tree, alloc, pages(ps, 1, 2, 3))
    insert_new(tree, alloc, pages(ps, 1, 2, 4))  # the prompt [1, 2] ties with the leaf [4]
    res = tree.evict(EvictParams(swa=3 * ps))
    verify(tree, alloc)
    return res, swa_present(alloc, tree, pages(ps, 1, 2, 4))


@pytest.mark.parametrize("ps", [1, 4])
def test_lru_swa_ties_do_not_depend_on_object_ids(ps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal last-access ties break the same way whatever ``id()`` says (TP ranks agree)."""
    first = _tie_scenario(ps)
    monkeypatch.setattr(radix, "id", lambda x: -id(x), raising=False)
    assert _tie_scenario(ps) == first


# ------------------------------------------------------------------------- state machine

# (page size, window, SWA policy): windows smaller than, equal to and larger than a page
CONFIGS = [
    (1, None, "window"),
    (1, 2, "window"),
    (1, 3, "lru"),
    (2, 1, "window"),
    (2, 2, "lru"),
    (2, 5, "window"),
    (4, 2, "lru"),
    (4, 4, "window"),
    (4, 6, "window"),
    (4, 8, "lru"),
    (4, None, "lru"),
]
FULL_PAGES, SWA_PAGES, MAX_PAGES = 24, 14, 8


class TreeMachine(RuleBasedStateMachine):
    """The tree against a model: the set of cached sequences and each slot's token prefix."""

    @initialize(cfg=st.sampled_from(CONFIGS))
    def setup(self, cfg: tuple[int, int | None, str]) -> None:
        self.ps, self.window, policy = cfg
        self.alloc = SWAAllocator(
            FULL_PAGES * self.ps, SWA_PAGES * self.ps, self.ps, DEVICE, "torch"
        )
        self.tree = RadixTree(self.alloc, self.ps, self.window, policy)
        self.seqs: set[tuple[int, ...]] = set()  # cached sequences (whole pages)
        self.owner: dict[int, tuple[int, ...]] = {}  # cached slot -> tokens up to it
        self.locks: list[tuple[LockHandle, list[int]]] = []  # (handle, locked tokens)

    # ---------------------------------------------------------------- drawing

    def _seq(self, data: st.DataObject, tail: bool = False) -> list[int]:
        """A sequence extending a random page-prefix of a cached one (so splits happen)."""
        ps = self.ps
        base: list[int] = []
        if self.seqs and data.draw(st.integers(0, 3)):
            base = list(data.draw(st.sampled_from(sorted(self.seqs))))
            base = base[: data.draw(st.integers(0, len(base) // ps)) * ps]
        room = MAX_PAGES - len(base) // ps
        extra = data.draw(st.integers(0 if base else 1, room))
        page = st.lists(st.integers(0, 2), min_size=ps, max_size=ps)
        for p in data.draw(st.lists(page, min_size=extra, max_size=extra)):
            base += p
        if tail:
            base += data.draw(st.lists(st.integers(0, 2), max_size=ps - 1))
        return base

    # ---------------------------------------------------------------- model sync

    def _learn_evictions(self) -> None:
        """Truncate each model sequence to what the tree still holds (eviction only removes)."""
        kept = set()
        for seq in self.seqs:
            n = cached_path(self.tree, list(seq)).numel()
            if n:
                kept.add(seq[:n])
        self.seqs = kept

    def _check_match(self, tokens: list[int], max_len: int | None, m: MatchResult) -> None:
        """Page-aligned, within ``max_len`` and the model, slots mapping back to ``tokens``."""
        ps = self.ps
        assert m.length % ps == 0 and m.last_node.end == m.length
        if max_len is not None:
            assert m.length <= max_len
        longest = max((_common(tokens, s) for s in self.seqs), default=0)
        assert m.length <= longest - longest % ps
        slots = m.prefix_slots.tolist()
        for i, s in enumerate(slots):
            assert self.owner[s] == tuple(tokens[: i + 1]), "slot maps to other tokens"
        assert node_tokens(m.last_node) == tokens[: m.length]

    # ---------------------------------------------------------------- rules

    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        """A request: match (or not), lock, evict to make room, allocate, insert, unlock."""
        tree, alloc, ps = self.tree, self.alloc, self.ps
        tokens = self._seq(data)
        n = len(tokens)
        own, h, prefix = 0, None, tree.root.full
        if data.draw(st.integers(0, 3)):  # mostly the server path; else all slots new
            m = tree.match_prefix(tokens)
            self._check_match(tokens, None, m)
            own, h, prefix = m.length, tree.inc_lock(m.last_node), m.prefix_slots
        swa_from = data.draw(st.just(own // ps) | st.integers(own // ps, n // ps)) * ps
        need = n - own
        short_full = max(0, need - alloc.full_available)
        short_swa = max(0, need - alloc.swa_available)
        if short_full or short_swa:
            self._evict(short_full, short_swa)
            assert expected_match_len(tree, alloc, tokens[:own]) == own, "own prefix evicted"
        if need > alloc.full_available or need > alloc.swa_available:
            if h is not None:
                tree.dec_lock(h)
            return
        new = fresh(alloc, need)
        alloc.free_swa(new[: swa_from - own])
        cached_before = cached_path(tree, tokens).numel()
        free_before = free_full(alloc)
        slots = torch.cat([prefix, new])
        node, _ = tree.insert(tokens, slots, own, swa_from)
        assert node.end == n and node_tokens(node) == tokens
        # the caller's pages that duplicate cached ones come back first, sorted
        dup = sorted({int(s) // ps for s in slots[own:cached_before]})
        assert free_full(alloc) == dup + free_before
        for i in range(max(own, cached_before), n):
            self.owner[int(slots[i])] = tuple(tokens[: i + 1])
        path = cached_path(tree, tokens)
        assert path.numel() == n
        if self.window is not None:
            after = (alloc.full_to_swa[path[max(own, swa_from) :]] != 0).tolist()
            assert all(after), "positions past swa_from lost their SWA KV"
            fresh_tomb = alloc.full_to_swa[path[max(own, cached_before) : swa_from]]
            assert not bool(fresh_tomb.any()), "a new node before swa_from has SWA KV"
        if h is not None:
            tree.dec_lock(h)
        self.seqs.add(tuple(tokens))

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        """A match equals the naive oracle and maps back to the inserted tokens."""
        tokens = self._seq(data, tail=True)
        max_len = data.draw(st.none() | st.integers(0, len(tokens) + self.ps))
        want = expected_match_len(self.tree, self.alloc, tokens, max_len)
        m = self.tree.match_prefix(tokens, max_len)
        assert m.length == want
        self._check_match(tokens, max_len, m)

    @precondition(lambda self: len(self.locks) < 3)
    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        """Lock a random match (as a running request would)."""
        tokens = self._seq(data, tail=True)
        m = self.tree.match_prefix(tokens)
        self.locks.append((self.tree.inc_lock(m.last_node), tokens[: m.length]))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        """Release a random lock."""
        i = data.draw(st.integers(0, len(self.locks) - 1))
        handle, _ = self.locks.pop(i)
        self.tree.dec_lock(handle)

    @rule(data=st.data())
    def lock_roundtrip(self, data: st.DataObject) -> None:
        """Lock then unlock leaves every counter exactly as it was (splits included)."""
        tokens = self._seq(data, tail=True)
        m = self.tree.match_prefix(tokens)
        before = counters(self.tree)
        h = self.tree.inc_lock(m.last_node)
        assert self.tree.evictable_full <= before[2] and self.tree.evictable_swa <= before[3]
        self.tree.dec_lock(h)
        assert counters(self.tree) == before

    @rule(full=st.just(0) | st.integers(0, 30), swa=st.just(0) | st.integers(0, 30))
    def evict(self, full: int, swa: int) -> None:
        """Evict random amounts of both pools."""
        self._evict(full * self.ps // 4, swa * self.ps // 4)

    def _evict(self, full: int, swa: int) -> None:
        """Evict; check the result against counters, pools and locks; learn what went."""
        tree, alloc = self.tree, self.alloc
        cached_f, cached_s, ev_f, ev_s = counters(tree)
        avail = alloc.full_available, alloc.swa_available
        res = tree.evict(EvictParams(full=full, swa=swa))
        assert res.full == cached_f - tree.cached_full
        assert res.swa == cached_s - tree.cached_swa
        assert alloc.full_available == avail[0] + res.full
        if self.window is not None:
            assert alloc.swa_available == avail[1] + res.swa
            if swa <= ev_s:
                assert res.swa >= swa, "SWA eviction stopped short"
        if full <= ev_f:
            assert res.full >= full, "full eviction stopped short"
        tree.check()
        for _, tokens in self.locks:
            assert tree.match_prefix(tokens).length == len(tokens), "a locked prefix was evicted"
        before = set(self.seqs)
        self._learn_evictions()
        assert all(any(b[: len(s)] == s for b in before) for s in self.seqs)

    # ---------------------------------------------------------------- invariants

    @invariant()
    def consistent(self) -> None:
        """check()s, conservation, tree == model, slot owners, locked prefixes usable."""
        if not hasattr(self, "tree"):
            return
        tree, alloc, ps = self.tree, self.alloc, self.ps
        verify(tree, alloc)
        prefixes = {s[:k] for s in self.seqs for k in range(ps, len(s) + 1, ps)}
        assert tree.cached_full == ps * len(prefixes), "the tree holds what the model does not"
        for seq in self.seqs:
            slots = cached_path(tree, list(seq)).tolist()
            assert len(slots) == len(seq)
            for i, s in enumerate(slots):
                assert self.owner[s] == seq[: i + 1]
        for handle, tokens in self.locks:
            assert node_tokens(handle.node) == tokens
            assert expected_match_len(tree, alloc, tokens) == len(tokens)


def _common(a: list[int], b: tuple[int, ...]) -> int:
    """Length of the common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


TreeMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_tree_state_machine = TreeMachine.TestCase


# ----------------------------------------------------------------------- SWA hit rate


def serve_chat(policy: str, swa_tokens: int) -> tuple[int, int]:
    """Round-robin chat turns over branches sharing a system prompt, as a server drives it.

    Each request: match, lock, evict what its new tokens need, allocate, insert, unlock.
    Returns (matched tokens, reusable tokens: each request's previous context).
    """
    ps, window, branches, turns, turn_len = 4, 16, 8, 5, 24
    alloc = SWAAllocator(4096, swa_tokens, ps, DEVICE, "torch")
    tree = RadixTree(alloc, ps, window, policy)
    rng = random.Random(0)
    system = [rng.randrange(1000) for _ in range(32)]
    history = [list(system) for _ in range(branches)]
    hit = reusable = 0
    for _ in range(turns):
        for b in range(branches):
            tokens = history[b] + [rng.randrange(1000) for _ in range(turn_len)]
            m = tree.match_prefix(tokens)
            hit, reusable = hit + m.length, reusable + len(history[b])
            h = tree.inc_lock(m.last_node)
            need = len(tokens) - m.length
            tree.evict(
                EvictParams(
                    full=max(0, need - alloc.full_available),
                    swa=max(0, need - alloc.swa_available),
                )
            )
            tree.insert(tokens, torch.cat([m.prefix_slots, fresh(alloc, need)]), m.length, m.length)
            tree.dec_lock(h)
            verify(tree, alloc)
            history[b] = tokens
    return hit, reusable


def test_window_eviction_beats_lru_on_branch_hits() -> None:
    """Tight SWA pool, 8 chat branches over one prompt: 'window' keeps more SWA-usable hits."""
    swa_tokens = 8 * 16 + 16 + 64  # every branch's last window, the prompt's, one turn's room
    win_hit, total = serve_chat("window", swa_tokens)
    lru_hit, total_lru = serve_chat("lru", swa_tokens)
    assert total == total_lru
    print(f"\nSWA hit rate: window {win_hit / total:.3f}  lru {lru_hit / total:.3f}")
    assert win_hit > lru_hit


def _drift_counter(tree: RadixTree) -> None:
    tree.full_part.cached += 2


def _unmap_swa(tree: RadixTree) -> None:
    next(iter(tree.root.children.values())).swa = False


def _lose_lru(tree: RadixTree) -> None:
    tree.full_part.lru.heap.clear()
    tree.full_part.lru.queued.clear()


def _negative_lock(tree: RadixTree) -> None:
    next(iter(tree.root.children.values())).swa_lock = -1


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (_drift_counter, "full counters"),
        (_unmap_swa, "SWA map mismatch"),
        (_lose_lru, "full LRU misses a candidate"),
        (_negative_lock, "a negative SWA lock"),
    ],
)
def test_check_raises_check_error(break_it: Callable[[RadixTree], None], message: str) -> None:
    """A broken invariant is a CheckError from check() (an assert would vanish under -O)."""
    alloc, tree = make_tree(2, 4)
    insert_new(tree, alloc, pages(2, 1, 2, 3))
    tree.check()
    break_it(tree)
    with pytest.raises(CheckError, match=message):
        tree.check()


def test_tree_package_has_no_bare_assert() -> None:
    """Invariants in hybridkv.tree go through ``ensure``: no ``assert`` statement."""
    tree_dir = Path(radix.__file__).parent
    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted(tree_dir.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert not found, found
