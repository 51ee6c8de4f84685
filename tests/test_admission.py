"""Admission and allocation: the one cost function, the reservation allocation draws from,
requests that fill a pool exactly, SWA load backs in the smallest pools, and what admission
counted on staying pinned until the step uses it."""

from __future__ import annotations

import itertools
from pathlib import Path
from unittest import mock

import pytest
from workloads import Arrival, Driver, small_config

from hybridkv import CacheConfig, MemoryManager, Request
from hybridkv.allocator import PagedAllocator
from hybridkv.errors import CheckError
from hybridkv.scheduler.adder import PrefillAdder
from hybridkv.scheduler.cost import NO_LOAD, Cost, cost
from hybridkv.scheduler.records import Reservation

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class HostDriver(Driver):
    """workloads.Driver that accepts host load backs (``check_plan`` insists on
    ``loaded_len == 0``; the FakeEngine still checks every prefix it reads)."""

    def _on_plan(self, plan: object) -> None:
        plan.wait()
        if all(r.loaded_len == 0 for r in plan.reqs):
            super()._on_plan(plan)

    def one(self, request: Request, max_steps: int = 100) -> None:
        """Run ``request`` alone to completion within ``max_steps`` more steps."""
        self.run([Arrival(self.steps, request)], max_steps=self.steps + max_steps)


# ------------------------------------------------------------------ the full cost


@pytest.mark.parametrize("ps", [1, 2, 3, 4, 8, 16])
def test_full_cost_is_the_pages_alloc_extend_takes(ps: int) -> None:
    """Brute force over starts and chunks: the full charge is exactly the pages alloc_extend
    takes. No page is added for the request's partial last page (alloc_extend fills it, and the
    request owns it already); a chunk never starts past a partial page it does not own."""
    cfg = small_config(page_size=ps, swa_layer_ids=())
    pool = PagedAllocator(64 * ps, ps, "cpu", "torch")
    for start, chunk in itertools.product(range(4 * ps), range(1, 4 * ps + 1)):
        takes = pool.pages_for_extend([start], [start + chunk]) * ps
        assert cost(cfg, chunk, chunk_end=start + chunk).full == takes, (start, chunk)
        assert cost(cfg, chunk).full >= takes  # no start given: the most any start takes
        load = Cost(full=8 * ps)
        assert cost(cfg, chunk, load=load, chunk_end=start + chunk).full == takes + 8 * ps


@pytest.mark.parametrize(("ps", "prompt", "new"), [(4, 20, 9), (1, 5, 3), (16, 100, 28)])
def test_request_filling_the_full_pool_exactly_runs(ps: int, prompt: int, new: int) -> None:
    """An 8-page full pool, prompt + max_new_tokens whose KV fills the 8th page: accepted by
    add_request and run to completion (the "+1 page" of the old full cost refused it)."""
    cfg = small_config(page_size=ps, swa_layer_ids=(), full_tokens=8 * ps)
    assert -(-(prompt + new) // ps) == 8
    d = Driver(MemoryManager(cfg))
    d.run([Arrival(0, Request("a", list(range(prompt)), new))], max_steps=100)
    assert d.finished == ["a"]


def test_request_filling_the_full_pool_exactly_runs_with_swa_and_company() -> None:
    """The same with SWA layers and a second request waiting: both finish."""
    cfg = small_config(page_size=4, full_tokens=32, swa_tokens=32, sliding_window=8)
    d = Driver(MemoryManager(cfg))
    d.run(
        [Arrival(0, Request("a", list(range(20)), 9)), Arrival(0, Request("b", [7] * 21, 8))],
        max_steps=200,
    )
    assert sorted(d.finished) == ["a", "b"]


# ------------------------------------------------------------------ the reservation


def test_reservation_draws_past_the_grant_raise() -> None:
    """A draw within the grant is recorded; one past it (either budget) raises CheckError."""
    r = Reservation(chunk=4, compute=Cost(8, 12, 1), load=Cost(4, 8, 1))
    r.draw(Cost(8, 8, 1), "alloc")
    r.draw_load(Cost(4, 8, 0), "load back")
    assert (r.drawn, r.loaded) == (Cost(8, 8, 1), Cost(4, 8, 0))
    with pytest.raises(CheckError, match="full"):
        r.draw(Cost(full=4), "alloc")
    with pytest.raises(CheckError, match="swa"):
        r.draw_load(Cost(swa=4), "load back")
    with pytest.raises(CheckError, match="state"):
        r.draw(Cost(state=1), "working state")
    assert (r.drawn, r.loaded) == (Cost(8, 8, 1), Cost(4, 8, 0))  # failed draws change nothing


def _recording_admit(grants: list[Reservation]) -> object:
    real = PrefillAdder.admit

    def admit(self: PrefillAdder, *args: object, **kw: object) -> Reservation | None:
        got = real(self, *args, **kw)
        if got is not None:
            grants.append(got)
        return got

    return mock.patch.object(PrefillAdder, "admit", admit)


def tombstoned_window(d: Driver, n: int = 40) -> list[int]:
    """Leave an ``n``-token prefix with full KV on device and its SWA only on host (inside a
    longer cached prompt, so its window is not the branch's last)."""
    a = list(range(1000, 1000 + n))
    d.one(Request("a", a + list(range(3000, 3020)), 1))
    d.one(Request("b", list(range(2000, 2056)), 1))  # SWA pressure tombstones a's SWA
    assert d.mm.tree.match_prefix(a).swa_host_hit_length > 0
    return a


HOST = small_config(
    page_size=4,
    sliding_window=16,
    swa_tokens=64,
    num_kv_heads=1,
    full_tokens=512,
    host_tokens=1024,
    chunked_prefill_size=64,
)


@pytest.mark.parametrize("n", [4, 40])
def test_allocation_and_load_back_draw_what_admission_granted(n: int) -> None:
    """A prefix (shorter or longer than the window) whose window's SWA is on host only:
    admission grants the load back and the chunk; the load back draws exactly the window's
    SWA, alloc_extend the chunk's pages in each pool (the whole full grant). The SWA grant is
    what computing the window and the chunk would take (a tombstoned window pins nothing
    yet): what is left over is the window the request still grows into while decoding."""
    d = HostDriver(MemoryManager(HOST))
    a = tombstoned_window(d, n)
    span = n - max(0, n - 16) // 4 * 4
    grants: list[Reservation] = []
    with _recording_admit(grants):
        d.one(Request("r", a + [7, 7, 7, 7, 7], 1))
    r = grants[0]
    assert (r.chunk, r.load) == (5, Cost(0, span, 0))
    assert r.loaded == r.load
    assert r.drawn == Cost(8, 8, 0) and r.drawn.full == r.compute.full
    assert r.compute.swa + r.load.swa == cost(HOST, span + 5).swa


def test_an_undercharged_load_back_raises() -> None:
    """An adder that forgets the SWA load back (SGLang PR 27391) no longer runs the step out
    of memory later: the load back draws past its reservation and raises CheckError."""
    d = HostDriver(MemoryManager(HOST))
    a = tombstoned_window(d)
    real = PrefillAdder.admit

    def forgetful(self: PrefillAdder, *args: object, **kw: object) -> Reservation | None:
        got = real(self, *args, **kw)
        return None if got is None else Reservation(got.chunk, got.compute, NO_LOAD)

    d.add(Request("r", a + [7], 1))
    with (
        mock.patch.object(PrefillAdder, "admit", forgetful),
        pytest.raises(CheckError, match="load"),
    ):
        d.mm.schedule()


def test_an_undercharged_chunk_raises_before_allocating() -> None:
    """An adder that grants a page less than the chunk takes: the step raises CheckError before
    alloc_extend takes a page."""
    cfg = small_config(page_size=4, swa_layer_ids=())
    mm = MemoryManager(cfg)
    real = PrefillAdder.admit

    def short(self: PrefillAdder, *args: object, **kw: object) -> Reservation | None:
        got = real(self, *args, **kw)
        c = got.compute
        return Reservation(got.chunk, Cost(c.full - 4, c.swa, c.state), got.load)

    mm.add_request(Request("r", list(range(9)), 1))
    free = mm.stats()["full_free"]
    with mock.patch.object(PrefillAdder, "admit", short), pytest.raises(CheckError, match="full"):
        mm.schedule()
    assert mm.stats()["full_free"] == free


# ------------------------------------------------------------------ SWA load back, small pools


def test_window_from_host_in_the_smallest_swa_pool_is_admitted() -> None:
    """Page 4, window 8, the smallest SWA pool (16): an 8-token prompt pushed to host by two
    24-token prompts, then the prompt + 1 is admitted (its loaded window was charged twice,
    as a load back and as a window to compute, and never fitted: schedule() returned None)."""
    cfg = small_config(
        page_size=4, sliding_window=8, full_tokens=32, swa_tokens=16, host_tokens=128
    )
    assert cfg.swa_tokens == cfg.min_swa_tokens == 2 * cfg.sliding_window
    d = HostDriver(MemoryManager(cfg))
    prompt = list(range(8))
    d.one(Request("a", prompt, 1))
    d.one(Request("b", list(range(100, 124)), 1))
    d.one(Request("c", list(range(200, 224)), 1))
    m = d.mm.tree.match_prefix(prompt + [1])
    assert (m.length, m.host_hit_length, m.swa_host_hit_length) == (0, 8, 8)
    d.one(Request("d", prompt + [1], 1), max_steps=10)
    assert d.mm.stats()["loaded_tokens"] == 8


def _grid_config(
    ps: int, extra: int, policy: str, eviction: str, storage: Path | None
) -> CacheConfig:
    cfg = small_config(
        page_size=ps,
        sliding_window=2 * ps,
        full_tokens=8 * ps,
        host_tokens=32 * ps,
        write_policy=policy,
        swa_eviction=eviction,
        storage=None if storage is None else str(storage),
        num_kv_heads=1,
        chunked_prefill_size=max(16, ps),
        max_prefill_tokens=max(64, ps),
    )
    return cfg.replace(swa_tokens=cfg.min_swa_tokens + extra * ps)


@pytest.mark.parametrize("storage", [False, True], ids=["host", "storage"])
@pytest.mark.parametrize(
    ("policy", "eviction"),
    [("write_through", "window"), ("write_back", "window"), ("write_back", "lru")],
)
@pytest.mark.parametrize("extra", [0, 1, 2])
@pytest.mark.parametrize("ps", [1, 2, 4, 8, 16])
def test_small_pools_finish_every_request(
    ps: int, extra: int, policy: str, eviction: str, storage: bool, tmp_path: Path
) -> None:
    """Full pool 8 pages, window 2 pages, SWA pool the smallest the config accepts and a page
    or two above: a prompt pushed to host (and storage) by unrelated prompts, then prompts that
    extend it, in this manager and in a fresh one on the same storage: every request finishes
    within a step bound. (Under write_back a prompt whose SWA was tombstoned first reaches the
    host without its window, and is not matched.)"""
    cfg = _grid_config(ps, extra, policy, eviction, tmp_path / "kv" if storage else None)
    prompt = [(7 * i) % 50 for i in range(2 * ps)]
    d = HostDriver(MemoryManager(cfg))
    d.one(Request("a", prompt, 1))
    d.one(Request("b", list(range(100, 100 + 6 * ps)), 1))
    d.one(Request("c", list(range(200, 200 + 6 * ps)), 1))
    from_host = d.mm.tree.match_prefix(prompt + [1]).swa_host_hit_length > 0
    assert from_host or policy == "write_back"
    for k, tail in enumerate([[1], [2] * (ps + 1), [3] * ps]):
        d.one(Request(f"d{k}", prompt + tail, 2), max_steps=4 * ps + 10)
    assert (d.mm.stats()["loaded_tokens"] > 0) == from_host
    if storage:
        d.mm.close()
        fresh = HostDriver(MemoryManager(cfg))
        fresh.one(Request("e", prompt + [1], 2), max_steps=10)
        assert (fresh.mm.stats()["storage_hit_tokens"] > 0) == from_host


# ------------------------------------------------------------------ pinned until used


def test_state_snapshot_admitted_from_host_stays_until_loaded() -> None:
    """A prefix whose state snapshot is on host only is admitted; in the same schedule(), SWA
    eviction under write_back backs up a victim's snapshot and host-state eviction must not
    drop the one admitted (it was: "admitted state load back does not fit")."""
    cfg = small_config(
        num_layers=3,
        swa_layer_ids=(0,),
        mamba_layer_ids=(1,),
        state_shape=(2,),
        page_size=1,
        sliding_window=1,
        full_tokens=96,
        swa_tokens=5,
        state_slots=4,
        host_tokens=96,
        write_policy="write_back",
        swa_eviction="lru",
        chunked_prefill_size=1,
        max_running_requests=2,
    )
    d = HostDriver(MemoryManager(cfg))
    d.one(Request("a", [1, 0, 0, 2, 0, 0, 1, 0], 2))
    s = d.steps
    d.run(
        [
            Arrival(s, Request("b", [1, 0, 0, 2, 2, 0, 2], 4)),
            Arrival(s, Request("c", [1, 0, 0, 2, 0], 1)),
            Arrival(s, Request("e", [1, 0, 0, 0, 1, 1, 2], 1)),
        ],
        max_steps=s + 200,
    )
    assert sorted(d.finished) == ["a", "b", "c", "e"]
