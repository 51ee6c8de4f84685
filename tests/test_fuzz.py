"""A hypothesis state machine over MemoryManager: random configs, adds, steps, aborts, flushes.

Each example draws a config (page size, window against the page, pools near the smallest
CacheConfig and add_request accept, host tier and write policy, storage, recurrent layers)
and then random operations on it. Only the engine contract is used; ``workloads.Driver``
runs every step through the sim's FakeEngine, which writes a code of each token's prefix
into its K/V and recurrent state, and checks before every forward that the plan's page
tables (full and SWA window) and state slots read back those codes; after every step it
checks ``mm.check()``, the counters and gauges, and that ``schedule()`` returns ``None``
only when nothing runs or waits. Teardown runs the oldest requests left to completion
within a bound of steps (no livelock of retractions or deferrals), and with storage a new
manager reads back what the old one stored.

Requests finish by ``max_new_tokens`` or by sampling the example's stop token (the engine
then aborts them, as it would on a stop string).

Size: ``HYBRIDKV_FUZZ_EXAMPLES`` examples (default 200) of ``HYBRIDKV_FUZZ_STEPS`` rules
(default 50); derandomized, so a run is reproducible.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import tempfile
from collections.abc import Callable

import pytest
import torch
from helpers import assert_refused_unchanged
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from workloads import VOCAB, Driver, check_gauges, small_config, tokens

from hybridkv import CacheConfig, MemoryManager, Request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("HYBRIDKV_FUZZ_EXAMPLES", "200")),
    stateful_step_count=int(os.environ.get("HYBRIDKV_FUZZ_STEPS", "50")),
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # NOTE: explain takes minutes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# (swa_layer_ids, mamba_layer_ids) of a 4-layer model: with full layers or without.
LAYOUTS = [
    ((1, 3), ()),
    ((), ()),
    ((0, 1, 2, 3), ()),
    ((1,), (2, 3)),
    ((), (2, 3)),
    ((0, 1), (2, 3)),
]
COVERAGE = (
    "device_hit_tokens",
    "host_hit_tokens",
    "storage_hit_tokens",
    "evicted_full_tokens",
    "evicted_swa_tokens",
    "retracted_requests",
    "loaded_swa_tokens",
    "loaded_states",
)
DRAINED = 4  # requests teardown runs to completion
POLICIES = [None, "write_through", "write_back", "write_through_selective"]


def _marks_unclean(fn: Callable[..., None]) -> Callable[..., None]:
    """A rule (or invariant) that leaves ``self.clean`` false when it raises."""

    @functools.wraps(fn)
    def wrapper(self: FuzzMachine, **kwargs: object) -> None:
        self.clean = False
        fn(self, **kwargs)
        self.clean = True

    return wrapper


def _pages(n: int, ps: int) -> int:
    return -(-n // ps)


def _arena(cfg: CacheConfig, extra: int) -> CacheConfig:
    """``cfg`` with one arena instead of its static pools: the smallest arena whose full
    pool reaches the static one's size, and ``extra`` chunks."""
    probe = cfg.replace(memory_bytes=1 << 30)
    layout = probe.arena_layout
    chunks = probe.arena_min_chunks + extra
    if "full" in probe.arena_pools:
        chunks += _pages(cfg.full_tokens // cfg.page_size, layout.min_pages_per_chunk(0))
    return cfg.replace(memory_bytes=chunks * layout.chunk_bytes)


class FuzzMachine(RuleBasedStateMachine):
    """Random operations on one manager of a random config; every step checked."""

    @initialize(
        ps=st.one_of(st.sampled_from([1, 2, 4, 16, 64]), st.integers(1, 64)),
        layout=st.sampled_from(LAYOUTS),
        window_kind=st.sampled_from(["below", "at", "above"]),
        window_frac=st.floats(0, 1),
        policy=st.sampled_from(POLICIES),
        storage=st.booleans(),
        total_pages=st.integers(1, 4),
        total_extra=st.integers(0, 32),
        full_extra=st.integers(0, 6),
        swa_extra=st.integers(0, 4),
        host_halves=st.integers(1, 8),
        state_slots=st.integers(3, 8),
        chunk_pages=st.integers(1, 4),
        prefill_pages=st.integers(1, 6),
        running=st.integers(1, 6),
        context_extra=st.integers(0, 8),
        swa_eviction=st.sampled_from(["window", "lru"]),
        dtype=st.sampled_from([torch.bfloat16, torch.float32]),
        stop_token=st.one_of(st.none(), st.integers(0, VOCAB - 1)),
        initial=st.integers(0, 6),
        seed=st.integers(0, 2**16),
        arena_extra=st.one_of(st.none(), st.integers(0, 12)),
    )
    def setup(
        self,
        ps: int,
        layout: tuple[tuple[int, ...], tuple[int, ...]],
        window_kind: str,
        window_frac: float,
        policy: str | None,
        storage: bool,
        total_pages: int,
        total_extra: int,
        full_extra: int,
        swa_extra: int,
        host_halves: int,
        state_slots: int,
        chunk_pages: int,
        prefill_pages: int,
        running: int,
        context_extra: int,
        swa_eviction: str,
        dtype: torch.dtype,
        stop_token: int | None,
        initial: int,
        seed: int,
        arena_extra: int | None,
    ) -> None:
        swa, mamba = layout
        if window_kind == "below" and ps > 1:
            window = 1 + int(window_frac * (ps - 2))
        elif window_kind == "above":
            window = ps + 1 + int(window_frac * 2 * ps)
        else:
            window = ps
        # The longest request (prompt + max_new_tokens): a few pages. The full pool holds
        # it and ``full_extra`` pages; the host ``host_halves`` halves of the full pool.
        self.max_total = max(2, total_pages * ps + total_extra)
        full_tokens = (max(2, _pages(self.max_total, ps)) + full_extra) * ps
        host = policy is not None
        host_tokens = max(2, _pages(full_tokens * host_halves // 2, ps)) * ps if host else 0
        self.storage = tempfile.mkdtemp(prefix="hybridkv-fuzz-") if host and storage else None
        if mamba:
            self.storage = None  # storage holds no state snapshots (CacheConfig refuses)
        cfg = small_config(
            page_size=ps,
            swa_layer_ids=swa,
            mamba_layer_ids=mamba,
            state_shape=(2, 3) if mamba else (),
            state_slots=state_slots if mamba else 0,
            sliding_window=window,
            dtype=dtype,
            full_tokens=full_tokens,
            host_tokens=host_tokens,
            write_policy=policy or "write_through",
            storage=self.storage,
            chunked_prefill_size=chunk_pages * ps,
            max_prefill_tokens=prefill_pages * ps,
            max_running_requests=running,
            max_context_len=self.max_total + context_extra,
            swa_eviction=swa_eviction,
            swa_tokens=1 << 20,  # replaced by the smallest pool the config accepts, below
        )
        if cfg.has_swa:
            cfg = cfg.replace(swa_tokens=cfg.min_swa_tokens + swa_extra * ps)
        if arena_extra is not None:
            cfg = _arena(cfg, arena_extra)
        self.rng = random.Random(seed)
        longest = max(1, self.max_total * 2 // 3)
        self.prefixes = [tokens(self.rng, self.rng.randint(1, longest)) for _ in range(3)]
        self.stop_token = stop_token
        self.driver = Driver(MemoryManager(cfg))
        self.prompts: dict[str, list[int]] = {}
        self.histories: list[list[int]] = []  # prompt + output of finished requests
        self.count = 0
        self.clean = True
        for _ in range(initial):
            source = self.rng.choice(["prefix", "prefix", "fresh"])
            pick = self.rng.randrange(2**16)
            self._add(source, pick, "whole", self.rng.randint(0, 8), self.rng.randint(1, 32))

    # ------------------------------------------------------------------ requests

    @rule(
        source=st.sampled_from(["prefix", "prefix", "history", "fresh"]),
        pick=st.integers(0, 2**16),
        cut=st.sampled_from(["whole", "whole", "part"]),
        tail=st.integers(0, 8),
        new=st.integers(1, 32),
        too_long=st.integers(0, 15),
    )
    @_marks_unclean
    def add(self, source: str, pick: int, cut: str, tail: int, new: int, too_long: int) -> None:
        """A request whose prompt often shares a prefix: a base prefix or a finished
        request's whole sequence (a next turn), whole or cut, plus a random tail. Now and
        then one longer than the full pool or the context, refused with nothing changed."""
        mm = self.driver.mm
        if too_long == 0:
            cfg = mm.config
            pool = cfg.full_capacity
            over = min(pool, cfg.max_context_len) + 1 + pick % 8
            request = Request("too-long", tokens(self.rng, over - 1), 1)
            assert_refused_unchanged(mm, lambda: mm.add_request(request), "fit|max_context_len")
            return
        self._add(source, pick, cut, tail, new)

    def _add(self, source: str, pick: int, cut: str, tail: int, new: int) -> None:
        base: list[int] = []
        if source == "prefix":
            base = self.prefixes[pick % len(self.prefixes)]
        elif source == "history" and self.histories:
            base = self.histories[pick % len(self.histories)]
        if cut == "part":
            base = base[: pick % (len(base) + 1)]
        ids = (base + tokens(self.rng, tail))[: self.max_total - 1] or tokens(self.rng, 1)
        new = min(new, self.max_total - len(ids))
        rid = f"q{self.count}"
        self.count += 1
        self.driver.add(Request(rid, ids, new))
        self.prompts[rid] = ids

    # ------------------------------------------------------------------ steps

    @rule(times=st.integers(1, 8))
    @_marks_unclean
    def step(self, times: int) -> None:
        for _ in range(times):
            self._step()

    def _step(self, plan: object = None, verify: bool = True) -> None:
        """One checked step; a request that sampled the stop token stops (the engine aborts
        it, as it would on a stop string), and a finished one's sequence becomes history."""
        d = self.driver
        before = set(d.live)
        plan = d.step(plan, verify)  # type: ignore[arg-type]
        if plan is None:
            return
        for rid in before - d.live:
            if rid in self.prompts:
                self.histories.append(self.prompts.pop(rid) + d.engine.outputs[rid])
        for r in plan.reqs:
            out = d.engine.outputs.get(r.rid)
            if r.rid in d.live and r.produces_token and out and out[-1] == self.stop_token:
                self.histories.append(self.prompts.pop(r.rid) + out)
                d.abort(r.rid)

    # ------------------------------------------------------------------ aborts

    def _where(self, rid: str) -> str:
        """``waiting``, ``chunked`` (part of its prompt computed) or ``running``."""
        have = self.driver.mm.req_slots(rid).numel()
        if have == 0:
            return "waiting"
        return "chunked" if have < len(self.prompts[rid]) else "running"

    @precondition(lambda self: self.driver.live)
    @rule(where=st.sampled_from(["waiting", "chunked", "running", "any"]), pick=st.integers(0, 63))
    @_marks_unclean
    def abort(self, where: str, pick: int) -> None:
        live = sorted(self.driver.live, key=lambda rid: int(rid[1:]))
        if where != "any":
            live = [rid for rid in live if self._where(rid) == where]
        if live:
            rid = live[pick % len(live)]
            self.driver.abort(rid)
            del self.prompts[rid]

    @rule(
        pick=st.integers(0, 63),
        aborts=st.integers(0, 3),
        adds=st.integers(0, 2),
        flush=st.booleans(),
    )
    @_marks_unclean
    def between_schedule_and_commit(self, pick: int, aborts: int, adds: int, flush: bool) -> None:
        """While a plan is pending (after its checks, before its forward): abort some of its
        requests, add new ones, flush; then the forward and the commit of the rest."""
        d = self.driver
        plan = d.mm.schedule()
        if plan is None:
            assert not d.live, "schedule() returned None with requests live"
            return
        d._on_plan(plan)  # the checks of a plan the driver scheduled itself
        rids = [r.rid for r in plan.reqs]
        for k in range(min(aborts, len(rids))):
            rid = rids[(pick + k) % len(rids)]
            if rid in d.live:
                d.abort(rid)
                del self.prompts[rid]
        for k in range(adds):
            self._add("prefix", pick + k, "whole", k, 1 + pick % 16)
        if flush:
            d.mm.flush()
        self._step(plan, verify=not aborts)

    # ------------------------------------------------------------------ cache

    @rule()
    @_marks_unclean
    def flush(self) -> None:
        self.driver.mm.flush()

    @precondition(lambda self: self.storage is not None)
    @rule()
    @_marks_unclean
    def restart(self) -> None:
        """A new manager on the same storage directory (what survives is what it stored);
        the live requests go with the old one."""
        d = self.driver
        d.mm.close()
        self.driver = Driver(MemoryManager(d.mm.config))
        self.prompts = {}

    @invariant()
    @_marks_unclean
    def consistent(self) -> None:
        self.driver.mm.check()
        check_gauges(self.driver.mm, self.driver.live)

    def _replay_from_storage(self) -> dict[str, int]:
        """A new manager on the storage directory runs the base prefixes and the finished
        sequences again (reading back what the old one stored); returns its stats."""
        self.driver.mm.close()
        d = self.driver = Driver(MemoryManager(self.driver.mm.config))
        for i, ids in enumerate(self.prefixes + self.histories[-3:]):
            ids = ids[: self.max_total - 1]
            d.add(Request(f"replay{i}", ids, self.max_total - len(ids)))
        return d.run(max_steps=(self.max_total + 2) * 2 * len(d.live) + 20)

    def teardown(self) -> None:
        """Liveness: whatever is left finishes within a bound of steps (unless a rule
        failed: then the manager may hold a plan that never commits)."""
        if not hasattr(self, "driver") or not self.clean:
            return
        try:
            d = self.driver
            # NOTE: the oldest few (the longest waiting) are enough to see that nothing
            # starves; draining every request took most of the run.
            for rid in sorted(d.live, key=lambda rid: int(rid[1:]))[DRAINED:]:
                d.abort(rid)
            budget = (self.max_total + 2) * 2 * len(d.live) + 20
            stats = d.run(max_steps=d.steps + budget)
            event(f"steps {min(d.steps // 25 * 25, 100)}+")
            if self.storage is not None:
                stats = self._replay_from_storage()
            # NOTE: what the examples exercised, shown by --hypothesis-show-statistics.
            for name in COVERAGE:
                if stats[name]:
                    event(name)
        finally:
            if self.storage is not None:
                shutil.rmtree(self.storage, ignore_errors=True)


FuzzMachine.TestCase.settings = settings.get_profile("fuzz")
TestFuzzMachine = FuzzMachine.TestCase
