"""Decode steps: manager overhead at 64, 256 and 1024 running requests (CPU, torch path).

    pytest benchmarks/bench_sim.py --benchmark-only

Two model shapes: the simulator's default hybrid (8 layers, 6 of them SWA, a 128-token
window, so pages slide out of every request's window as it decodes) and the same model
with full attention only. Set-up prefills ``running`` requests of ``PROMPT`` tokens and
decodes until every one of them is in steady decode. One round is one step of the
MemoryManager alone: ``schedule()`` (SWA release, eviction check, one ``alloc_decode`` per
pool, req_to_token, the page tables) plus ``commit()``; the engine's K/V writes are not part
of it (``python -m hybridkv.sim`` reports the same per-step overhead over a whole workload).
"""

from __future__ import annotations

import pytest
import torch

from hybridkv import CacheConfig, MemoryManager, Request

PROMPT = 192
WINDOW = 128
ROUNDS, WARMUP = 50, 5
MAX_NEW = 2 * (ROUNDS + WARMUP) + 32  # nobody finishes while timed


def _size(plan: object) -> int:
    # NOTE: plans before the step engine had no len(); the same file times both.
    return len(plan) if hasattr(type(plan), "__len__") else len(plan.reqs)


def _decoding_manager(running: int, swa: bool) -> MemoryManager:
    """A manager whose next ``schedule()`` decodes all ``running`` requests."""
    ps = 16
    cfg = CacheConfig(
        num_layers=8,
        swa_layer_ids=(1, 2, 3, 5, 6, 7) if swa else (),
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
        n = _size(plan)
        mm.commit(plan, [1] * n)
        if plan.reqs[0].is_decode and n == running:
            break
    stats = mm.stats()
    assert stats["running"] == running and stats["waiting"] == 0
    return mm


@pytest.mark.parametrize("model", ["swa", "full"])
@pytest.mark.parametrize("running", [64, 256, 1024])
def test_decode_step(benchmark, running: int, model: str) -> None:
    """schedule() + commit() of a decode step of every running request."""
    mm = _decoding_manager(running, model == "swa")
    tokens = [1] * running

    def step() -> None:
        plan = mm.schedule()
        assert plan is not None and _size(plan) == running
        mm.commit(plan, tokens)

    benchmark.group = f"decode step, {model}"
    benchmark.extra_info["running"] = running
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    mm.check()
