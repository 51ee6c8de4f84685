"""MemoryManager: the engine facade over pools, tree and admission.

A step is ``schedule()`` (admit and allocate, build page tables), the engine's forward
(writing K/V at ``plan.out_cache_loc``), then ``commit()`` (advance, finish, cache).
Prefill comes first: a step admits waiting requests (and continues the chunked one) when
any fit, and otherwise decodes every running request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from hybridkv.allocator import Arena, HostPool, KVPool, PagedAllocator, StatePool, SWAAllocator
from hybridkv.errors import ensure
from hybridkv.scheduler.admission import Admission
from hybridkv.scheduler.caching import Caching
from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.cost import cost
from hybridkv.scheduler.decode import Decode
from hybridkv.scheduler.pages import PlanBuilder
from hybridkv.scheduler.plan import Request, StepBatch, StepPlan
from hybridkv.scheduler.prefill import Prefill
from hybridkv.scheduler.queues import Queues
from hybridkv.scheduler.records import ReqState
from hybridkv.scheduler.swa_slide import SWASlide
from hybridkv.scheduler.table import RequestTable
from hybridkv.scheduler.tp import TPSync
from hybridkv.tree import HostTier, RadixTree
from hybridkv.tree.storage import FileStorage
from hybridkv.undo import UndoLog

# NOTE: the hit counters and prefill_computed_tokens partition the prompt tokens of every
# admission (a retracted request's prompt counts again): each token is a device, host or
# storage hit (by where its full KV came from) or computed. SWA KV and state snapshots
# loaded back onto a prefix are counted on their own (loaded_swa_tokens, loaded_states).
COUNTERS = (
    "computed_tokens",
    "prefill_computed_tokens",
    "device_hit_tokens",
    "host_hit_tokens",
    "storage_hit_tokens",
    "evicted_full_tokens",
    "evicted_swa_tokens",
    "backed_up_tokens",
    "loaded_tokens",
    "loaded_swa_tokens",
    "loaded_states",
    "retracted_requests",
)

MAX_TOKEN_ID = 2**63  # token ids are int64 on the host and in storage keys
_ID_TYPES = frozenset(
    {int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64}
)


class MemoryManager:
    """Owns the KV cache of one model replica; see docs/contract.md.

    A facade over composed parts, each owning its state: the pools (allocator, KV, states),
    the tree, the request table (rows and their per-row state), the queues, the admission
    policy, the caching path, the SWA slide and the prefill and decode planners.
    """

    def __init__(self, config: CacheConfig, tp_group: object | None = None) -> None:
        if not isinstance(config, CacheConfig):
            raise ValueError("config must be a CacheConfig")
        self.tp = TPSync(tp_group)
        self.config = config
        cfg = config
        self.device = torch.device(cfg.device)
        self.undo = UndoLog()  # steps happen whole or not at all (hybridkv.undo)
        self.arena: Arena | None = None
        pools = cfg.arena_pools if cfg.arena else ()
        full_tokens, swa_tokens = cfg.full_tokens, cfg.swa_tokens if cfg.has_swa else 0
        ps, heads, dim = cfg.page_size, cfg.num_kv_heads, cfg.head_dim
        kv_pages: list[torch.Tensor | None] = [None, None]
        state_slots = None
        if cfg.arena:
            self.arena = Arena(cfg.arena_layout, self.device, self.undo)
            layout = self.arena.layout
            for i, (pool, layers) in enumerate(
                (("full", cfg.full_layer_ids), ("swa", cfg.swa_layer_ids))
            ):
                if pool in pools:
                    kv_pages[i] = self.arena.view(
                        pools.index(pool), cfg.dtype, (2 * len(layers), ps, heads, dim)
                    )
            if "full" in pools:
                full_tokens = (layout.capacity(pools.index("full")) - 1) * ps
            if "swa" in pools:
                swa_tokens = (layout.capacity(pools.index("swa")) - 1) * ps
            if "state" in pools:
                shape = (len(cfg.mamba_layer_ids), *cfg.state_shape)
                state_slots = self.arena.view(pools.index("state"), cfg.dtype, shape)
        self.allocator = SWAAllocator(
            full_tokens,
            swa_tokens,
            cfg.page_size,
            self.device,
            cfg.backend,
            self.undo,
            ("full" in pools, "swa" in pools),
        )
        alloc = self.allocator
        if self.arena is not None:
            for pool, allocator in (("full", alloc.full), ("swa", alloc.swa)):
                if pool in pools:
                    self.arena.attach(pools.index(pool), allocator)
        self.kv = KVPool(
            cfg.full_layer_ids,
            list(cfg.swa_layer_ids),
            alloc.full.num_slots,
            alloc.swa.num_slots if alloc.has_swa else 0,
            cfg.page_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.dtype,
            self.device,
            alloc.full_to_swa,
            cfg.backend,
            (kv_pages[0], kv_pages[1]),
        )
        self.states = None
        if cfg.mamba_layer_ids:
            self.states = StatePool(
                list(cfg.mamba_layer_ids),
                cfg.state_slots,
                cfg.state_shape,
                cfg.dtype,
                self.device,
                cfg.backend,
                self.undo,
                state_slots,
            )
            if state_slots is not None:
                self.arena.attach(pools.index("state"), self.states.allocator)
        self.tree = RadixTree(
            alloc,
            cfg.page_size,
            cfg.window,
            cfg.swa_eviction,
            self._host_tier(),
            self.states,
            self.undo,
        )
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.table = RequestTable(
            cfg.max_running_requests, cfg.max_context_len, self.device, self.undo
        )
        self.queues = Queues(self.undo)
        self.admission = Admission(
            cfg,
            self.table,
            self.queues,
            self.tree,
            alloc,
            self.states,
            self.counters,
            self.arena,
            self.tp,
        )
        self.caching = Caching(cfg, self.table, self.tree, alloc, self.states, self.undo)
        slide = SWASlide(cfg, self.table, self.tree, alloc)
        transfers = None if self.tree.host is None else self.tree.host.transfers
        pages = PlanBuilder(cfg, self.table, alloc, transfers)
        self.prefill = Prefill(
            cfg,
            self.table,
            self.queues,
            self.tree,
            alloc,
            self.states,
            self.admission,
            slide,
            pages,
            self.tp,
            self.counters,
            self.undo,
        )
        self.decode = Decode(
            cfg,
            self.table,
            self.queues,
            alloc,
            self.states,
            self.admission,
            self.caching,
            slide,
            pages,
            self.counters,
        )
        self._pending: StepPlan | None = None
        self._pending_gone: set[int] = set()  # rows of requests aborted since the plan
        self._arrivals = 0

    @property
    def req_to_token(self) -> torch.Tensor:
        """int32 ``[max_running_requests, max_context_len]``: full slots by row and position."""
        return self.table.req_to_token

    @property
    def _token_bound(self) -> int:
        """Token ids must lie below this: the vocabulary, else what int64 holds."""
        return self.config.vocab_size or MAX_TOKEN_ID

    @property
    def new_token_ratio(self) -> float:
        return self.admission.new_token_ratio

    def _host_tier(self) -> HostTier | None:
        cfg = self.config
        if not cfg.host_tokens:
            return None
        page_elems = cfg.page_size * cfg.num_kv_heads * cfg.head_dim
        full_chunks, swa_chunks = 2 * len(cfg.full_layer_ids), 2 * len(cfg.swa_layer_ids)
        undo = self.undo
        full = HostPool(
            cfg.host_tokens, cfg.page_size, full_chunks, page_elems, cfg.dtype, cfg.backend, undo
        )
        swa = None
        if cfg.has_swa:
            swa = HostPool(
                cfg.host_swa_tokens,
                cfg.page_size,
                swa_chunks,
                page_elems,
                cfg.dtype,
                cfg.backend,
                undo,
            )
        storage = None
        if cfg.storage is not None:
            signature = {
                "page_size": cfg.page_size,
                "full_layers": len(cfg.full_layer_ids),
                "swa_layers": len(cfg.swa_layer_ids),
                "num_kv_heads": cfg.num_kv_heads,
                "head_dim": cfg.head_dim,
                "dtype": str(cfg.dtype),
            }
            storage = FileStorage(cfg.storage, signature)
        state = None
        if cfg.mamba_layer_ids:
            elems = math.prod(cfg.state_shape)
            layers = len(cfg.mamba_layer_ids)
            state = HostPool(cfg.host_state_slots, 1, layers, elems, cfg.dtype, cfg.backend, undo)
        return HostTier(self.kv, full, swa, cfg.write_policy, storage, state)

    # ---------------------------------------------------------------- requests

    def add_request(self, request: Request) -> None:
        """Queue a request; ``ValueError`` (nothing changed) if it is malformed or can never fit."""
        cfg = self.config
        if not isinstance(request, Request):
            raise ValueError("request must be a hybridkv.Request")
        if not isinstance(request.rid, str) or not request.rid:
            raise ValueError("rid must be a non-empty str")
        if request.rid in self.queues.reqs:
            raise ValueError(f"rid {request.rid!r} is already in use")
        ids = request.input_ids
        if not isinstance(ids, Sequence) or isinstance(ids, str) or len(ids) == 0:
            raise ValueError("input_ids must be a non-empty sequence of token ids")
        bound = self._token_bound
        # NOTE: numpy integers are ids too (a tokenizer's array); bools are not.
        if not all(type(t) in _ID_TYPES and 0 <= t < bound for t in ids):
            raise ValueError(f"input_ids must hold ints in [0, {bound}){_bound_name(bound)}")
        n = request.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {n!r}")
        total = len(ids) + n
        if total > cfg.max_context_len:
            raise ValueError(
                f"input_ids + max_new_tokens ({total}) exceeds max_context_len "
                f"({cfg.max_context_len})"
            )
        if cost(cfg, total).full > cfg.full_capacity:
            what = "memory_bytes" if "full" in cfg.arena_pools and cfg.arena else "full_tokens"
            raise ValueError(
                f"input_ids + max_new_tokens ({total}) can never fit {what} ({getattr(cfg, what)})"
            )
        req = ReqState(request.rid, [int(t) for t in ids], 0, n, self._arrivals)
        self._arrivals += 1
        self.queues.add(req)

    def abort(self, rid: str) -> None:
        """Drop a request wherever it is; its computed KV stays cached in the tree."""
        req = self._get(rid)
        with self.undo.step():
            self._abort(req)

    def _abort(self, req: ReqState) -> None:
        q = self.queues
        self._begin_step()
        if req.row < 0:
            q.unwait(req)
        else:
            row = req.row
            in_flight = self._pending is not None and row in self._pending_rows()
            self.caching.release(req, in_flight=in_flight)
            if in_flight:
                self._pending_gone.add(row)
            if req.rid in q.running:
                q.stop(req)
            if q.chunked is req:
                q.set_chunked(None)
        q.forget(req)

    def req_slots(self, rid: str) -> torch.Tensor:
        """int64 full slots of every position of ``rid`` that has KV."""
        req = self._get(rid)
        if req.row < 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return self.table.slots(req.row, 0, int(self.table.kv_len[req.row]))

    def _get(self, rid: str) -> ReqState:
        if rid not in self.queues.reqs:
            raise ValueError(f"unknown rid {rid!r}")
        return self.queues.reqs[rid]

    def _pending_rows(self) -> set[int]:
        return set(self._pending.batch.rows.tolist())

    # ---------------------------------------------------------------- steps

    def schedule(self) -> StepPlan | None:
        """Plan the next step (``None`` when nothing can run); allocates its slots."""
        if self._pending is not None:
            raise ValueError("schedule: commit the pending plan first")
        if self.tree.host is not None:
            # NOTE: pages freed after a backup may be handed out now: the engine's stream
            # must not write them before the backup copy has read them.
            self.tree.host.transfers.wait_backups()
        with self.undo.step():
            self._begin_step()
            plan = self.prefill.schedule() or self.decode.schedule()
        if self.tree.host is not None:
            # NOTE: and after every copy issued while planning (write-back backups of pages
            # this plan may reuse): the engine's forward must come after them.
            self.tree.host.transfers.wait_backups()
        self._pending = plan
        return plan

    def commit(self, plan: StepPlan, next_token_ids: Sequence[int] | torch.Tensor) -> list[str]:
        """Advance every request of ``plan`` by its step; return the rids that finished.

        ``next_token_ids``: one id per request of the plan (ignored where the request
        produces no token, and for requests aborted since the plan). A device tensor is
        copied to the host (the one sync an engine that samples on the device pays).
        """
        if plan is None or plan is not self._pending:
            raise ValueError("plan is not the pending plan of this manager")
        ids = _token_ids(next_token_ids, len(plan), self._token_bound)
        batch, q = plan.batch, self.queues
        with self.undo.step():
            self._begin_step()
            with self.allocator.free_group():
                if batch.is_decode:
                    finished = self.decode.commit(batch, ids, self._pending_gone)
                else:
                    finished = self._commit_prefill(batch, ids)
                for req in finished:
                    self.caching.release(req)
                    q.stop(req)
                    q.forget(req)
            self.caching.free_in_flight_states()
        self._pending = None
        self._pending_gone = set()
        return [req.rid for req in finished]

    def _begin_step(self) -> None:
        """Keep the host state a step may change without a method of its owner (the parts
        keep the rest as they change it: hybridkv.undo)."""
        self.table.begin_step()
        self.tree.begin_step()
        self.undo.save(self.counters)
        self.undo.save(self.admission, "new_token_ratio", "_relieved_at")
        self.undo.save(self.caching, "in_flight_states")
        self.undo.save(self, "_pending_gone")

    def _commit_prefill(self, batch: StepBatch, ids: np.ndarray) -> list[ReqState]:
        t, finished = self.table, []
        produces = batch.produces_token.tolist()
        for row, n, token, produced in zip(
            batch.rows.tolist(), batch.extend_lens.tolist(), ids.tolist(), produces, strict=True
        ):
            if row in self._pending_gone:
                continue  # aborted after schedule (its rid may be in use again)
            req = t.owner[row]
            t.kv_len[row] += n
            self.counters["computed_tokens"] += n
            self.counters["prefill_computed_tokens"] += n
            self.caching.cache_prefix(req)
            if not produced:
                continue
            t.tokens[row, t.fill_len[row]] = token
            t.fill_len[row] += 1
            t.output_len[row] += 1
            if t.output_len[row] >= t.max_new[row]:
                finished.append(req)
        return finished

    # ---------------------------------------------------------------- introspection

    def stats(self) -> dict[str, int]:
        """Gauges (tokens, slots or requests now) and counters (since start)."""
        alloc, tree, q = self.allocator, self.tree, self.queues
        gauges = {
            "full_free": alloc.full_available,
            "swa_free": alloc.swa_available,
            "state_free": self.states.available if self.states is not None else 0,
            "host_free": tree.host.full.available if tree.host is not None else 0,
            "full_cached": tree.cached_full,
            "swa_cached": tree.cached_swa,
            "running": len(q.running) + (q.chunked is not None),
            "waiting": len(q.waiting),
            **self._bytes(),
        }
        transfers = {
            "backed_up_tokens": tree.backed_up_tokens,
            "loaded_swa_tokens": tree.loaded_swa_tokens,
        }
        return gauges | self.counters | transfers

    def _bytes(self) -> dict[str, int]:
        """``memory_bytes``: the device budget of the pools (the arena, or every static pool
        with its page 0); ``used_bytes``: what the pages allocated now (running or cached)
        hold, page 0 not counted."""
        per, ps = self.config.token_bytes, self.config.page_size
        pools = [(self.allocator.full, per["full"] * ps), (self.allocator.swa, per["swa"] * ps)]
        if self.states is not None:
            pools.append((self.states.allocator, per["state"]))
        used = sum(a.allocated_pages * b for a, b in pools if a is not None)
        if self.arena is not None:
            return {"memory_bytes": self.arena.layout.total_bytes, "used_bytes": used}
        memory = sum(a.num_pages * b for a, b in pools if a is not None)
        return {"memory_bytes": memory, "used_bytes": used}

    def check(self) -> None:
        """Raise :class:`~hybridkv.errors.CheckError` unless every invariant holds: each page
        of each pool is in exactly one of the free list, the tree and a running request; lock
        counts match the running requests' locks; every TP rank made as many collective calls
        (first, so that no rank waits in it for one whose local check failed)."""
        self.tp.check()
        self.tree.check()
        self.allocator.check()
        if self.arena is not None:
            self.arena.check()
        alloc, ps, t, q = self.allocator, self.config.page_size, self.table, self.queues
        active = [r for r in q.reqs.values() if r.row >= 0]
        cached = self.tree.cached_slots()
        own_full, own_swa = [], []
        for r in active:
            row = r.row
            ensure(t.owner[row] is r, "a row's owner drifted")
            ensure(
                t.kv_len[row] <= t.alloc_len[row] <= t.fill_len[row] <= t.max_context,
                "a row's lengths are out of order",
            )
            own_full.append(t.slots(row, int(t.cached_len[row]), int(t.alloc_len[row])))
            swa_from = max(int(t.cached_len[row]), int(t.released[row]))
            own_swa.append(t.slots(row, swa_from, int(t.alloc_len[row])))
        owned = self._owned_pages
        _check_partition("full", [s // ps for s in [cached, *own_full]], alloc.full, owned("full"))
        if alloc.has_swa:
            swa_owners = [alloc.full_to_swa[s] for s in (cached, *own_swa)]
            swa_pages = [s[s != 0] // ps for s in swa_owners]
            _check_partition("swa", swa_pages, alloc.swa, owned("swa"))
        locks: dict[int, int] = {}
        for req in active:
            lock = req.lock
            ensure(
                lock is not None and lock.node.end == t.cached_len[req.row],
                "a request's lock does not end at its cached prefix",
            )
            ensure(
                (t.pin_start[req.row], t.pin_end[req.row]) == (lock.swa_start, lock.node.end),
                "a row's SWA pin drifted from its lock",
            )
            for node in lock.node.path():
                locks[id(node)] = locks.get(id(node), 0) + 1
                ensure(node.end <= lock.swa_start or node.swa, "a locked window lost SWA")
        for node in self.tree.nodes():
            ensure(node.full_lock == locks.get(id(node), 0), "full lock count drifted")
            ensure(node.host_lock == 0, "a host copy pinned between steps")
            ensure(node.state_lock == 0, "a snapshot pinned between steps")
        for req in q.waiting:
            ensure(req.row < 0 and req.lock is None, "a waiting request holds a row or a lock")
        ensure(
            t.free_rows + len(active) == self.config.max_running_requests,
            "request rows are lost or held twice",
        )
        rows, rids = q.running_batch()
        ensure(
            rids == list(q.running) and rows.tolist() == [r.row for r in q.running.values()],
            "the running batch drifted from the running requests",
        )
        if self.states is not None:
            held = self.tree.state_slots()
            held += self.caching.in_flight_states
            for req in active:
                held.append(req.state_slot)
                if req.snapshot is not None:
                    held.append(req.snapshot[1])
            pages = [torch.tensor(held, dtype=torch.int64, device=self.device)]
            _check_partition("state", pages, self.states.allocator, owned("state"))
            ensure(len(held) == len(set(held)), "a state slot held twice")

    def _owned_pages(self, pool: str) -> torch.Tensor | None:
        """The pages of ``pool`` its arena chunks hold (``None``: a pool of its own)."""
        if self.arena is None or pool not in self.config.arena_pools:
            return None
        return self.arena.owned_page_mask(self.config.arena_pools.index(pool))

    def flush(self) -> None:
        """Wait for every pending host<->device transfer."""
        if self.tree.host is not None:
            self.tree.host.transfers.flush()

    def close(self) -> None:
        """Flush and drop every request; the manager is unusable afterwards."""
        self.flush()
        self.queues.clear()
        self._pending = None
        self._pending_gone = set()
        self.caching.in_flight_states = []


def _token_ids(next_token_ids: object, n: int, bound: int) -> np.ndarray:
    """``next_token_ids`` as an int64 host array, checked: ``n`` ids in ``[0, bound)``."""
    bad = f"next_token_ids must hold ints in [0, {bound}){_bound_name(bound)}"
    if isinstance(next_token_ids, torch.Tensor):
        next_token_ids = next_token_ids.tolist()
    try:
        ids = np.asarray(next_token_ids)
    except (OverflowError, ValueError):
        raise ValueError(bad) from None
    if ids.ndim != 1 or len(ids) != n:
        raise ValueError(f"next_token_ids has {len(ids)} ids, plan has {n} requests")
    if n and (ids.dtype.kind not in "iu" or ids.dtype == np.uint64 or bool((ids < 0).any())):
        raise ValueError(bad)
    # NOTE: int64 ids are below MAX_TOKEN_ID already (comparing with 2**63 is not exact in
    # numpy 1.x, which compares int64 with it as float64).
    if n and bound < MAX_TOKEN_ID and bool((ids >= bound).any()):
        raise ValueError(bad)
    return ids.astype(np.int64, copy=False)


def _bound_name(bound: int) -> str:
    return "" if bound == MAX_TOKEN_ID else " (vocab_size)"


def _check_partition(
    pool: str,
    owners: list[torch.Tensor],
    allocator: PagedAllocator,
    owned: torch.Tensor | None = None,
) -> None:
    """Raise :class:`~hybridkv.errors.CheckError` unless every page but page 0 is held by
    exactly one owner or free, and page 0 by none; with an arena (``owned``: the pages of
    the pool's chunks) that holds for the pool's pages, and no other page is used."""
    free = allocator.free_pages_view()
    count = torch.zeros(allocator.num_pages, dtype=torch.int64, device=free.device)
    for pages in owners:
        pages = torch.unique(pages)
        count.index_add_(0, pages, torch.ones_like(pages))
    count.index_add_(0, free, torch.ones_like(free))
    ensure(int(count[0]) == 0, f"{pool}: page 0 is in use")
    want = torch.ones_like(count) if owned is None else owned.long()
    bad = (count[1:] != want[1:]).nonzero().flatten() + 1
    ensure(bad.numel() == 0, f"{pool}: pages {bad[:8].tolist()} are lost or held twice")
