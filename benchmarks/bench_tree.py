"""Radix tree: match, insert and evict, per call and per token (CPU, torch backend).

    pytest benchmarks/bench_tree.py --benchmark-only

A tree holds ``BRANCHES`` conversations of ``LENGTH`` tokens sharing a ``SHARED``-token
system prompt (page 16, window 512). Times are reported, never asserted.
"""

from __future__ import annotations

import random

import pytest
import torch

from hybridkv.allocator import SWAAllocator
from hybridkv.tree import EvictParams, RadixTree

PAGE, WINDOW, SHARED, LENGTH = 16, 512, 1024, 2048


def _tree(branches: int) -> tuple[RadixTree, SWAAllocator, list[list[int]]]:
    rng = random.Random(0)
    alloc = SWAAllocator((branches + 4) * LENGTH, (branches + 4) * LENGTH, PAGE, "cpu", "torch")
    tree = RadixTree(alloc, PAGE, WINDOW)
    system = [rng.randrange(32000) for _ in range(SHARED)]
    seqs = []
    for _ in range(branches):
        seq = system + [rng.randrange(32000) for _ in range(LENGTH - SHARED)]
        _insert(tree, alloc, seq)
        seqs.append(seq)
    return tree, alloc, seqs


def _insert(tree: RadixTree, alloc: SWAAllocator, seq: list[int]) -> None:
    slots = alloc.alloc_extend(torch.tensor([0]), torch.tensor([len(seq)]), torch.tensor([-1]))
    assert slots is not None
    tree.insert(seq, slots, 0, 0)


@pytest.mark.parametrize("branches", [16, 256])
def test_match(benchmark, branches: int) -> None:
    """match_prefix of a cached conversation (hits its whole length)."""
    tree, _, seqs = _tree(branches)
    benchmark.extra_info["tokens"] = LENGTH
    result = benchmark(lambda: tree.match_prefix(seqs[branches // 2]))
    assert result.length == LENGTH


@pytest.mark.parametrize("branches", [16, 256])
def test_insert(benchmark, branches: int) -> None:
    """insert of a new conversation under the shared system prompt."""
    rng = random.Random(1)

    def setup() -> tuple[tuple, dict]:
        tree, alloc, seqs = _tree(branches)
        seq = seqs[0][:SHARED] + [rng.randrange(32000) for _ in range(LENGTH - SHARED)]
        return (tree, alloc, seq), {}

    benchmark.extra_info["tokens"] = LENGTH
    benchmark.pedantic(_insert, setup=setup, rounds=20)


@pytest.mark.parametrize("branches", [16, 256])
def test_evict(benchmark, branches: int) -> None:
    """evict of a quarter of the cached conversations (full) and their SWA."""
    target = branches // 4 * (LENGTH - SHARED)

    def setup() -> tuple[tuple, dict]:
        tree, _, _ = _tree(branches)
        return (tree,), {}

    benchmark.extra_info["tokens"] = target
    benchmark.pedantic(
        lambda tree: tree.evict(EvictParams(full=target, swa=target)), setup=setup, rounds=10
    )


# ------------------------------------------------------------------ per-call evict on a chat trace

CONVS, TURNS, TURN = 64, 4, 256  # conversations, turns each, tokens per turn (prompt + reply)


def _turn(tree: RadixTree, alloc: SWAAllocator, seq: list[int]) -> None:
    """One finished request: the caller kept SWA KV for its last window only."""
    slots = alloc.alloc_extend(torch.tensor([0]), torch.tensor([len(seq)]), torch.tensor([-1]))
    assert slots is not None
    swa_from = max(0, len(seq) - WINDOW - PAGE)
    swa_from -= swa_from % PAGE
    alloc.free_swa(slots[:swa_from])
    tree.match_prefix(seq)
    tree.insert(seq, slots, 0, swa_from)


def _chat_tree() -> tuple[RadixTree, list[list[int]]]:
    """64 chats under a shared system prompt, turns interleaved; every fourth chat branches
    off another one's first turn (a regenerated reply)."""
    rng = random.Random(0)
    size = CONVS * (SHARED + TURNS * TURN) * 2
    alloc = SWAAllocator(size, size, PAGE, "cpu", "torch")
    tree = RadixTree(alloc, PAGE, WINDOW)
    system = [rng.randrange(32000) for _ in range(SHARED)]
    convs = [list(system) for _ in range(CONVS)]
    for turn in range(TURNS):
        for c in rng.sample(range(CONVS), CONVS):
            if turn == 1 and c % 4 == 3:
                convs[c] = convs[c - 1][: SHARED + TURN // 2]
            convs[c] += [rng.randrange(32000) for _ in range(TURN)]
            _turn(tree, alloc, convs[c])
    return tree, convs


@pytest.mark.parametrize("frees", ["pools", "tree_only"])
@pytest.mark.parametrize("pool", ["full", "swa"])
def test_evict_per_call(benchmark, pool: str, frees: str) -> None:
    """evict of one page (full, or SWA) per call on the chat tree, a match of a random chat
    between calls (LRU order changes, matches split nodes); the tree is rebuilt when a
    quarter of it is gone. ``tree_only`` stubs the allocator's frees out: the tree's own
    share of the call (picking victims, splitting, counters)."""
    rng = random.Random(2)
    state: dict[str, object] = {}
    params = EvictParams(full=PAGE) if pool == "full" else EvictParams(swa=PAGE)

    def setup() -> tuple[tuple, dict]:
        tree = state.get("tree")
        if tree is None or tree.cached_full < state["floor"] or tree.evictable_swa < 4 * PAGE:
            tree, convs = _chat_tree()
            if frees == "tree_only":
                tree.allocator.free = tree.allocator.free_swa = lambda slots, **_: None
            state.update(tree=tree, convs=convs, floor=tree.cached_full * 3 // 4)
        tree.match_prefix(rng.choice(state["convs"]))
        return (tree,), {}

    benchmark.extra_info["tokens"] = PAGE
    benchmark.pedantic(lambda tree: tree.evict(params), setup=setup, rounds=2000)
