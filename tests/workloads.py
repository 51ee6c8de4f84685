"""Workload builders and a checked driver for MemoryManager tests.

A workload is a list of :class:`Arrival` (a request and the step it arrives at) and/or
:class:`ChatSession` (turns whose prompts extend the previous turn's prompt and output, so
later turns hit the tree). :class:`Driver` runs them through the sim's FakeEngine, which
verifies the KV of every scheduled request, and calls ``mm.check()`` after every step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from hybridkv import CacheConfig, MemoryManager, Request, StepPlan
from hybridkv.sim.engine import FakeEngine

VOCAB = 50


@dataclass(frozen=True)
class Arrival:
    """``request`` is added before step ``step``."""

    step: int
    request: Request


@dataclass
class ChatSession:
    """A conversation: turn ``k`` sends ``system + (user, output) * k + user_k``."""

    sid: str
    system: list[int]
    turns: list[tuple[list[int], int]]  # (user tokens, max_new_tokens)
    next_turn: int = 0
    history: list[int] = field(default_factory=list)


def tokens(rng: random.Random, n: int, vocab: int = VOCAB) -> list[int]:
    """``n`` random token ids in ``[0, vocab)``."""
    return [rng.randrange(vocab) for _ in range(n)]


def random_mix(
    rng: random.Random,
    n: int,
    *,
    prompt_len: tuple[int, int] = (1, 40),
    new_tokens: tuple[int, int] = (1, 12),
    num_prefixes: int = 3,
    prefix_len: tuple[int, int] = (1, 24),
    shared: float = 0.5,
    steps: int = 20,
    prefix: str = "r",
) -> list[Arrival]:
    """``n`` requests arriving over ``steps`` steps; a ``shared`` fraction starts with one of
    ``num_prefixes`` common prefixes (so some hit the tree), the rest are fresh."""
    prefixes = [tokens(rng, rng.randint(*prefix_len)) for _ in range(num_prefixes)]
    out = []
    for i in range(n):
        ids = tokens(rng, rng.randint(*prompt_len))
        if prefixes and rng.random() < shared:
            ids = rng.choice(prefixes) + ids
        req = Request(f"{prefix}{i}", ids, rng.randint(*new_tokens))
        out.append(Arrival(rng.randrange(steps), req))
    return sorted(out, key=lambda a: a.step)


def chat_sessions(
    rng: random.Random,
    n: int,
    *,
    turns: tuple[int, int] = (2, 4),
    num_systems: int = 2,
    system_len: tuple[int, int] = (8, 24),
    user_len: tuple[int, int] = (1, 10),
    new_tokens: tuple[int, int] = (1, 8),
) -> list[ChatSession]:
    """``n`` conversations sharing ``num_systems`` system prompts."""
    systems = [tokens(rng, rng.randint(*system_len)) for _ in range(num_systems)]
    return [
        ChatSession(
            f"c{i}",
            rng.choice(systems),
            [
                (tokens(rng, rng.randint(*user_len)), rng.randint(*new_tokens))
                for _ in range(rng.randint(*turns))
            ],
        )
        for i in range(n)
    ]


def session_tokens(session: ChatSession) -> int:
    """The longest prompt + max_new_tokens of a session (its last turn)."""
    total = len(session.system)
    for user, new in session.turns:
        total += len(user) + new
    return total


def small_config(**overrides: object) -> CacheConfig:
    """A tiny CPU model (torch backend unless overridden): 4 layers, 1 and 3 SWA."""
    base: dict[str, object] = dict(
        num_layers=4,
        swa_layer_ids=(1, 3),
        num_kv_heads=2,
        head_dim=4,
        page_size=4,
        dtype=torch.bfloat16,
        full_tokens=256,
        swa_tokens=96,
        sliding_window=10,
        chunked_prefill_size=16,
        max_prefill_tokens=64,
        max_running_requests=8,
        max_context_len=256,
        device="cpu",
        backend="torch",
    )
    base.update(overrides)
    return CacheConfig(**base)  # type: ignore[arg-type]


class Driver:
    """Runs workloads step by step through a FakeEngine, checking every step.

    Before the forward: the plan's fields and page tables (:func:`check_plan`), and the
    prefix read through them (:func:`check_tables_read_prefix`); the FakeEngine then checks
    the prefix through ``req_slots`` / ``get_kv``. After the commit: ``mm.check()``, the
    counters against the plan, the stats gauges (:func:`check_gauges`), liveness
    (``schedule()`` returns ``None`` only when nothing runs or waits), and that a finished
    request got exactly ``max_new_tokens`` tokens. ``record``: keep a :func:`snapshot` of
    every plan in ``plans``.
    """

    def __init__(self, mm: MemoryManager, record: bool = False) -> None:
        self.mm = mm
        self._proxy = _Checked(mm, self._on_plan)
        self.engine = FakeEngine(self._proxy, vocab=VOCAB)  # type: ignore[arg-type]
        self.live: set[str] = set()
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.sessions: dict[str, ChatSession] = {}
        self.session_of: dict[str, ChatSession] = {}
        self.plans: list[dict[str, object]] = []
        self.max_new: dict[str, int] = {}
        self.record = record
        self.steps = 0

    def add(self, request: Request) -> None:
        self.engine.add(request)
        self.live.add(request.rid)
        self.max_new[request.rid] = request.max_new_tokens

    def abort(self, rid: str) -> None:
        self.mm.abort(rid)
        self.live.discard(rid)
        self.aborted.append(rid)
        session = self.session_of.pop(rid, None)
        if session is not None:
            session.next_turn = len(session.turns)  # the conversation ends with its abort

    def add_session(self, session: ChatSession) -> None:
        self.sessions[session.sid] = session
        self._next_turn(session)

    def _next_turn(self, session: ChatSession) -> None:
        user, new = session.turns[session.next_turn]
        rid = f"{session.sid}.{session.next_turn}"
        prompt = (session.history or session.system) + user
        session.history = prompt
        session.next_turn += 1
        self.session_of[rid] = session
        self.add(Request(rid, prompt, new))

    def _on_plan(self, plan: StepPlan) -> None:
        plan.wait()
        check_plan(self.mm, plan)
        check_tables_read_prefix(self.mm, plan, self._codes)
        if self.record:
            self.plans.append(snapshot(plan))

    def _codes(self, rid: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V the FakeEngine wrote at positions ``[0, n)`` of ``rid``."""
        return self.engine._kv(self.engine.seqs[rid].hash_upto(n))

    def step(self, plan: StepPlan | None = None, verify: bool = True) -> StepPlan | None:
        """One schedule/forward/commit round, checked. ``plan``: one the test scheduled itself
        (forward and commit it); ``verify=False`` skips the FakeEngine's KV check of this step
        (for a plan holding a request aborted since)."""
        mm = self.mm
        before = mm.stats()
        given = plan is not None
        self._proxy.given = plan
        self.engine.verify = verify
        try:
            plan, finished = self.engine.step()
        finally:
            self.engine.verify = True
        self.steps += 1
        if plan is None:
            assert before["running"] == 0 and before["waiting"] == 0, (
                f"schedule() returned None with {before['running']} running and "
                f"{before['waiting']} waiting"
            )
        else:
            after = mm.stats()
            computed = sum(r.extend_len for r in plan.reqs if r.rid in self.live)
            assert after["computed_tokens"] - before["computed_tokens"] == computed
            prefill = computed if not plan.batch.is_decode else 0
            assert after["prefill_computed_tokens"] - before["prefill_computed_tokens"] == prefill
            if not given:
                hits = sum(r.cached_len for r in plan.reqs)
                assert after["device_hit_tokens"] - before["device_hit_tokens"] == hits
                loaded = sum(r.loaded_len for r in plan.reqs)
                lower = ("host_hit_tokens", "storage_hit_tokens")
                assert sum(after[k] - before[k] for k in lower) == loaded, "a hit counted twice"
        mm.check()
        for rid in finished:
            assert rid in self.live, f"{rid} finished twice or was never added"
            self.live.remove(rid)
            self.finished.append(rid)
            got, want = len(self.engine.outputs[rid]), self.max_new[rid]
            assert got == want, f"{rid} finished with {got} of {want} tokens"
            session = self.session_of.pop(rid, None)
            if session is not None:
                session.history = session.history + self.engine.outputs[rid]
                if session.next_turn < len(session.turns):
                    self._next_turn(session)
        check_gauges(mm, self.live)
        return plan

    def run(
        self,
        arrivals: Sequence[Arrival] = (),
        sessions: Sequence[ChatSession] = (),
        max_steps: int = 5000,
    ) -> dict[str, int]:
        """Run to completion: every request finishes; returns the final stats."""
        pending = sorted(arrivals, key=lambda a: a.step)
        for session in sessions:
            self.add_session(session)
        i = 0
        while i < len(pending) or self.live:
            while i < len(pending) and pending[i].step <= self.steps:
                self.add(pending[i].request)
                i += 1
            self.step()
            assert self.steps <= max_steps, f"no completion after {max_steps} steps"
        return self.mm.stats()


class _Checked:
    """The manager as the FakeEngine sees it: every plan is checked before the forward."""

    def __init__(self, mm: MemoryManager, on_plan: Callable[[StepPlan], None]) -> None:
        self._mm = mm
        self._on_plan = on_plan
        self.given: StepPlan | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self._mm, name)

    def schedule(self) -> StepPlan | None:
        if self.given is not None:
            plan, self.given = self.given, None
            return plan
        plan = self._mm.schedule()
        if plan is not None:
            self._on_plan(plan)
        return plan


def snapshot(plan: StepPlan) -> dict[str, object]:
    """Everything of a plan an engine reads, as plain Python values (for comparisons)."""
    out: dict[str, object] = {
        "reqs": list(plan.reqs),
        "out_cache_loc": plan.out_cache_loc.tolist(),
        "req_pool_indices": plan.req_pool_indices.tolist(),
        "seq_lens": plan.seq_lens.tolist(),
    }
    for name in ("full_pages", "swa_pages"):
        table = getattr(plan, name)
        out[name] = None if table is None else [t.tolist() for t in table]
    return out


def check_plan(mm: MemoryManager, plan: StepPlan) -> None:
    """A plan is self-consistent: fields, out_cache_loc and both page tables agree with
    ``req_slots`` (read before the commit) and the paged layout, and no page written this step
    belongs to another request of the step."""
    cfg, ps = mm.config, mm.config.page_size
    reqs = plan.reqs
    assert reqs, "an empty plan"
    out = plan.out_cache_loc
    assert out.dtype == torch.int64 and out.numel() == sum(r.extend_len for r in reqs)
    out_list = out.tolist()
    assert len(set(out_list)) == len(out_list), "a slot handed out twice"
    assert min(out_list) >= ps, "a slot on the padding page 0"
    assert len({r.rid for r in reqs}) == len(reqs)
    assert plan.req_pool_indices.tolist() == [r.req_pool_index for r in reqs]
    assert len({r.req_pool_index for r in reqs}) == len(reqs)
    assert plan.seq_lens.tolist() == [r.extend_start + r.extend_len for r in reqs]
    full = [t.tolist() for t in plan.full_pages]
    swa = None if plan.swa_pages is None else [t.tolist() for t in plan.swa_pages]
    assert (swa is None) == (cfg.window is None)
    all_pages: list[set[int]] = []
    written: list[set[int]] = []
    swa_last: list[int] = []
    off = 0
    for i, r in enumerate(reqs):
        assert r.extend_len >= 1 and r.cached_len + r.loaded_len <= r.extend_start
        if r.is_decode:
            assert r.extend_len == 1 and r.produces_token and r.cached_len == r.loaded_len == 0
        new = out_list[off : off + r.extend_len]
        off += r.extend_len
        slots = mm.req_slots(r.rid).tolist() + new
        seq = r.extend_start + r.extend_len
        assert len(slots) == seq, f"{r.rid}: {len(slots)} slots for {seq} positions"
        pages = full[1][full[0][i] : full[0][i + 1]]
        assert pages == [slots[p] // ps for p in range(0, seq, ps)], f"{r.rid}: full page table"
        assert slots == [pages[p // ps] * ps + p % ps for p in range(seq)], f"{r.rid}: not paged"
        assert full[2][i] == seq - (len(pages) - 1) * ps
        all_pages.append(set(pages))
        written.append({s // ps for s in new})
        if swa is not None:
            assert cfg.window is not None
            first = max(0, r.extend_start - cfg.window) // ps
            spages = swa[1][swa[0][i] : swa[0][i + 1]]
            assert len(spages) == len(pages) - first, f"{r.rid}: SWA page table length"
            assert 0 not in spages, f"{r.rid}: SWA page table lists a tombstone"
            assert len(set(spages)) == len(spages)
            assert swa[2][i] == full[2][i]
            swa_last.append(spages[-1])
    for i in range(len(reqs)):
        for j in range(len(reqs)):
            assert i == j or not written[i] & all_pages[j], "a written page is shared"
    assert len(set(swa_last)) == len(swa_last), "two requests write one SWA page"


def check_tables_read_prefix(
    mm: MemoryManager,
    plan: StepPlan,
    codes: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Read every request's prefix through the plan's page tables, as an attention kernel
    would, from the first full and the first SWA layer's buffers: the full table yields
    positions ``[0, extend_start)``, the SWA table the window before ``extend_start``.

    NOTE: ``mm.kv.paged(layer)`` (``[pages, page_size, heads, dim]``) are the views an
    engine hands its attention kernels, indexed by the tables' page ids.
    """
    cfg, ps = mm.config, mm.config.page_size
    full = [t.tolist() for t in plan.full_pages]
    swa = None if plan.swa_pages is None else [t.tolist() for t in plan.swa_pages]
    for i, r in enumerate(plan.reqs):
        n = r.extend_start
        if n == 0:
            continue
        want_k, want_v = codes(r.rid, n)
        if cfg.full_layer_ids:
            pages = torch.tensor(full[1][full[0][i] : full[0][i + 1]], dtype=torch.int64)
            pos = torch.arange(n)
            slots = pages[pos // ps] * ps + pos % ps
            kp, vp = mm.kv.paged(cfg.full_layer_ids[0])
            k, v = kp[slots // ps, slots % ps], vp[slots // ps, slots % ps]
            assert torch.equal(k, want_k) and torch.equal(v, want_v), f"{r.rid}: full table KV"
        if swa is None or cfg.window is None:
            continue
        lo = max(0, n - cfg.window)
        first = max(0, n - cfg.window) // ps
        pages = torch.tensor(swa[1][swa[0][i] : swa[0][i + 1]], dtype=torch.int64)
        pos = torch.arange(lo, n)
        slots = pages[pos // ps - first] * ps + pos % ps
        kp, vp = mm.kv.paged(cfg.swa_layer_ids[0])
        k, v = kp[slots // ps, slots % ps], vp[slots // ps, slots % ps]
        assert torch.equal(k, want_k[lo:]) and torch.equal(v, want_v[lo:]), f"{r.rid}: SWA table KV"


def check_gauges(mm: MemoryManager, live: set[str]) -> None:
    """Stats gauges agree with the pools between steps (only public calls).

    Every usable page is free, cached in the tree or held by a running request (those share
    their locked prefix with the tree), so ``capacity - free`` lies between
    ``max(cached, held)`` and ``cached + held``; with nothing running it equals ``cached``.
    """
    cfg, ps = mm.config, mm.config.page_size
    s = mm.stats()
    held_pages: set[int] = set()
    running = 0
    for rid in live:
        slots = mm.req_slots(rid)
        if slots.numel():
            running += 1
            held_pages.update((slots // ps).tolist())
    assert s["running"] == running, (s["running"], running)
    assert s["waiting"] == len(live) - running, (s["waiting"], len(live) - running)
    held = len(held_pages) * ps
    alloc = mm.allocator
    for pool, capacity in (
        ("full", alloc.full.owned_pages * ps),
        ("swa", alloc.swa.owned_pages * ps if alloc.has_swa else 0),
    ):
        if pool == "swa" and not cfg.has_swa:
            assert s["swa_free"] == 0 and s["swa_cached"] == 0
            continue
        free, cached = s[f"{pool}_free"], s[f"{pool}_cached"]
        assert free % ps == 0 and cached % ps == 0 and 0 <= free <= capacity
        used = capacity - free
        assert cached <= used <= cached + held, (pool, capacity, free, cached, held)
        if pool == "full":
            assert used >= held, (pool, used, held)
        if running == 0:
            assert used == cached, (pool, used, cached)
