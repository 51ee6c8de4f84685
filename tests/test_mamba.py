"""Recurrent (mamba) state: tree snapshots, copy-on-match, state eviction, cost, host mirror.

The FakeEngine writes each request's state as a code of its token prefix after every step
and checks, before every step, that the state slot holds the state after exactly
``extend_start`` tokens. On top of that, :class:`MambaDriver` checks after every step that
every snapshot in the tree (device and host) holds the state after exactly its node's end.
"""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from workloads import (
    Arrival,
    Driver,
    chat_sessions,
    check_plan,
    check_tables_read_prefix,
    random_mix,
    small_config,
    tokens,
)

import hybridkv.kernels as kernels_mod
from hybridkv import CacheConfig, MemoryManager, Request, StepPlan
from hybridkv.errors import CheckError
from hybridkv.scheduler import prefill as prefill_mod
from hybridkv.scheduler.adder import PrefillAdder
from hybridkv.scheduler.cost import Cost, cost
from hybridkv.sim.engine import FakeEngine, _Seq
from hybridkv.tree import EvictParams, Node, Transfers

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
POLICIES = ["write_through", "write_back", "write_through_selective"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mamba_config(**overrides: object) -> CacheConfig:
    """4 layers: full 0, SWA 1 (unless overridden), mamba 2 and 3 with a ``(2, 3)`` state."""
    base: dict[str, object] = dict(
        swa_layer_ids=(1,), mamba_layer_ids=(2, 3), state_shape=(2, 3), state_slots=16
    )
    return small_config(**(base | overrides))


# ------------------------------------------------------------------ state codes


def expected_state(engine: FakeEngine, toks: list[int]) -> torch.Tensor:
    """``[mamba layers, *state_shape]``: what the FakeEngine writes after exactly ``toks``."""
    if not toks:
        return torch.stack([engine._state(None) for _ in engine.mamba_layers])
    h = _Seq(list(toks)).hash_upto(len(toks))[-1]
    return torch.stack([engine._state(h) + j for j in range(len(engine.mamba_layers))])


def device_state(mm: MemoryManager, slot: int) -> torch.Tensor:
    """``[mamba layers, *state_shape]`` held in device state slot ``slot``."""
    t = torch.tensor([slot], dtype=torch.int64, device=mm.device)
    return torch.stack([mm.states.get_state(lid, t)[0] for lid in mm.config.mamba_layer_ids])


def host_state(mm: MemoryManager, slot: int) -> torch.Tensor:
    """``[mamba layers, *state_shape]`` held in host state slot ``slot``."""
    buf = mm.tree.host.state.buf[slot]  # [layers, state elements]
    return buf.view(len(mm.config.mamba_layer_ids), *mm.config.state_shape)


def assert_snapshots_exact(mm: MemoryManager, engine: FakeEngine) -> None:
    """Every snapshot (device and host) holds the state after exactly its node's end; the host
    state pool is conserved (``mm.check()`` does not cover it)."""
    tree = mm.tree
    if mm.states is None:
        return
    mm.flush()  # host copies land (a no-op on CPU; see slow_side_stream)
    for node in tree.nodes():
        if node.state is None and node.host_state is None:
            continue
        want = expected_state(engine, tree.path_tokens(node))
        if node.state is not None:
            got = device_state(mm, node.state)
            assert torch.equal(got, want), f"device snapshot at {node.end} corrupted"
        if node.host_state is not None:
            got = host_state(mm, node.host_state)
            assert torch.equal(got, want), f"host snapshot at {node.end} corrupted"
    if tree.host is not None:
        held = [n.host_state for n in tree.nodes() if n.host_state is not None]
        free = tree.host.state.allocator.free_pages_view().tolist()
        assert len(set(held)) == len(held), "a host state slot held twice"
        assert sorted(held + free) == list(range(1, tree.host.state.allocator.num_pages)), (
            "host state slots lost"
        )


class MambaDriver(Driver):
    """workloads.Driver that also checks every tree snapshot after every step.
    ``matches`` records each match's ``(length, host_hit_length, mamba_host_hit_length)``."""

    def __init__(self, mm: MemoryManager, record: bool = True) -> None:
        super().__init__(mm, record=record)
        self.matches: list[tuple[int, int, int]] = []
        real = mm.tree.match_prefix

        def match_prefix(toks: list[int], max_len: int | None = None) -> object:
            m = real(toks, max_len)
            self.matches.append((m.length, m.host_hit_length, m.mamba_host_hit_length))
            return m

        mm.tree.match_prefix = match_prefix  # type: ignore[method-assign]

    def _on_plan(self, plan: StepPlan) -> None:
        plan.wait()
        check_plan(self.mm, plan)
        check_tables_read_prefix(self.mm, plan, self._codes)
        if self.record:
            self.plans.append({"reqs": list(plan.reqs)})

    def step(self, plan: StepPlan | None = None, verify: bool = True) -> StepPlan | None:
        plan = super().step(plan, verify)
        assert_snapshots_exact(self.mm, self.engine)
        return plan

    def first_chunk(self, rid: str) -> object:
        return next(r for p in self.plans for r in p["reqs"] if r.rid == rid)

    def one(self, request: Request) -> None:
        self.run([Arrival(self.steps, request)])


# ------------------------------------------------------------------ multi-turn chats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ps", [1, 4, 16])
def test_multi_turn_chats_keep_kv_and_state_exact(ps: int, dtype: str) -> None:
    """Concurrent multi-turn chats: exact KV and state, check() each step, all finish, turns hit."""
    cfg = mamba_config(page_size=ps, dtype=DTYPES[dtype])
    d = MambaDriver(MemoryManager(cfg))
    n = 3 if ps == 1 else 5
    sessions = chat_sessions(random.Random(ps), n, turns=(2, 4), user_len=(1, 12))
    stats = d.run(sessions=sessions)
    assert sorted(d.finished) == sorted(
        f"{s.sid}.{k}" for s in sessions for k in range(len(s.turns))
    )
    assert stats["device_hit_tokens"] > 0
    assert any(d.first_chunk(f"{s.sid}.1").cached_len for s in sessions), "no turn resumed"


@pytest.mark.parametrize("ps", [1, 4, 16])
@pytest.mark.parametrize("swa", [(1,), ()], ids=["swa", "noswa"])
def test_next_turn_resumes_from_the_previous_turns_final_state(ps: int, swa: tuple) -> None:
    """Each turn resumes at the previous turn's last computed page boundary (page 16 too)."""
    cfg = mamba_config(page_size=ps, swa_layer_ids=swa)
    d = MambaDriver(MemoryManager(cfg))
    session = chat_sessions(
        random.Random(5), 1, turns=(5, 5), system_len=(8, 30), new_tokens=(1, 12)
    )[0]
    d.run(sessions=[session])
    prompts = [len(session.system) + len(session.turns[0][0])]
    for k in range(1, len(session.turns)):
        prompts.append(prompts[-1] + session.turns[k - 1][1] + len(session.turns[k][0]))
        computed = prompts[k - 1] + session.turns[k - 1][1] - 1  # the last token isn't computed
        first = d.first_chunk(f"c0.{k}")
        assert first.cached_len == first.extend_start == computed - computed % ps
    assert prompts[1] < 64 and d.first_chunk("c0.1").cached_len >= 16


@pytest.mark.parametrize("ps", [4, 16])
@pytest.mark.parametrize("policy", POLICIES)
def test_multi_turn_chats_with_host_tier(policy: str, ps: int) -> None:
    """Chats with host tier and tight pools: exact KV, state and host snapshots; turns hit."""
    cfg = mamba_config(
        page_size=ps,
        state_slots=4,
        host_tokens=1024,
        write_policy=policy,
        full_tokens=160 if ps == 4 else 320,
        swa_tokens=96,
    )
    d = MambaDriver(MemoryManager(cfg))
    sessions = chat_sessions(random.Random(7), 5, turns=(2, 4), user_len=(1, 12))
    stats = d.run(sessions=sessions)
    assert len(d.finished) == sum(len(s.turns) for s in sessions)
    assert stats["device_hit_tokens"] > 0
    if policy == "write_through":
        assert any(m for _, _, m in d.matches), "no match used a host snapshot"
    d.mm.close()


def test_triton_interpreter_run_with_host_snapshot() -> None:
    """Triton interpreter: snapshot copy, host backup and load back of a state, a chat: exact."""
    cfg = mamba_config(backend="triton", state_slots=3, host_tokens=256)
    d = MambaDriver(MemoryManager(cfg))
    prompt = list(range(100, 109))
    d.one(Request("a", prompt, 2))
    assert d.mm.tree.evict_states(10) >= 1
    d.one(Request("b", prompt[:8] + [7, 7], 2))
    assert (d.first_chunk("b").cached_len, d.matches[-1][2]) == (8, 8)
    d.run(sessions=chat_sessions(random.Random(1), 2, turns=(2, 2), system_len=(6, 10)))
    d.mm.close()


# ------------------------------------------------------------------ exact scenarios


@pytest.mark.parametrize(
    "ps,swa", [(4, (1,)), (16, (1,)), (4, ())], ids=["ps4", "ps16", "ps4-noswa"]
)
def test_chunk_ends_at_page_boundary_and_a_copy_seeds_the_next_request(ps: int, swa: tuple) -> None:
    """2 pages + 3: cut at the boundary, exact snapshot there, copied (not shared) to a new slot."""
    cfg = mamba_config(page_size=ps, swa_layer_ids=swa, chunked_prefill_size=64)
    d = MambaDriver(MemoryManager(cfg))
    mm, boundary = d.mm, 2 * ps
    prompt = tokens(random.Random(ps), boundary + 3)
    d.add(Request("a", prompt, 1))
    first = d.step().reqs[0]
    assert (first.extend_start, first.extend_len, first.produces_token) == (0, boundary, False)
    node = mm.tree.match_prefix(prompt).last_node
    assert node.end == boundary and node.state is not None
    assert node.state != first.state_slot
    want = expected_state(d.engine, prompt[:boundary])
    assert torch.equal(device_state(mm, node.state), want)
    second = d.step().reqs[0]
    assert (second.extend_start, second.extend_len) == (boundary, 3)
    assert second.state_slot == first.state_slot  # its own working slot throughout

    d.add(Request("b", list(prompt), 2))
    plan = mm.schedule()
    b = plan.reqs[0]
    assert (b.cached_len, b.extend_start, b.extend_len) == (boundary, boundary, 3)
    assert b.state_slot != node.state
    assert torch.equal(device_state(mm, b.state_slot), want)
    d.step(plan)  # the engine writes b's slot with the state after 2 pages + 3 tokens
    assert torch.equal(device_state(mm, node.state), want)
    for layer in cfg.mamba_layer_ids:
        junk = torch.full((1, *cfg.state_shape), -7.0)
        mm.states.set_state(layer, torch.tensor([b.state_slot]), junk)
    assert torch.equal(device_state(mm, node.state), want)
    d.abort("b")  # its junk state must not reach the tree either: no new boundary reached
    mm.check()
    assert_snapshots_exact(mm, d.engine)


def test_seed_snapshot_stays_pinned_until_its_copy() -> None:
    """The snapshot a new request's working state is copied from is pinned (``state_lock``)
    until that copy is issued: unpinned, a load back for a later request of the batch could
    evict it and reuse its slot before the copy read it."""
    cfg = mamba_config(page_size=4, chunked_prefill_size=64)
    d = MambaDriver(MemoryManager(cfg))
    mm = d.mm
    prompt = tokens(random.Random(7), 11)
    d.one(Request("a", prompt, 1))  # a snapshot at 8 (its first chunk ends there)
    locks: list[int] = []
    real = mm.states.copy

    def copy(src: torch.Tensor, dst: torch.Tensor) -> None:
        held = {n.state: n for n in mm.tree.nodes() if n.state is not None}
        locks.extend(held[s].state_lock for s in src.tolist() if s in held)
        real(src, dst)

    mm.states.copy = copy  # type: ignore[method-assign]
    d.add(Request("b", prompt[:8] + [1, 2], 2))
    plan = mm.schedule()
    assert plan.reqs[0].cached_len == 8
    assert locks == [1]
    mm.states.copy = real  # type: ignore[method-assign]
    d.step(plan)
    d.run()


def test_prefix_without_snapshot_at_its_end_is_not_matched() -> None:
    """A match is truncated to the last node with a snapshot, or 0 (tree and manager)."""
    cfg = mamba_config(swa_layer_ids=(), page_size=4)
    mm = MemoryManager(cfg)
    toks = list(range(50, 62))
    slots = mm.allocator.alloc_extend(torch.tensor([0]), torch.tensor([12]), torch.tensor([-1]))
    node12, _ = mm.tree.insert(toks, slots, 0, 0)
    assert mm.tree.match_prefix(toks + [1]).length == 0
    assert not mm.tree.match_prefix(toks + [1]).state_from_host
    mm.tree.match_prefix(toks[:4] + [0])  # splits the node after 1 page
    node4 = node12.parent
    assert node4.end == 4
    slot = mm.states.allocator.alloc_pages(1)
    assert mm.tree.attach_state(node4, int(slot), owned=True)
    assert mm.tree.match_prefix(toks + [1]).length == 4
    mm.tree.check()
    mm.check()

    d = MambaDriver(MemoryManager(mamba_config(page_size=4)))
    prompt = list(range(8))
    d.one(Request("a", prompt, 9))  # snapshots at 8 (prefill) and 16 (final state)
    full = prompt + d.engine.outputs["a"]
    ends = sorted(n.end for n in d.mm.tree.nodes() if n.state is not None)
    assert ends == [8, 16]
    d.one(Request("b", full[:14] + [99], 1))  # 12 is a page boundary, but has no snapshot
    assert d.first_chunk("b").cached_len == 8


# ------------------------------------------------------------------ snapshot eviction


def _insert_with_snapshot(mm: MemoryManager, toks: list[int], value: float) -> Node:
    """Insert ``toks`` (whole pages) and give its node a snapshot filled with ``value``."""
    n = len(toks)
    slots = mm.allocator.alloc_extend(torch.tensor([0]), torch.tensor([n]), torch.tensor([-1]))
    node, _ = mm.tree.insert(toks, slots, 0, 0)
    slot = mm.states.allocator.alloc_pages(1)
    assert slot is not None
    for lid in mm.config.mamba_layer_ids:
        mm.states.set_state(lid, slot, torch.full((1, *mm.config.state_shape), value))
    assert mm.tree.attach_state(node, int(slot), owned=True)
    return node


def test_state_eviction_is_lru_and_never_takes_a_pinned_snapshot() -> None:
    """Tree level, 3 slots: snapshots are evicted LRU first, never pinned ones; KV stays."""
    mm = MemoryManager(mamba_config(swa_layer_ids=(), page_size=4, state_slots=3))
    tree = mm.tree
    a, b, c = [list(range(i, i + 4)) for i in (10, 20, 30)]
    na = _insert_with_snapshot(mm, a, 1.0)
    nb = _insert_with_snapshot(mm, b, 2.0)
    nc = _insert_with_snapshot(mm, c, 3.0)
    assert mm.states.available == 0
    b_slot = nb.state
    tree.match_prefix(a + [0])  # LRU order now: b, c, a
    slot = tree.alloc_state()
    assert slot == b_slot
    assert nb.state is None and na.state is not None and nc.state is not None
    mm.states.allocator.free_pages(torch.tensor([slot]))
    assert tree.match_prefix(b + [0]).length == 0 and tree.match_prefix(c + [0]).length == 4
    tree.pin_state(nc, +1)  # a copy from it is pending
    assert tree.evict_states(3) == 1
    assert na.state is None and nc.state is not None
    assert torch.equal(device_state(mm, nc.state), torch.full((2, 2, 3), 3.0))
    taken = [tree.alloc_state(), tree.alloc_state()]
    assert None not in taken
    assert tree.alloc_state() is None, "took the pinned snapshot"
    assert nc.state is not None
    tree.pin_state(nc, -1)
    assert tree.cached_full == 12, "state eviction dropped KV"
    assert tree.evict_states(1) == 1 and nc.state is None
    mm.states.allocator.free_pages(torch.tensor(taken))
    mm.check()


def test_dropping_a_node_whose_snapshot_is_pinned_is_refused() -> None:
    """Full eviction never frees a pinned snapshot: dropping its node raises CheckError and
    changes nothing (the node stays a candidate); the pinned count that admission's rooms
    subtract follows pins and unpins (before, the drop freed the pinned snapshot)."""
    mm = MemoryManager(mamba_config(swa_layer_ids=(), page_size=4, state_slots=3))
    tree = mm.tree
    node = _insert_with_snapshot(mm, list(range(10, 14)), 1.0)
    free0, rooms0 = mm.states.available, mm.admission.rooms()
    tree.pin_state(node, +1)
    tree.pin_state(tree.root, +1)  # a match of nothing pins the root: no snapshot there
    assert tree.pinned_states == 1 and mm.admission.rooms().state == rooms0.state - 1
    with pytest.raises(CheckError, match="snapshot is pinned"):
        tree.evict(EvictParams(full=4))
    assert node.on_device and node.state is not None and mm.states.available == free0
    assert torch.equal(device_state(mm, node.state), torch.full((2, 2, 3), 1.0))
    tree.check()
    tree.pin_state(tree.root, -1)
    tree.pin_state(node, -1)
    assert tree.pinned_states == 0
    assert tree.evict(EvictParams(full=4)).full == 4 and node.state is None
    mm.check()


@pytest.mark.parametrize("slots", [3, 4])
@pytest.mark.parametrize("ps", [1, 4, 16])
def test_tight_state_pool_evicts_snapshots_and_completes(ps: int, slots: int) -> None:
    """3-4 state slots: snapshots evicted along the way, all finish exact, slots conserved."""
    cfg = mamba_config(page_size=ps, state_slots=slots, max_running_requests=4)
    d = MambaDriver(MemoryManager(cfg))
    evicted = []
    real = d.mm.tree.evict_states

    def evict_states(count: int) -> int:
        evicted.append(real(count))
        return evicted[-1]

    d.mm.tree.evict_states = evict_states  # type: ignore[method-assign]
    rng = random.Random(ps * 10 + slots)
    arrivals = random_mix(rng, 10 if ps == 1 else 16, prompt_len=(1, 30), prefix_len=(4, 24))
    sessions = chat_sessions(rng, 2, turns=(2, 3))
    d.run(arrivals, sessions)
    assert len(d.finished) == len(arrivals) + sum(len(s.turns) for s in sessions)
    assert sum(evicted) > 0
    assert d.mm.stats()["state_free"] + d.mm.tree.cached_states == slots


BREAKS: dict[str, Callable[[MemoryManager], None]] = {
    "leak": lambda mm: mm.states.allocator.alloc_pages(1),
    "free-held": lambda mm: mm.states.allocator.free_pages(
        torch.tensor([next(n.state for n in mm.tree.nodes() if n.state is not None)])
    ),
    "forget": lambda mm: setattr(
        next(n for n in mm.tree.nodes() if n.state is not None), "state", None
    ),
}


@pytest.mark.parametrize("how", BREAKS)
def test_check_covers_state_slots(how: str) -> None:
    """A leaked, double-held or forgotten state slot makes check() fail."""
    d = MambaDriver(MemoryManager(mamba_config(page_size=4, state_slots=6)))
    d.one(Request("a", list(range(13)), 4))
    d.add(Request("b", list(range(13)) + [5], 20))
    d.step()
    d.mm.check()
    BREAKS[how](d.mm)
    # NOTE: "forget" is caught by the tree's own check, which may still assert.
    with pytest.raises((CheckError, AssertionError), match="state"):
        d.mm.check()


# ------------------------------------------------------------------ cost


def test_cost_counts_working_snapshot_and_load_slots() -> None:
    """cost().state: working (new) + snapshot (page-aligned chunk end) + load.state."""
    cfg = mamba_config(page_size=4)
    assert cost(cfg, 8, new=True, chunk_end=8).state == 2
    assert cost(cfg, 3, new=True, chunk_end=11).state == 1
    assert cost(cfg, 8, new=True).state == 1
    assert cost(cfg, 8, chunk_end=16).state == 1
    assert cost(cfg, 1, chunk_end=13).state == 0
    assert cost(cfg, 8, new=True, chunk_end=8, load=Cost(state=1)).state == 3
    assert cost(cfg, 3, chunk_end=11, load=Cost(state=1)).state == 1
    assert cost(small_config(page_size=4), 8, new=True, chunk_end=8).state == 0
    ps16 = mamba_config(page_size=16)
    assert cost(ps16, 32, new=True, chunk_end=32).state == 2
    assert cost(ps16, 3, chunk_end=35).state == 0


def test_adder_stops_at_the_last_boundary_and_checks_state_room() -> None:
    """The adder cuts at the last page boundary and needs working + snapshot + load room."""
    cfg = mamba_config(page_size=4, chunked_prefill_size=64)
    big = 10**6

    def admit(state_room: int, start: int, remaining: int, **kw: object) -> int:
        got = PrefillAdder(cfg, Cost()).admit(Cost(big, big, state_room), start, remaining, 0, **kw)
        return 0 if got is None else got.chunk

    assert admit(2, 0, 11, new=True) == 8
    assert admit(1, 0, 11, new=True) == 0
    assert admit(0, 8, 3) == 3  # the unaligned tail takes no slot
    assert admit(3, 8, 3, new=True, load=Cost(state=1)) == 3
    assert admit(1, 8, 3, new=True, load=Cost(state=1)) == 0
    assert admit(3, 0, 11, new=True, load=Cost(state=1)) == 8
    assert admit(2, 0, 11, new=True, load=Cost(state=1)) == 0
    ps16 = mamba_config(page_size=16, chunked_prefill_size=64)
    assert PrefillAdder(ps16, Cost()).admit(Cost(big, big, 2), 0, 35, 0, new=True).chunk == 32
    no_mamba = small_config(page_size=4, chunked_prefill_size=64)
    assert PrefillAdder(no_mamba, Cost()).admit(Cost(big, big, 0), 0, 11, 0, new=True).chunk == 11


class _AuditDriver(MambaDriver):
    """Counts state slots taken by admitted work (``prefill._extend``: working slots and host loads;
    ``caching.cache_prefix``: chunk-end snapshots) and checks them against what the step's adder
    charged (``used.state``; the running reservation charges no state)."""

    def __init__(self, mm: MemoryManager, adders: list[PrefillAdder]) -> None:
        super().__init__(mm, record=False)
        self.adders = adders  # every PrefillAdder the manager makes, appended on creation
        self.inside = 0
        self.taken = 0
        self.prefill_steps = 0
        alloc = mm.states.allocator
        real_alloc = alloc.alloc_pages

        def alloc_pages(n: int) -> torch.Tensor | None:
            got = real_alloc(n)
            if self.inside and got is not None:
                self.taken += n
            return got

        alloc.alloc_pages = alloc_pages  # type: ignore[method-assign]
        for part, name in ((mm.prefill, "_extend"), (mm.caching, "cache_prefix")):
            setattr(part, name, self._counted(getattr(part, name)))

    def _counted(self, fn: Callable[..., object]) -> Callable[..., object]:
        def inner(*args: object) -> object:
            self.inside += 1
            try:
                return fn(*args)
            finally:
                self.inside -= 1

        return inner

    def step(self, plan: StepPlan | None = None, verify: bool = True) -> StepPlan | None:
        self.adders.clear()
        self.taken = 0
        plan = super().step(plan, verify)
        if plan is not None and not plan.reqs[0].is_decode:
            self.prefill_steps += 1
            charged = self.adders[-1].used.state
            assert self.taken <= charged, f"took {self.taken} state slots, charged {charged}"
        else:
            assert self.taken == 0
        return plan


@settings(max_examples=50)
@given(
    ps=st.sampled_from([1, 4, 16]),
    slots=st.integers(3, 5),
    swa=st.booleans(),
    host=st.sampled_from([None, *POLICIES]),
    running=st.integers(1, 4),
    n=st.integers(2, 10),
    seed=st.integers(0, 2**20),
)
def test_admission_never_takes_more_state_slots_than_charged(
    ps: int, slots: int, swa: bool, host: str | None, running: int, n: int, seed: int
) -> None:
    """Random mixes, tight state pools: a prefill step never takes more slots than charged."""
    cfg = mamba_config(
        page_size=ps,
        state_slots=slots,
        swa_layer_ids=(1,) if swa else (),
        host_tokens=512 if host else 0,
        write_policy=host or "write_through",
        max_running_requests=running,
    )
    recorded: list[PrefillAdder] = []

    class Recording(PrefillAdder):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)
            recorded.append(self)

    rng = random.Random(seed)
    with mock.patch.object(prefill_mod, "PrefillAdder", Recording):
        d = _AuditDriver(MemoryManager(cfg), recorded)
        arrivals = random_mix(rng, n, prompt_len=(1, 24), prefix_len=(1, 24), steps=10)
        d.run(arrivals, chat_sessions(rng, 1, turns=(2, 3)))
    assert d.prefill_steps > 0
    assert len(d.finished) == n + len(d.sessions["c0"].turns)


# ------------------------------------------------------------------ host mirror


@pytest.mark.parametrize("ps", [4, 16])
def test_device_snapshot_evicted_matches_via_host_snapshot(ps: int) -> None:
    """Device snapshot evicted: the host snapshot matches, is charged and loads back exactly."""
    cfg = mamba_config(page_size=ps, state_slots=3, host_tokens=512, write_policy="write_through")
    d = MambaDriver(MemoryManager(cfg))
    mm, boundary = d.mm, 2 * ps
    prompt = tokens(random.Random(3), boundary + 1)
    d.one(Request("a", prompt, 1))
    node = next(n for n in mm.tree.nodes() if n.end == boundary)
    assert node.state is not None and node.host_state is not None
    assert mm.tree.evict_states(3) >= 1 and node.state is None
    m = mm.tree.match_prefix(prompt + [1])
    assert (m.length, m.host_hit_length, m.mamba_host_hit_length) == (boundary, 0, boundary)
    loads: list[Cost] = []
    real_admit = PrefillAdder.admit

    def admit(self: PrefillAdder, *args: object, **kw: object) -> int:
        bound = inspect.signature(real_admit).bind(self, *args, **kw)
        loads.append(bound.arguments.get("load", Cost()))
        return real_admit(self, *args, **kw)

    d.add(Request("b", prompt[:boundary] + [7, 8, 9], 2))
    with mock.patch.object(PrefillAdder, "admit", admit):
        plan = mm.schedule()
    assert loads[0].state == 1
    st = mm.stats()
    assert (st["loaded_states"], st["loaded_tokens"], st["loaded_swa_tokens"]) == (1, 0, 0)
    b = plan.reqs[0]
    assert (b.cached_len, b.loaded_len, b.extend_start) == (boundary, 0, boundary)
    want = expected_state(d.engine, prompt[:boundary])
    assert node.state is not None and node.state != b.state_slot
    assert torch.equal(device_state(mm, node.state), want)  # loaded back exactly
    assert torch.equal(device_state(mm, b.state_slot), want)  # and copied
    d.step(plan)
    d.run()


@pytest.mark.parametrize("policy", ["write_back", "write_through"])
def test_evicted_prefix_comes_back_with_its_state_from_host(policy: str) -> None:
    """A prefix evicted from the device comes back from host with its KV and exact state."""
    cfg = mamba_config(page_size=4, state_slots=3, host_tokens=512, write_policy=policy)
    d = MambaDriver(MemoryManager(cfg))
    mm = d.mm
    prompt = tokens(random.Random(4), 13)
    d.one(Request("a", prompt, 1))
    freed = mm.tree.evict(EvictParams(full=10**6))
    assert freed.full == 12 and mm.tree.cached_states == 0
    m = mm.tree.match_prefix(prompt + [1])
    assert (m.length, m.host_hit_length, m.mamba_host_hit_length) == (0, 12, 12)
    d.one(Request("b", prompt[:12] + [5, 6], 2))
    b = d.first_chunk("b")
    assert (b.cached_len, b.loaded_len, b.extend_start) == (0, 12, 12)
    assert mm.stats()["loaded_tokens"] == 12


# ------------------------------------------------------------------ bad input

BAD_CONFIGS = [
    (dict(state_shape=()), "state_shape"),
    (dict(state_shape=(2, 0)), "state_shape"),
    (dict(state_shape=(2.5,)), "state_shape"),
    (dict(state_slots=2), "state_slots"),
    (dict(state_slots=0), "state_slots"),
    (dict(state_slots=-1), "state_slots"),
    (dict(swa_layer_ids=(1, 2)), "mamba_layer_ids"),
    (dict(mamba_layer_ids=(2, 4)), "mamba_layer_ids"),
    (dict(mamba_layer_ids=(2, 2)), "mamba_layer_ids"),
    # storage keeps no recurrent state: a prefetched prefix could never be used
    (dict(host_tokens=256, storage="/nonexistent/kv"), "storage"),
]


@pytest.mark.parametrize("change,field", BAD_CONFIGS, ids=[repr(c) for c, _ in BAD_CONFIGS])
def test_bad_mamba_config_names_the_field(change: dict, field: str) -> None:
    """Unworkable recurrent-state settings raise ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        MemoryManager(mamba_config(**change))


def test_state_access_rejects_wrong_layer_or_shape() -> None:
    """get/set_state on a non-mamba layer, wrong shape or bad slots: ValueError, no write."""
    mm = MemoryManager(mamba_config())
    states = mm.states
    before = states.buf.clone()
    slots = torch.tensor([1, 2])
    x = torch.ones(2, 2, 3)
    for layer in (0, 1, 4):
        with pytest.raises(ValueError, match="layer_id"):
            states.set_state(layer, slots, x)
        with pytest.raises(ValueError, match="layer_id"):
            states.get_state(layer, slots)
    for bad in (torch.ones(2, 3, 2), torch.ones(1, 2, 3), torch.ones(2, 6)):
        with pytest.raises(ValueError, match="shape"):
            states.set_state(2, slots, bad)
    for bad_slots in (slots.int(), slots[None], [1, 2]):
        with pytest.raises(ValueError, match="slots"):
            states.get_state(3, bad_slots)
    size = states.buf.shape[1]
    for bad_slots in (torch.tensor([1, -1]), torch.tensor([size])):  # -1: the last slot
        with pytest.raises(ValueError, match=r"slots must lie in \[0, "):
            states.set_state(2, bad_slots, torch.ones(len(bad_slots), 2, 3))
        with pytest.raises(ValueError, match=r"slots must lie in \[0, "):
            states.get_state(2, bad_slots)
    assert torch.equal(states.buf, before)
    states.set_state(3, slots, x)
    assert torch.equal(states.get_state(3, slots), x.to(states.buf.dtype))
    plain = MemoryManager(small_config())
    assert plain.states is None
    plain.add_request(Request("a", [1, 2], 1))
    plan = plain.schedule()
    assert plan is not None and plan.reqs[0].state_slot == -1


# ------------------------------------------------------------------ streams and aborts
#
# The host tier copies on a CUDA side stream. On CPU copies are synchronous, so races between
# the side stream and the main stream cannot show; slow_side_stream() models the worst
# schedule CUDA allows, deterministically.


@contextlib.contextmanager
def slow_side_stream() -> Iterator[None]:
    """Model a CUDA side stream that is arbitrarily slow, on CPU: a copy issued inside
    ``Transfers.side_stream()`` lands only when the engine's stream waits for it:
    ``wait_backups()`` lands the queue up to the last backup (stream order), ``wait()`` and
    ``flush()`` land it all. CUDA allows exactly this schedule: main-stream work issued after
    a side-stream copy is not ordered against it until the main stream waits for its event."""
    queue: list[tuple[tuple, dict, bool]] = []
    deferring: list[bool | None] = [None]  # None: not in a side-stream block; else: a backup?
    real_copy = kernels_mod.page_copy

    def page_copy(*args: object, **kw: object) -> None:
        if deferring[0] is None:
            real_copy(*args, **kw)
        else:
            queue.append((args, kw, deferring[0]))

    @contextlib.contextmanager
    def side_stream(self: Transfers, backup: bool) -> Iterator[None]:
        deferring[0] = backup
        try:
            yield
        finally:
            deferring[0] = None

    def land(count: int) -> None:
        for _ in range(count):
            args, kw, _ = queue.pop(0)
            real_copy(*args, **kw)

    def wait_backups(self: Transfers) -> None:
        backups = [i for i, (_, _, backup) in enumerate(queue) if backup]
        land(backups[-1] + 1 if backups else 0)

    def wait(self: Transfers, layer_id: int | None = None) -> None:
        land(len(queue))

    with (
        mock.patch.object(kernels_mod, "page_copy", page_copy),
        mock.patch.object(Transfers, "side_stream", side_stream),
        mock.patch.object(Transfers, "wait_backups", wait_backups),
        mock.patch.object(Transfers, "wait", wait),
        mock.patch.object(Transfers, "flush", wait),
    ):
        yield


def _evict_then_reload(cfg: CacheConfig) -> MambaDriver:
    """``a`` caches a 12-token prefix; ``f`` (24 tokens) evicts it from the 32-token device
    pool; ``b`` loads it back from host."""
    d = MambaDriver(MemoryManager(cfg))
    prompt = list(range(100, 112))
    d.one(Request("a", prompt + [1], 1))
    d.one(Request("f", list(range(200, 224)), 1))
    assert d.mm.stats()["evicted_full_tokens"] >= 12
    d.one(Request("b", prompt + [2, 3], 1))
    assert d.first_chunk("b").loaded_len == 12
    return d


def test_slow_side_stream_model_passes_kv_only_host_tier() -> None:
    """Control: the slow-side-stream model finds no race in the KV-only host tier."""
    cfg = small_config(
        page_size=4, swa_layer_ids=(), host_tokens=256, write_policy="write_back",
        full_tokens=32, chunked_prefill_size=32,
    )  # fmt: skip
    with slow_side_stream():
        _evict_then_reload(cfg)


def test_host_snapshot_load_lands_before_the_seed_copy() -> None:
    """Regression: a host snapshot lands before _seed_states copies it to the working slot."""
    cfg = mamba_config(page_size=4, state_slots=3, host_tokens=256)
    d = MambaDriver(MemoryManager(cfg))
    prompt = list(range(100, 108))
    with slow_side_stream():
        d.one(Request("a", prompt + [1], 1))
        assert d.mm.tree.evict_states(3) >= 1
        d.one(Request("b", prompt + [2, 3], 1))
    assert d.matches[-1][2] == 8


def test_state_slot_is_not_reused_in_schedule_before_its_backup_lands() -> None:
    """Regression: a slot backed up by write-back eviction in schedule() is not rewritten early."""
    cfg = mamba_config(
        page_size=4, swa_layer_ids=(), state_slots=3, host_tokens=256, write_policy="write_back",
        full_tokens=32, chunked_prefill_size=32,
    )  # fmt: skip
    with slow_side_stream():
        _evict_then_reload(cfg)


def test_state_slot_is_not_reused_in_commit_before_its_backup_lands() -> None:
    """A slot backed up by write-back state eviction in commit() is not rewritten too early."""
    cfg = mamba_config(
        page_size=4, swa_layer_ids=(), state_slots=3, host_tokens=256, write_policy="write_back",
        chunked_prefill_size=8,
    )  # fmt: skip
    d = MambaDriver(MemoryManager(cfg))
    mm, x = d.mm, list(range(100, 116))
    with slow_side_stream():
        d.one(Request("a", x + [1], 1))  # snapshots at 8 and 16
        mm.tree.evict_states(10)
        mm.tree.evict(EvictParams(full=10**6))  # backed up without a state: none on device
        d.one(Request("b", x + [2, 3], 1))  # recomputes x: device snapshots, on host, no host state
        assert all(n.on_host and n.state and n.host_state is None for n in mm.tree.nodes())
        # c's chunk-end snapshot at 8 evicts x's snapshot at 8: backed up, freed, rewritten
        d.one(Request("c", list(range(200, 217)), 1))  # "host snapshot at 8 corrupted"


def test_two_aborts_between_schedule_and_commit_keep_snapshots_exact() -> None:
    """Regression: two planned requests aborted before the forward leave exact snapshots."""
    d = MambaDriver(MemoryManager(mamba_config(page_size=1, state_slots=8)))
    d.add(Request("a", [1, 2, 3, 4], 8))
    d.add(Request("b", [5, 6, 7, 8], 8))
    d.step()
    d.step()
    plan = d.mm.schedule()
    assert [r.rid for r in plan.reqs] == ["a", "b"]
    d.abort("a")
    d.abort("b")
    d.mm.check()
    d.step(plan, verify=False)  # the engine's forward writes both working slots
    d.add(Request("c", [5, 6, 7, 8, *d.engine.outputs["b"], 9], 1))
    d.run()
    assert d.first_chunk("c").cached_len == 5
    assert d.mm.stats()["state_free"] + d.mm.tree.cached_states == 8


def test_abort_after_forward_before_commit_keeps_snapshots_exact() -> None:
    """Regression: a request aborted after the forward, before commit, leaves exact snapshots."""
    d = MambaDriver(MemoryManager(mamba_config(page_size=1, state_slots=8)))
    d.add(Request("a", [1, 2, 3, 4], 8))
    d.step()
    d.step()
    mm, engine = d.mm, d.engine
    plan = mm.schedule()
    for r in plan.reqs:
        engine.seqs[r.rid].hash_upto(r.extend_start + r.extend_len)
    engine._write_states(plan)  # the forward ran
    d.abort("a")
    mm.commit(plan, [0])
    mm.check()
    assert_snapshots_exact(mm, engine)
