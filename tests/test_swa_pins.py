"""SWA pins inside nodes: locks and slides never split; SWA eviction splits at the first pin."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_tree import counters, insert_new, make_tree, pages, verify

from hybridkv.tree import EvictParams, LockHandle


def test_slide_within_and_across_nodes_never_splits() -> None:
    """A pin slides inside a node, onto a boundary and into the next node: no split, exact
    evictable counts."""
    ps, window = 4, 16
    alloc, tree = make_tree(ps, window)
    a = pages(ps, 1, 2, 3, 4, 5, 6)
    insert_new(tree, alloc, a)
    insert_new(tree, alloc, pages(ps, 1, 2, 3, 9))  # nodes [0, 12), [12, 24), [12, 16)
    nodes = len(tree.nodes())
    h = tree.inc_lock(tree.match_prefix(a).last_node)
    assert h.swa_start == 8 and len(tree.nodes()) == nodes
    cached = tree.cached_swa
    for start in (8, 12, 16, 20, 24, 24):
        h = tree.slide_swa_locks([h], [start])[0]
        assert h.swa_start == start and len(tree.nodes()) == nodes
        assert tree.evictable_swa == cached - (24 - start)
        verify(tree, alloc)
    tree.dec_lock(h)
    assert tree.evictable_swa == cached and len(tree.nodes()) == nodes
    verify(tree, alloc)


def test_eviction_splits_at_the_first_pin() -> None:
    """Tombstoning a partly pinned node splits it at its first pin: only the part before
    is tombstoned; the pins below become whole locks of the rest (plain LRU policy: the
    window policy would split off the protected last window as well)."""
    ps, window = 4, 8
    alloc, tree = make_tree(ps, window, "lru")
    a = pages(ps, 1, 2, 3, 4, 5, 6)
    insert_new(tree, alloc, a)
    node = tree.match_prefix(a).last_node
    h1, h2 = tree.inc_lock(node, 8), tree.inc_lock(node, 16)
    assert len(tree.nodes()) == 1 and node.swa_pins == [8, 16]
    assert counters(tree) == (24, 24, 0, 8)
    assert tree.evict(EvictParams(swa=100)).swa == 8
    assert [(n.start, n.end, n.swa, n.swa_lock, n.swa_pins) for n in tree.nodes()] == [
        (0, 8, False, 0, []),
        (8, 24, True, 1, [16]),
    ]
    verify(tree, alloc)
    tree.dec_lock(h1)
    assert tree.evictable_swa == 8
    verify(tree, alloc)
    assert tree.evict(EvictParams(swa=100)).swa == 8
    assert sorted((n.start, n.swa, n.swa_lock, n.swa_pins) for n in tree.nodes()) == [
        (0, False, 0, []),
        (8, False, 0, []),
        (16, True, 1, []),
    ]
    verify(tree, alloc)
    tree.dec_lock(h2)
    verify(tree, alloc)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["lock", "slide", "unlock", "evict", "match"]),
        st.integers(0, 1000),
        st.integers(0, 8),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, policy=st.sampled_from(["window", "lru"]))
def test_random_lock_slide_unlock_keeps_counts_exact(ops: list, policy: str) -> None:
    """Random locks, slides, unlocks, matches (splits) and evictions: check() every step."""
    ps, window = 2, 6
    alloc, tree = make_tree(ps, window, policy)
    prompts = [pages(ps, 1, 2, 3, 4, 5, 6, 7), pages(ps, 1, 2, 3, 8, 9), pages(ps, 1, 2, 10)]
    for p in prompts:
        insert_new(tree, alloc, p)
    handles: list[LockHandle] = []
    for op, x, k in ops:
        if op == "lock":
            prompt = prompts[x % len(prompts)]
            m = tree.match_prefix(prompt)
            if m.length and not m.swa_nodes:
                end = m.last_node.end
                handles.append(tree.inc_lock(m.last_node, max(0, end - 2 * k * ps)))
        elif op == "slide" and handles:
            i = x % len(handles)
            h = handles[i]
            handles[i] = tree.slide_swa_locks([h], [h.swa_start + k * ps])[0]
        elif op == "unlock" and handles:
            tree.dec_lock(handles.pop(x % len(handles)))
        elif op == "evict":
            tree.evict(EvictParams(swa=k * ps))
        elif op == "match":
            prompt = prompts[x % len(prompts)]
            tree.match_prefix(prompt, (x % len(prompt)) // ps * ps)
        verify(tree, alloc)
        for h in handles:
            n = h.node
            while n.parent is not None and n.end > h.swa_start:
                assert n.swa, "a pinned node lost its SWA KV"
                n = n.parent
    for h in handles:
        tree.dec_lock(h)
    verify(tree, alloc)
    assert not any(n.swa_lock or n.swa_pins or n.full_lock for n in tree.nodes())
