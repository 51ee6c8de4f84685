"""Simulator steps: manager overhead of a decode step at 64, 256 and 1024 running requests.

    pytest benchmarks/bench_sim.py --benchmark-only

The simulator's default model shape (8 layers, 6 of them SWA) with a 128-token window, so
pages slide out of every request's window as it decodes. Set-up prefills ``running``
requests of ``PROMPT`` tokens and decodes until every one of them is in steady decode.
One round is one step of the MemoryManager alone: ``schedule()`` (SWA release, eviction
check, one ``alloc_decode``, req_to_token, both page tables) plus ``commit()``; the engine's
K/V writes and verification are not part of it (``python -m hybridkv.sim`` reports the
same per-step overhead over a whole workload).
"""

from __future__ import annotations

import pytest
import torch

from hybridkv import CacheConfig, MemoryManager, Request

PROMPT = 192
WINDOW = 128
ROUNDS, WARMUP = 50, 5
MAX_NEW = 2 * (ROUNDS + WARMUP) + 32  # nobody finishes while timed


def _decoding_manager(running: int) -> MemoryManager:
    """A manager whose next ``schedule()`` decodes all ``running`` requests."""
    ps = 16
    cfg = CacheConfig(
        num_layers=8,
        swa_layer_ids=(1, 2, 3, 5, 6, 7),
        num_kv_heads=1,
        head_dim=8,
        page_size=ps,
        sliding_window=WINDOW,
        full_tokens=running * (PROMPT + MAX_NEW + 2 * ps),
        # NOTE: the tree keeps each prompt's last window locked while the request decodes
        # and grows its own window beside it: a prompt and a window (and pages) each.
        swa_tokens=running * (PROMPT + WINDOW + 4 * ps),
        max_running_requests=running,
        max_context_len=PROMPT + MAX_NEW,
        dtype=torch.bfloat16,
        device="cpu",
        backend="torch",
    )
    mm = MemoryManager(cfg)
    for i in range(running):
        # distinct first tokens: no prefix sharing, every request owns its pages
        mm.add_request(Request(f"r{i}", [i, *range(1, PROMPT)], MAX_NEW))
    while True:
        plan = mm.schedule()
        assert plan is not None, "set-up stalled"
        mm.commit(plan, [1] * len(plan.reqs))
        if plan.reqs[0].is_decode and len(plan.reqs) == running:
            break
    stats = mm.stats()
    assert stats["running"] == running and stats["waiting"] == 0
    return mm


@pytest.mark.parametrize("running", [64, 256, 1024])
def test_decode_step(benchmark, running: int) -> None:
    """schedule() + commit() of a decode step of every running request."""
    mm = _decoding_manager(running)
    tokens = [1] * running

    def step() -> None:
        plan = mm.schedule()
        assert plan is not None and len(plan.reqs) == running
        mm.commit(plan, tokens)

    benchmark.group = "sim decode step"
    benchmark.extra_info["running"] = running
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    mm.check()
