"""Replay a workload through a MemoryManager driven by the FakeEngine, measuring as it goes.

The clock counts steps. A turn is added before the first step at or after its arrival;
when nothing runs and nothing waits, the clock jumps to the next arrival (no step is
counted). Only ``schedule()`` and ``commit()`` are timed, not the engine's KV writes and
verification. Any exception stops the run and is recorded as an error, never swallowed:

- ``oom``: a MemoryError or an assertion raised inside the manager (including
  ``add_request``);
- ``verify``: the FakeEngine read back KV that is not its tokens' (an assertion outside
  the manager);
- ``invariant``: ``mm.check()`` failed; ``stall``: requests wait, none runs, none is
  admitted; ``error``: anything else (with its traceback).
"""

from __future__ import annotations

import functools
import heapq
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from hybridkv.errors import CheckError
from hybridkv.scheduler import CacheConfig, MemoryManager, Request
from hybridkv.sim import engine
from hybridkv.sim.engine import FakeEngine
from hybridkv.sim.workloads import VOCAB, Workload

_ENGINE_FILE = engine.__file__
_OOM_TYPES: tuple[type[BaseException], ...] = (MemoryError, AssertionError)
if hasattr(torch, "OutOfMemoryError"):
    _OOM_TYPES += (torch.OutOfMemoryError,)


class Sample(NamedTuple):
    """Pool and cache state after one step."""

    step: int
    full_used: float  # fraction of the full pool not free (running + cached)
    swa_used: float
    hit_rate: float  # cumulative hit tokens / prefill tokens requested so far
    running: int
    waiting: int
    device_hit_rate: float = 0.0  # the hit rate's split by tier (they sum to hit_rate)
    host_hit_rate: float = 0.0
    storage_hit_rate: float = 0.0
    memory_used: float = 0.0  # bytes of pages allocated (running + cached) over the budget


class SimError(NamedTuple):
    step: int
    kind: str
    message: str
    detail: str  # traceback, or '' where there is none


@dataclass
class SimResult:
    """Everything a report needs; ``stats`` is the manager's last ``stats()``.

    ``config`` is what the manager ran on; ``model``, when set, the config of the real model
    it stands in for (see :mod:`hybridkv.sim.models`), whose shape reports describe.
    """

    workload: str
    config: CacheConfig
    requests: int  # turns in the workload
    verify: bool = True
    added: int = 0
    finished: int = 0
    steps: int = 0
    wall_s: float = 0.0
    prompt_tokens: int = 0  # prompts of the requests added
    prefill_tokens: int = 0  # tokens to prefill, counted on admission (again after retraction)
    output_tokens: int = 0
    overhead_us: list[float] = field(default_factory=list)  # schedule()+commit() per step
    samples: list[Sample] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    errors: list[SimError] = field(default_factory=list)
    truncated: bool = False  # stopped by max_steps
    model: CacheConfig | None = None

    @property
    def shape(self) -> CacheConfig:
        """The config whose model shape the report describes."""
        return self.model or self.config

    def count(self, kind: str) -> int:
        return sum(e.kind == kind for e in self.errors)


def bytes_per_token(config: CacheConfig) -> int:
    """K and V bytes of one token over every attention layer (what a host copy moves)."""
    layers = len(config.full_layer_ids) + len(config.swa_layer_ids)
    itemsize = torch.empty(0, dtype=config.dtype).element_size()
    return 2 * layers * config.num_kv_heads * config.head_dim * itemsize


def max_context(config: CacheConfig) -> int:
    """The longest request (prompt + ``max_new_tokens``) ``config`` can ever hold: within
    ``max_context_len``, and its :func:`cost` within the full pool."""
    ps = config.page_size
    return min(config.max_context_len, (config.full_tokens // ps - 1) * ps)


def validate(workload: Workload, config: CacheConfig) -> None:
    """``ValueError`` naming the session and turn of a request that can never fit ``config``."""
    limit = max_context(config)
    for session in workload.sessions:
        for k, (n, turn) in enumerate(zip(session.context_lens(), session.turns, strict=True)):
            total = n + turn.max_new_tokens
            if total > limit:
                raise ValueError(
                    f"session {session.sid!r} turn {k}: {total} tokens (prompt + max_new_tokens)"
                    f" > {limit}, the most the config holds (max_context_len, full pool)"
                )


class _Timed:
    """Wraps ``mm.schedule`` and ``mm.commit`` on the instance and sums their time."""

    def __init__(self, mm: MemoryManager) -> None:
        self.ns = 0
        for name in ("schedule", "commit"):
            setattr(mm, name, self._wrap(getattr(mm, name)))

    def _wrap(self, fn: Callable) -> Callable:
        def timed(*args: object) -> object:
            t0 = time.perf_counter_ns()
            try:
                return fn(*args)
            finally:
                self.ns += time.perf_counter_ns() - t0

        return timed


def _kind(e: BaseException) -> str:
    """``verify`` for the engine's own assertions, ``oom`` for a MemoryError or an assertion
    anywhere else (the manager), ``error`` for the rest."""
    frames = traceback.extract_tb(e.__traceback__)
    if isinstance(e, AssertionError) and frames and frames[-1].filename == _ENGINE_FILE:
        return "verify"
    return "oom" if isinstance(e, _OOM_TYPES) else "error"


def run(
    workload: Workload,
    config: CacheConfig,
    *,
    verify: bool = True,
    salt: bool = False,
    max_steps: int | None = None,
    check_every: int = 0,
    progress: Callable[[SimResult], None] | None = None,
    model: CacheConfig | None = None,
) -> SimResult:
    """Replay ``workload``; stops at the first error (see the module docstring).

    ``salt``: give each request a unique first token, so no prefix of another request can
    hit (a baseline without a prefix cache; a retracted request still finds its own pages).
    ``check_every``: call ``mm.check()`` every that many steps (0: only at the end).
    ``model``: the real model ``config`` stands in for (kept in the result for reports).
    Raises ``ValueError`` (nothing run) for a config or workload that cannot work.
    """
    validate(workload, config)
    mm = MemoryManager(config)
    res = SimResult(workload.name, config, workload.num_requests, verify, model=model)
    t_start = time.perf_counter()
    try:
        if _replay(mm, workload, res, verify, salt, max_steps, check_every, progress):
            _check(mm, res)
        res.stats = mm.stats()
    finally:
        res.wall_s = time.perf_counter() - t_start
        mm.close()
    return res


def _replay(
    mm: MemoryManager,
    workload: Workload,
    res: SimResult,
    verify: bool,
    salt: bool,
    max_steps: int | None,
    check_every: int,
    progress: Callable[[SimResult], None] | None,
) -> bool:
    """The replay loop of :func:`run`; False when it stopped at an error."""
    eng = FakeEngine(mm, VOCAB, verify)
    timer = _Timed(mm)
    sessions = {s.sid: s for s in workload.sessions}
    history: dict[str, list[int]] = {}  # session -> prompt + output of its last turn
    prompts: dict[str, tuple[str, int, list[int]]] = {}  # rid -> (session, turn, prompt)
    arrivals = [(s.turns[0].t, i, s.sid, 0) for i, s in enumerate(workload.sessions)]
    heapq.heapify(arrivals)
    order, clock = len(arrivals), 0
    t_start = time.perf_counter()
    fail = functools.partial(_fail, res)

    while arrivals or prompts:
        if max_steps is not None and res.steps >= max_steps:
            res.truncated = True
            break
        while arrivals and arrivals[0][0] <= clock:
            _, _, sid, k = heapq.heappop(arrivals)
            turn = sessions[sid].turns[k]
            prompt = history.pop(sid, []) + list(turn.new_ids)
            rid = f"{sid}/{k}"
            ids = [VOCAB + res.added, *prompt[1:]] if salt else prompt
            try:
                eng.add(Request(rid, ids, turn.max_new_tokens))
            except Exception as e:
                fail(_kind(e), e)
                return False
            prompts[rid] = (sid, k, prompt)
            res.added += 1
            res.prompt_tokens += len(prompt)
        timer.ns = 0
        try:
            plan, finished = eng.step()
        except Exception as e:
            fail(_kind(e), e)
            return False
        stats = mm.stats()
        if plan is None:
            if prompts:  # NOTE: nothing changes until a step runs, so this would repeat
                why = f"{stats['waiting']} waiting and {stats['running']} running, none scheduled"
                fail("stall", None, f"schedule() returned None: {why}")
                return False
            clock = max(clock, arrivals[0][0])  # idle: skip to the next arrival
            continue
        res.steps += 1
        clock += 1
        res.overhead_us.append(timer.ns / 1e3)
        for sreq in plan.reqs:
            if not sreq.is_decode and sreq.extend_start == sreq.cached_len + sreq.loaded_len:
                produced = len(eng.outputs[sreq.rid]) - sreq.produces_token
                res.prefill_tokens += len(prompts[sreq.rid][2]) + produced
            res.output_tokens += sreq.produces_token
        for rid in finished:
            sid, k, prompt = prompts.pop(rid)
            res.finished += 1
            turns = sessions[sid].turns
            if k + 1 < len(turns):
                history[sid] = prompt + eng.outputs.pop(rid)
                nxt = turns[k + 1]
                heapq.heappush(arrivals, (max(nxt.t, clock + nxt.gap), order, sid, k + 1))
                order += 1
            else:
                eng.outputs.pop(rid)
        res.samples.append(_sample(mm, res, stats))
        res.stats = stats
        if check_every and res.steps % check_every == 0 and not _check(mm, res):
            return False
        if progress is not None:
            res.wall_s = time.perf_counter() - t_start
            progress(res)
    return True


def _fail(res: SimResult, kind: str, e: BaseException | None, message: str = "") -> None:
    detail = "" if e is None else "".join(traceback.format_exception(e))
    res.errors.append(SimError(res.steps, kind, message or f"{type(e).__name__}: {e}", detail))


def _check(mm: MemoryManager, res: SimResult) -> bool:
    try:
        mm.check()
    except (CheckError, AssertionError) as e:
        _fail(res, "invariant", e)
        return False
    return True


def _sample(mm: MemoryManager, res: SimResult, stats: dict[str, int]) -> Sample:
    alloc = mm.allocator
    full_cap = (alloc.full.num_pages - 1) * alloc.page_size
    swa_cap = (alloc.swa.num_pages - 1) * alloc.page_size if alloc.has_swa else 0
    prefill = res.prefill_tokens or 1
    tiers = [stats[f"{t}_hit_tokens"] / prefill for t in ("device", "host", "storage")]
    return Sample(
        res.steps,
        1 - stats["full_free"] / full_cap,
        1 - stats["swa_free"] / swa_cap if mm.config.has_swa else 0.0,
        sum(tiers),
        stats["running"],
        stats["waiting"],
        *tiers,
        stats["used_bytes"] / stats["memory_bytes"],
    )
