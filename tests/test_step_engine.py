"""The step engine: a steady decode step never syncs, and its op count does not grow with
the batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from hybridkv import CacheConfig, MemoryManager, Request, kernels
from tests.helpers import DEVICE, count_syncs

PROMPT, WINDOW, PAGE = 64, 32, 16
MAX_NEW = 200


@contextlib.contextmanager
def debug_off() -> Iterator[None]:
    was = kernels.debug_enabled()
    kernels.set_debug(False)
    try:
        yield
    finally:
        kernels.set_debug(was)


def _decoding(running: int, swa: bool, backend: str, arena: bool = False) -> MemoryManager:
    """A manager whose next steps decode all ``running`` requests in lockstep, with room
    for everything (a steady step: nothing to evict or retract), windows past the prompts
    (their locks pin no SWA any more). ``arena``: the same bytes as one arena (its pools
    take free chunks as they grow, which needs no sync)."""
    cfg = CacheConfig(
        num_layers=4,
        swa_layer_ids=(1, 2) if swa else (),
        num_kv_heads=1,
        head_dim=4,
        page_size=PAGE,
        sliding_window=WINDOW,
        full_tokens=running * (PROMPT + MAX_NEW + 2 * PAGE),
        swa_tokens=running * (PROMPT + WINDOW + 4 * PAGE),
        max_running_requests=running,
        max_prefill_tokens=running * PROMPT,
        max_context_len=PROMPT + MAX_NEW,
        dtype=torch.float32,
        device=str(DEVICE),
        backend=backend,
    )
    if arena:
        probe = MemoryManager(cfg).stats()["memory_bytes"]
        cfg = cfg.replace(memory_bytes=probe)
    mm = MemoryManager(cfg)
    for i in range(running):
        mm.add_request(Request(f"r{i}", [i + 1, *range(PROMPT - 1)], MAX_NEW))
    while True:
        plan = mm.schedule()
        assert plan is not None
        mm.commit(plan, [1] * len(plan))
        if plan.batch.is_decode:
            break
    for _ in range(WINDOW + 2 * PAGE):
        mm.commit(mm.schedule(), [1] * running)
    return mm


def _swa_manager(**overrides: object) -> MemoryManager:
    """A small SWA model (layer 1 of 2 is SWA) on the torch backend; ``overrides`` win."""
    fields = dict(
        num_layers=2,
        swa_layer_ids=(1,),
        num_kv_heads=1,
        head_dim=4,
        page_size=4,
        sliding_window=8,
        full_tokens=512,
        swa_tokens=256,
        dtype=torch.float32,
        device=str(DEVICE),
        backend="torch",
    )
    return MemoryManager(CacheConfig(**(fields | overrides)))


def _steps(mm: MemoryManager, steps: int) -> tuple[int, list[str]]:
    """Run decode steps under the counter; return (aten ops, syncs)."""
    n = mm.stats()["running"]
    tokens = [1] * n
    ops, syncs = 0, []
    with debug_off():
        for _ in range(steps):
            with count_syncs() as count:
                plan = mm.schedule()
                mm.commit(plan, tokens)
            assert plan.batch.is_decode and len(plan) == n
            ops += count.ops
            syncs += count.syncs
    return ops, syncs


def _backends() -> list[str]:
    return ["torch", "triton"] if torch.cuda.is_available() else ["torch"]


@pytest.mark.parametrize("arena", [False, True])
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("swa", [False, True])
@pytest.mark.parametrize("running", [1, 64, 256])
def test_steady_decode_step_never_syncs(running: int, swa: bool, backend: str, arena: bool) -> None:
    """A page's worth of steady decode steps (SWA pages slide out, pages fill) makes no
    device->host sync at 1, 64 and 256 running, with static pools or an arena."""
    mm = _decoding(running, swa, backend, arena)
    _, syncs = _steps(mm, PAGE + 1)
    assert syncs == []
    mm.check()


@pytest.mark.parametrize("swa", [False, True])
def test_decode_ops_do_not_grow_with_the_batch(swa: bool) -> None:
    """The same page's worth of steps costs the same aten ops at 1 and 256 running."""
    small = _steps(_decoding(1, swa, "torch"), PAGE)[0]
    large = _steps(_decoding(256, swa, "torch"), PAGE)[0]
    assert large == small
    assert small <= PAGE * (45 if swa else 25)


def test_full_only_model_has_no_swa_pool() -> None:
    """Without SWA layers there is no SWA pool, no map and no SWA page table."""
    mm = _decoding(4, False, "torch")
    assert mm.allocator.swa is None and mm.allocator.full_to_swa is None
    plan = mm.schedule()
    assert plan.swa_pages is None
    mm.commit(plan, [1] * len(plan))
    assert mm.stats()["swa_free"] == 0
    mm.check()


def test_plan_struct_of_arrays_matches_reqs() -> None:
    """qo_indptr, extend starts and lengths agree with plan.reqs, for prefill and decode."""
    mm = _swa_manager()
    mm.add_request(Request("a", list(range(10)), 3))
    mm.add_request(Request("b", list(range(5)), 3))
    for _ in range(3):
        plan = mm.schedule()
        reqs = plan.reqs
        lens = [r.extend_len for r in reqs]
        assert plan.qo_indptr.tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
        assert plan.qo_indptr.dtype == torch.int32
        assert plan.extend_starts.tolist() == [r.extend_start for r in reqs]
        assert plan.extend_lens.tolist() == lens
        assert plan.req_pool_indices.tolist() == [r.req_pool_index for r in reqs]
        assert plan.out_cache_loc.numel() == sum(lens)
        mm.commit(plan, [7] * len(plan))
        mm.check()


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_host_page_tables_equal_the_kernel_reference(page_size: int) -> None:
    """The torch path's host-built page tables equal page_table_reference's, full and SWA,
    for prefill (ragged, chunked, prefix hits) and decode steps."""
    mm = _swa_manager(
        num_layers=3,
        page_size=page_size,
        sliding_window=6,
        full_tokens=2048,
        swa_tokens=1024,
        chunked_prefill_size=32,
    )
    cfg = mm.config
    shared = list(range(40))
    for i, n in enumerate([1, 37, 5, 64, 17]):
        mm.add_request(Request(f"r{i}", shared[: n // 2] + [100 + i] * (n - n // 2), 12))
    steps = 0
    while (plan := mm.schedule()) is not None:
        b = plan.batch
        seq = plan.seq_lens
        starts = torch.as_tensor(b.extend_starts).to(seq.device)
        full = kernels.page_table_reference(
            mm.req_to_token, plan.req_pool_indices, torch.zeros_like(seq), seq, page_size
        )
        swa = kernels.page_table_reference(
            mm.req_to_token,
            plan.req_pool_indices,
            (starts - cfg.window).clamp(min=0),
            seq,
            page_size,
            full_to_swa_map=mm.allocator.full_to_swa,
        )
        for got, want in ((plan.full_pages, full), (plan.swa_pages, swa)):
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype == torch.int32 and torch.equal(g, w)
        mm.commit(plan, [3] * len(plan))
        mm.check()
        steps += 1
    assert steps > 5


def test_paged_view_and_swa_table_starts_read_what_set_kv_wrote() -> None:
    """Reading each plan's page tables through kv.paged (from swa_table_starts on SWA layers)
    gives back the K the engine wrote at each position."""
    mm = _swa_manager(num_kv_heads=2, head_dim=3, sliding_window=6, chunked_prefill_size=8)
    cfg = mm.config
    mm.add_request(Request("a", list(range(13)), 6))
    mm.add_request(Request("b", list(range(13)) + [99], 6))
    while (plan := mm.schedule()) is not None:
        n = plan.out_cache_loc.numel()
        positions = torch.cat(
            [torch.arange(r.extend_start, r.extend_start + r.extend_len) for r in plan.reqs]
        )
        k = positions.float()[:, None, None].expand(n, 2, 3).to(DEVICE)
        for layer in (0, 1):
            mm.kv.set_kv(layer, plan.out_cache_loc, k, k)
        for layer, table in ((0, plan.full_pages), (1, plan.swa_pages)):
            keys, _ = mm.kv.paged(layer)
            assert keys.shape[1:] == (4, 2, 3)
            indptr, indices, last = (x.tolist() for x in table)
            for i, r in enumerate(plan.reqs):
                pages = indices[indptr[i] : indptr[i + 1]]
                got = keys[torch.tensor(pages, device=DEVICE)].reshape(-1, 2, 3)[:, 0, 0]
                got = got[: (len(pages) - 1) * 4 + last[i]].tolist()
                first = 0 if layer == 0 else int(plan.swa_table_starts[i])
                seq = r.extend_start + r.extend_len
                want = list(range(first, seq))
                if layer == 1:  # positions before the window may be tombstoned: check the window
                    lo = max(0, r.extend_start - cfg.window) - first
                    got, want = got[lo:], want[lo:]
                assert got == [float(p) for p in want]
        mm.commit(plan, [5] * len(plan))


def test_swa_pins_slide_in_one_tree_call_per_step() -> None:
    """While decoding windows slide over their cached prompts, each step moves every pin
    that crossed a lock step in one slide_swa_locks call, never an inc/dec_lock pair."""
    mm = _swa_manager(sliding_window=16, full_tokens=4096, swa_tokens=2048)
    for i in range(8):
        mm.add_request(Request(f"r{i}", [i + 1, *range(31)], 40))
    plan = mm.schedule()
    mm.commit(plan, [1] * len(plan))
    assert all(n.swa_lock or n.swa_pins for n in mm.tree.nodes() if n.end > 16)  # windows pinned
    nodes = len(mm.tree.nodes())
    mm.check()
    calls, moved = [], []
    real = mm.tree.slide_swa_locks

    def slide(handles, starts):
        calls.append(len(handles))
        return real(handles, starts)

    def forbidden(*args, **kwargs):
        raise AssertionError("a decode step locked or unlocked a path")

    mm.tree.slide_swa_locks = slide
    real_inc, real_dec = mm.tree.inc_lock, mm.tree.dec_lock
    mm.tree.inc_lock = mm.tree.dec_lock = forbidden
    for _ in range(24):
        before = len(calls)
        plan = mm.schedule()
        assert plan.batch.is_decode
        mm.commit(plan, [1] * len(plan))
        moved.append(len(calls) - before)
        mm.tree.inc_lock, mm.tree.dec_lock = real_inc, real_dec
        mm.check()
        mm.tree.inc_lock = mm.tree.dec_lock = forbidden
    mm.tree.inc_lock, mm.tree.dec_lock = real_inc, real_dec
    assert max(moved) == 1 and sum(moved) >= 2 and max(calls) == 8
    assert not any(n.swa_lock or n.swa_pins for n in mm.tree.nodes())  # windows past prompts
    assert len(mm.tree.nodes()) == nodes  # the pins slid without splitting a node
