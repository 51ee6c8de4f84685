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
