"""The arena: one byte budget for the full, SWA and state pools, in chunks that migrate.

Hand-computed chunk/page arithmetic; the free stack growing and shrinking with its undo;
pages migrating both ways under the FakeEngine (which verifies KV every step); a property
test over arena configs with ``check()`` after every step; the stats' byte gauges.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from workloads import Driver, chat_sessions, random_mix, small_config, tokens

from hybridkv import CacheConfig, MemoryManager, Request
from hybridkv.allocator import ArenaLayout, PagedAllocator
from hybridkv.allocator.arena import FREE, RESERVED
from hybridkv.scheduler.hf_config import from_hf_config
from hybridkv.undo import UndoLog

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_layout_lcm_chunk_and_pages_per_chunk() -> None:
    """Pages of 96 and 160 bytes: LCM 480 (<= 4 * 160), so chunk c holds pages
    [5c, 5c + 5) of the first pool and [3c, 3c + 3) of the second."""
    layout = ArenaLayout.plan(480 * 10 + 100, (96, 160))
    assert (layout.chunk_bytes, layout.num_chunks, layout.total_bytes) == (480, 10, 4800)
    assert layout.pages_in(0, 0) == (0, 5) and layout.pages_in(0, 3) == (15, 20)
    assert layout.pages_in(1, 3) == (9, 12)
    assert layout.capacity(0) == 50 and layout.capacity(1) == 30
    assert layout.min_pages_per_chunk(0) == 5 and layout.min_pages_per_chunk(1) == 3
    assert layout.chunks_of(0, np.array([0, 4, 5, 49])).tolist() == [0, 0, 1, 9]


def test_layout_large_lcm_takes_four_largest_pages() -> None:
    """Pages of 256 and 1000 bytes: LCM 32000 > 4 * 1000, so the chunk is 4000 bytes; a
    256-byte page straddling a chunk boundary belongs to no chunk."""
    layout = ArenaLayout.plan(4000 * 3, (256, 1000))
    assert layout.chunk_bytes == 4000
    # chunk 1 is bytes [4000, 8000): 256-byte pages 16..30 lie in it (15 at 3840 straddles)
    assert layout.pages_in(0, 1) == (16, 31) and layout.pages_in(0, 0) == (0, 15)
    assert layout.pages_in(1, 1) == (4, 8)
    assert layout.min_pages_per_chunk(0) == 14  # a bound below every chunk's 15 or 16
    assert layout.min_pages_per_chunk(1) == 4


def test_config_arena_sizes_and_validation() -> None:
    """An arena config ignores swa_tokens / state_slots; too few bytes name memory_bytes."""
    cfg = small_config(memory_bytes=40 * 256, swa_tokens=0)
    # 2 full and 2 SWA layers, 2 heads of 4, bf16: 64 bytes a token, 256 a page of 4
    assert cfg.token_bytes == {"full": 64, "swa": 64, "state": 0}
    assert cfg.arena_layout == ArenaLayout(256, 40, (256, 256))
    # reserved chunk + 2 full pages + min SWA (window 10: 3 pages, + 2, + lock step - page)
    assert cfg.arena_min_chunks == 1 + 2 + cfg.min_swa_tokens // 4
    assert cfg.full_capacity == (40 - cfg.arena_min_chunks + 2) * 4
    with pytest.raises(ValueError, match="memory_bytes"):
        small_config(memory_bytes=(cfg.arena_min_chunks - 1) * 256)
    with pytest.raises(ValueError, match="memory_bytes"):
        small_config(memory_bytes=0)
    mamba = small_config(
        num_layers=3,
        swa_layer_ids=(0,),
        mamba_layer_ids=(1,),
        state_shape=(2, 3),
        memory_bytes=64 * 256,
    )
    assert mamba.arena_pools == ("full", "swa", "state")
    # pages of 128 (full, SWA) and a 12-byte state slot: LCM 384 <= 4 * 128
    assert mamba.arena_layout.chunk_bytes == 384


def test_from_hf_config_arena_by_default_static_on_request() -> None:
    tiny = dict(
        model_type="gemma2",
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        hidden_size=16,
        head_dim=8,
        sliding_window=8,
        torch_dtype="float32",
    )
    arena = from_hf_config(tiny, 1 << 20, page_size=4, device="cpu", backend="torch")
    assert arena.memory_bytes == 1 << 20 and arena.arena
    static = from_hf_config(tiny, 1 << 20, swa_full_tokens_ratio=0.5, page_size=4, device="cpu")
    assert static.memory_bytes is None and static.swa_tokens < static.full_tokens


def test_free_stack_grows_shrinks_and_undoes() -> None:
    """add_pages appends (handed out last); reorder_free drops pages; a failed step puts the
    stack and its ends back."""
    undo = UndoLog()
    alloc = PagedAllocator(16 * 4, 4, "cpu", "torch", undo, empty=True)
    assert alloc.free_page_count == 0 and alloc.alloc_pages(1) is None
    alloc.add_pages(np.arange(5, 10))
    assert alloc.alloc_pages(2).tolist() == [5, 6] and alloc.owned_pages == 5
    before = (alloc.free_pages_view().tolist(), alloc._head, alloc._end)
    with pytest.raises(RuntimeError), undo.step():
        alloc.add_pages(np.arange(10, 15))
        alloc.reorder_free(np.array([14, 9, 7]))
        assert alloc.free_pages_view().tolist() == [14, 9, 7] and alloc.owned_pages == 5
        alloc.alloc_pages(3)
        raise RuntimeError
    assert (alloc.free_pages_view().tolist(), alloc._head, alloc._end) == before
    alloc.check()


def _owners(mm: MemoryManager) -> dict[int, int]:
    return {c: int(o) for c, o in enumerate(mm.arena.owner) if o >= 0}


def test_pages_migrate_both_ways_with_exact_kv() -> None:
    """Decode-heavy requests, then long prompts, then decode-heavy again: chunks move from
    the SWA pool to the full pool and back, the FakeEngine verifying every request's KV
    (full and SWA window) each step and check() covering the arena after every step."""
    cfg = small_config(memory_bytes=30 * 256, sliding_window=16, max_context_len=128)
    mm = MemoryManager(cfg)
    driver, rng = Driver(mm), random.Random(3)
    last: dict[int, int] = {}
    moves: set[tuple[int, int]] = set()

    def run(prefix: str, n: int, prompt: int, new: int) -> None:
        for i in range(n):
            driver.add(Request(f"{prefix}{i}", tokens(rng, prompt), new))
        while driver.live:
            driver.step()
            for chunk, owner in _owners(mm).items():
                if last.get(chunk, owner) != owner:
                    moves.add((last[chunk], owner))
                last[chunk] = owner

    run("a", 8, 6, 30)
    run("b", 6, 60, 2)
    run("c", 8, 6, 30)
    assert (0, 1) in moves and (1, 0) in moves, moves
    stats = mm.stats()
    assert stats["memory_bytes"] == 30 * 256 and 0 < stats["used_bytes"] <= 29 * 256


def test_stats_bytes_static_and_arena() -> None:
    """memory_bytes: the static pools with their page 0, or the arena; used_bytes: pages
    allocated now (running or cached), page 0 not counted."""
    static = MemoryManager(small_config(full_tokens=64, swa_tokens=32))
    s = static.stats()
    assert s["memory_bytes"] == (64 + 4) * 64 + (32 + 4) * 64 and s["used_bytes"] == 0
    arena = MemoryManager(small_config(memory_bytes=40 * 256))
    assert arena.stats()["memory_bytes"] == 40 * 256
    for mm in (static, arena):
        mm.add_request(Request("r", list(range(9)), 3))
        plan = mm.schedule()
        mm.commit(plan, [1])
        # 10 tokens: 3 full pages and 3 SWA pages (window 10) of 256 bytes
        assert mm.stats()["used_bytes"] == 6 * 256
        mm.check()


def test_all_swa_model_keeps_an_index_full_pool_outside() -> None:
    """Every attention layer slides: the full pool holds no bytes and keeps full_tokens; the
    arena holds the SWA pool only."""
    cfg = small_config(swa_layer_ids=(0, 1, 2, 3), memory_bytes=40 * 512, full_tokens=128)
    assert cfg.arena_pools == ("swa",)
    mm = MemoryManager(cfg)
    assert mm.allocator.full.owned_pages == 32 and mm.kv.full_buf.numel() == 0
    rng = random.Random(5)
    stats = Driver(mm).run(random_mix(rng, 12, prompt_len=(1, 30)))
    assert stats["memory_bytes"] == 40 * 512


def test_arena_with_recurrent_state_and_host_tier() -> None:
    """State slots share the arena; the host tier copies page-major arena views."""
    cfg = small_config(
        num_layers=3,
        swa_layer_ids=(0,),
        mamba_layer_ids=(1,),
        state_shape=(2, 3),
        memory_bytes=48 * 384,
        host_tokens=128,
        write_policy="write_back",
    )
    mm = MemoryManager(cfg)
    rng = random.Random(11)
    stats = Driver(mm).run(random_mix(rng, 16, prompt_len=(1, 40)), chat_sessions(rng, 3))
    assert stats["loaded_tokens"] + stats["device_hit_tokens"] > 0


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    ps=st.sampled_from([1, 2, 4, 8]),
    layout=st.sampled_from([((1, 3), ()), ((), ()), ((0, 1, 2, 3), ()), ((1,), (2, 3))]),
    window=st.integers(1, 20),
    extra=st.integers(0, 24),
    host=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_arena_runs_checked(
    ps: int,
    layout: tuple[tuple[int, ...], tuple[int, ...]],
    window: int,
    extra: int,
    host: bool,
    seed: int,
) -> None:
    """Random small arenas (a few chunks above the smallest) run a random mix to the end:
    the Driver checks KV, check() (chunks, pages by bytes) and the gauges after each step."""
    swa, mamba = layout
    base = small_config(
        page_size=ps,
        swa_layer_ids=swa,
        mamba_layer_ids=mamba,
        state_shape=(2, 3) if mamba else (),
        state_slots=3 if mamba else 0,
        sliding_window=window,
        chunked_prefill_size=8 * ps,
        max_prefill_tokens=16 * ps,
        max_context_len=96,
        host_tokens=64 * ps if host else 0,
    )
    probe = base.replace(memory_bytes=1 << 30).arena_layout
    chunk = probe.chunk_bytes
    least = base.replace(memory_bytes=1 << 30).arena_min_chunks
    full_pages = -(-96 // ps) + 1
    per_chunk = probe.min_pages_per_chunk(0)
    cfg = base.replace(memory_bytes=(least + -(-full_pages // per_chunk) + extra) * chunk)
    mm = MemoryManager(cfg)
    rng = random.Random(seed)
    Driver(mm).run(random_mix(rng, 10, prompt_len=(1, 40), new_tokens=(1, 20)))
    mm.check()
    assert (
        mm.arena.owner[0] == RESERVED
        and (mm.arena.owner >= FREE).sum() == cfg.arena_layout.num_chunks - 1
    )


def test_cache_config_stays_hashable_and_replaceable() -> None:
    cfg = CacheConfig(
        num_layers=2,
        num_kv_heads=1,
        head_dim=4,
        memory_bytes=1 << 20,
        device="cpu",
        swa_layer_ids=(1,),
        sliding_window=8,
        page_size=4,
    )
    assert hash(cfg) == hash(cfg.replace()) and cfg.replace(memory_bytes=None).arena_layout is None
    assert torch.device(cfg.device).type == "cpu"
