"""MemoryManager: a prefill-heavy step with prefix hits (CPU, torch backend).

    pytest benchmarks/bench_manager.py --benchmark-only

``BATCH`` requests of 1024 prompt tokens arrive at once; the first 768 of each are a cached
system prompt. One round is ``schedule()`` (match, lock, admission, one allocation per
pool, req_to_token and page tables) plus ``commit()`` (each prefilled chunk given to the
tree). Decode-step overhead at 64/256/1024 running requests is in ``bench_sim.py``.
"""

from __future__ import annotations

import pytest
import torch

from hybridkv import CacheConfig, MemoryManager, Request

PROMPT, SHARED = 1024, 768


def _manager(batch: int) -> MemoryManager:
    cfg = CacheConfig(
        num_layers=4,
        swa_layer_ids=(1, 2),
        num_kv_heads=1,
        head_dim=8,
        page_size=16,
        sliding_window=512,
        full_tokens=(batch + 2) * 2 * PROMPT,
        swa_tokens=(batch + 2) * 2 * PROMPT,
        chunked_prefill_size=PROMPT,
        max_prefill_tokens=batch * PROMPT,
        max_running_requests=batch + 1,
        max_context_len=2 * PROMPT,
        dtype=torch.float32,
        device="cpu",
        backend="torch",
    )
    mm = MemoryManager(cfg)
    mm.add_request(Request("warm", list(range(SHARED + 16)), 1))
    while (plan := mm.schedule()) is not None:
        mm.commit(plan, [0] * len(plan.reqs))
    for i in range(batch):
        mm.add_request(Request(f"r{i}", list(range(SHARED)) + [i + 1] * (PROMPT - SHARED), 8))
    return mm


@pytest.mark.parametrize("batch", [8, 64])
def test_prefill_step_with_prefix_hits(benchmark, batch: int) -> None:
    """schedule() + commit() of a step admitting every request, 75% of each prompt cached."""

    def step(mm: MemoryManager) -> None:
        plan = mm.schedule()
        assert plan is not None and len(plan.reqs) == batch
        mm.commit(plan, [0] * batch)

    benchmark.extra_info["prompt_tokens"] = batch * PROMPT
    benchmark.pedantic(step, setup=lambda: ((_manager(batch),), {}), rounds=10)
