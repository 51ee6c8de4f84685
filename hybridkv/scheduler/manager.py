"""MemoryManager: the engine facade over pools, tree and admission.

A step is ``schedule()`` (admit and allocate, build page tables), the engine's forward
(writing K/V at ``plan.out_cache_loc``), then ``commit()`` (advance, finish, cache).
Prefill comes first: a step admits waiting requests (and continues the chunked one) when
any fit, and otherwise decodes every running request.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch

from hybridkv import kernels
from hybridkv.allocator import HostPool, KVPool, PagedAllocator, StatePool, SWAAllocator
from hybridkv.scheduler.caching import CachingMixin
from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.cost import cost
from hybridkv.scheduler.decode import DecodeMixin
from hybridkv.scheduler.plan import PageTable, Request, ScheduledReq, StepPlan
from hybridkv.scheduler.prefill import PrefillMixin
from hybridkv.scheduler.records import INIT_NEW_TOKEN_RATIO, ReqState
from hybridkv.scheduler.tp import TPSync
from hybridkv.tree import EvictParams, HostTier, RadixTree
from hybridkv.tree.storage import FileStorage

COUNTERS = (
    "computed_tokens",
    "device_hit_tokens",
    "host_hit_tokens",
    "storage_hit_tokens",
    "evicted_full_tokens",
    "evicted_swa_tokens",
    "backed_up_tokens",
    "loaded_tokens",
    "retracted_requests",
)


class MemoryManager(PrefillMixin, DecodeMixin, CachingMixin):
    """Owns the KV cache of one model replica; see the engine contract in DESIGN.md."""

    def __init__(self, config: CacheConfig, tp_group: object | None = None) -> None:
        if not isinstance(config, CacheConfig):
            raise ValueError("config must be a CacheConfig")
        self.tp = TPSync(tp_group)
        self.config = config
        cfg = config
        self.device = torch.device(cfg.device)
        # NOTE: a model without SWA layers gets an SWA pool as large as the full pool and no
        # window: it never runs short first and never releases, so one code path serves both.
        swa_tokens = cfg.swa_tokens if cfg.has_swa else cfg.full_tokens
        self.allocator = SWAAllocator(
            cfg.full_tokens, swa_tokens, cfg.page_size, self.device, cfg.backend
        )
        self.kv = KVPool(
            cfg.full_layer_ids,
            list(cfg.swa_layer_ids),
            self.allocator.full.num_slots,
            self.allocator.swa.num_slots,
            cfg.page_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.dtype,
            self.device,
            self.allocator.full_to_swa,
            cfg.backend,
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
            )
        self.tree = RadixTree(
            self.allocator,
            cfg.page_size,
            cfg.window,
            cfg.swa_eviction,
            self._host_tier(),
            self.states,
        )
        rows = cfg.max_running_requests
        self.req_to_token = torch.zeros(
            rows, cfg.max_context_len, dtype=torch.int32, device=self.device
        )
        self.released_lens = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self._free_rows = list(range(rows - 1, -1, -1))
        self._reqs: dict[str, ReqState] = {}
        self._waiting: deque[ReqState] = deque()
        self._running: dict[str, ReqState] = {}  # past their prefill (or on its last chunk)
        self._chunked: ReqState | None = None
        self._pending: StepPlan | None = None
        self._pending_reqs: list[ReqState] = []  # the pending plan's requests, in its order
        self._in_flight_states: list[int] = []  # working slots of aborted in-flight requests
        self._arrivals = 0
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.counters = dict.fromkeys(COUNTERS, 0)

    def _host_tier(self) -> HostTier | None:
        cfg = self.config
        if not cfg.host_tokens:
            return None
        page_elems = cfg.page_size * cfg.num_kv_heads * cfg.head_dim
        full_chunks, swa_chunks = 2 * len(cfg.full_layer_ids), 2 * len(cfg.swa_layer_ids)
        full = HostPool(
            cfg.host_tokens, cfg.page_size, full_chunks, page_elems, cfg.dtype, cfg.backend
        )
        swa = None
        if cfg.has_swa:
            swa = HostPool(
                cfg.host_swa_tokens, cfg.page_size, swa_chunks, page_elems, cfg.dtype, cfg.backend
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
            state = HostPool(cfg.host_state_slots, 1, layers, elems, cfg.dtype, cfg.backend)
        return HostTier(self.kv, full, swa, cfg.write_policy, storage, state)

    # ---------------------------------------------------------------- requests

    def add_request(self, request: Request) -> None:
        """Queue a request; ``ValueError`` (nothing changed) if it is malformed or can never fit."""
        cfg = self.config
        if not isinstance(request, Request):
            raise ValueError("request must be a hybridkv.Request")
        if not isinstance(request.rid, str) or not request.rid:
            raise ValueError("rid must be a non-empty str")
        if request.rid in self._reqs:
            raise ValueError(f"rid {request.rid!r} is already in use")
        ids = request.input_ids
        if not isinstance(ids, Sequence) or isinstance(ids, str) or len(ids) == 0:
            raise ValueError("input_ids must be a non-empty sequence of token ids")
        if not all(type(t) is int and t >= 0 for t in ids):
            raise ValueError("input_ids must hold non-negative ints")
        n = request.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {n!r}")
        total = len(ids) + n
        if total > cfg.max_context_len:
            raise ValueError(
                f"input_ids + max_new_tokens ({total}) exceeds max_context_len "
                f"({cfg.max_context_len})"
            )
        if cost(cfg, total).full > cfg.full_tokens - cfg.full_tokens % cfg.page_size:
            raise ValueError(
                f"input_ids + max_new_tokens ({total}) can never fit full_tokens "
                f"({cfg.full_tokens})"
            )
        req = ReqState(request.rid, list(ids), 0, n, self._arrivals)
        self._arrivals += 1
        self._reqs[req.rid] = req
        self._waiting.append(req)

    def abort(self, rid: str) -> None:
        """Drop a request wherever it is; its computed KV stays cached in the tree."""
        req = self._get(rid)
        if req.row < 0:
            self._waiting.remove(req)
        else:
            self._release(req, in_flight=any(r is req for r in self._pending_reqs))
            self._running.pop(rid, None)
            if self._chunked is req:
                self._chunked = None
        del self._reqs[rid]

    def req_slots(self, rid: str) -> torch.Tensor:
        """int64 full slots of every position of ``rid`` that has KV."""
        req = self._get(rid)
        if req.row < 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return self.req_to_token[req.row, : req.kv_len].long()

    def _get(self, rid: str) -> ReqState:
        if rid not in self._reqs:
            raise ValueError(f"unknown rid {rid!r}")
        return self._reqs[rid]

    # ---------------------------------------------------------------- steps

    def schedule(self) -> StepPlan | None:
        """Plan the next step (``None`` when nothing can run); allocates its slots."""
        if self._pending is not None:
            raise ValueError("schedule: commit the pending plan first")
        if self.tree.host is not None:
            # NOTE: pages freed after a backup may be handed out now: the engine's stream
            # must not write them before the backup copy has read them.
            self.tree.host.transfers.wait_backups()
        plan = self._schedule_prefill() or self._schedule_decode()
        if self.tree.host is not None:
            # NOTE: and after every copy issued while planning (write-back backups of pages
            # this plan may reuse): the engine's forward must come after them.
            self.tree.host.transfers.wait_backups()
        self._pending = plan
        self._pending_reqs = [] if plan is None else [self._reqs[r.rid] for r in plan.reqs]
        return plan

    def commit(self, plan: StepPlan, next_token_ids: Sequence[int] | torch.Tensor) -> list[str]:
        """Advance every request of ``plan`` by its step; return the rids that finished.

        ``next_token_ids``: one id per ``plan.reqs`` entry (ignored where the entry produces
        no token, and for requests aborted since the plan).
        """
        if plan is None or plan is not self._pending:
            raise ValueError("plan is not the pending plan of this manager")
        if isinstance(next_token_ids, torch.Tensor):
            next_token_ids = next_token_ids.tolist()
        ids = list(next_token_ids)
        if len(ids) != len(plan.reqs):
            raise ValueError(
                f"next_token_ids has {len(ids)} ids, plan has {len(plan.reqs)} requests"
            )
        if not all(type(t) is int and t >= 0 for t in ids):
            raise ValueError("next_token_ids must hold non-negative ints")
        finished, snapshots = [], []
        with self.allocator.free_group():
            for sreq, req, token in zip(plan.reqs, self._pending_reqs, ids, strict=True):
                if self._reqs.get(sreq.rid) is not req:
                    continue  # aborted after schedule (its rid may be in use again)
                req.kv_len += sreq.extend_len
                self.counters["computed_tokens"] += sreq.extend_len
                if not sreq.is_decode:
                    self._cache_prefix(req)
                elif self.states is not None and req.kv_len % self.config.page_size == 0:
                    snapshots.append(req)
                if not sreq.produces_token:
                    continue
                req.fill_ids.append(token)
                req.output_len += 1
                if req.output_len >= req.max_new_tokens:
                    finished.append(req)
            if snapshots:
                self._take_snapshots(snapshots)
            for req in finished:
                self._release(req)
                del self._running[req.rid]
                del self._reqs[req.rid]
        self._pending = None
        self._pending_reqs = []
        if self._in_flight_states:
            device = self.states.buf.device
            self.states.allocator.free_pages(torch.tensor(self._in_flight_states, device=device))
            self._in_flight_states = []
        return [req.rid for req in finished]

    def _make_room(self, full_tokens: int, swa_tokens: int | None = None) -> bool:
        """Evict until each pool has the tokens free; False if even eviction cannot."""
        swa_tokens = full_tokens if swa_tokens is None else swa_tokens
        alloc = self.allocator
        short_full = max(0, full_tokens - alloc.full_available)
        short_swa = max(0, swa_tokens - alloc.swa_available)
        if short_full or short_swa:
            freed = self.tree.evict(EvictParams(full=short_full, swa=short_swa))
            self.counters["evicted_full_tokens"] += freed.full
            self.counters["evicted_swa_tokens"] += freed.swa
        return full_tokens <= alloc.full_available and swa_tokens <= alloc.swa_available

    def _plan(
        self,
        sreqs: list[ScheduledReq],
        out: torch.Tensor,
        rows: torch.Tensor,
        extend_starts: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> StepPlan:
        cfg = self.config
        full = kernels.page_table(
            self.req_to_token,
            rows,
            torch.zeros_like(seq_lens),
            seq_lens,
            cfg.page_size,
            backend=cfg.backend,
        )
        swa = None
        if cfg.window is not None:
            swa = kernels.page_table(
                self.req_to_token,
                rows,
                (extend_starts - cfg.window).clamp(min=0),
                seq_lens,
                cfg.page_size,
                full_to_swa_map=self.allocator.full_to_swa,
                backend=cfg.backend,
            )
        return StepPlan(
            reqs=sreqs,
            out_cache_loc=out,
            req_pool_indices=rows,
            seq_lens=seq_lens,
            full_pages=PageTable(*full),
            swa_pages=None if swa is None else PageTable(*swa),
            transfers=None if self.tree.host is None else self.tree.host.transfers,
        )

    # ---------------------------------------------------------------- introspection

    def stats(self) -> dict[str, int]:
        """Gauges (tokens, slots or requests now) and counters (since start)."""
        alloc, tree = self.allocator, self.tree
        has_swa = self.config.has_swa
        gauges = {
            "full_free": alloc.full_available,
            "swa_free": alloc.swa_available if has_swa else 0,
            "state_free": self.states.available if self.states is not None else 0,
            "host_free": tree.host.full.available if tree.host is not None else 0,
            "full_cached": tree.cached_full,
            "swa_cached": tree.cached_swa,
            "running": len(self._running) + (self._chunked is not None),
            "waiting": len(self._waiting),
        }
        return gauges | self.counters | {"backed_up_tokens": tree.backed_up_tokens}

    def check(self) -> None:
        """Assert every invariant: each page of each pool is in exactly one of the free list,
        the tree and a running request; lock counts match the running requests' locks."""
        self.tree.check()
        self.allocator.check()
        alloc, ps = self.allocator, self.config.page_size
        active = [r for r in self._reqs.values() if r.row >= 0]
        released = self.released_lens.tolist()
        cached = self.tree.cached_slots()
        own_full = [self.req_to_token[r.row, r.cached_len : r.alloc_len].long() for r in active]
        own_swa = [
            self.req_to_token[r.row, max(r.cached_len, released[r.row]) : r.alloc_len].long()
            for r in active
        ]
        full_owners = [cached, *own_full]
        swa_owners = [alloc.full_to_swa[s] for s in (cached, *own_swa)]
        _assert_partition("full", [s // ps for s in full_owners], alloc.full)
        _assert_partition("swa", [s[s != 0] // ps for s in swa_owners], alloc.swa)
        locks: dict[int, int] = {}
        for req in active:
            assert req.lock is not None and req.lock.node.end == req.cached_len
            for node in req.lock.node.path():
                locks[id(node)] = locks.get(id(node), 0) + 1
                assert node.start < req.lock.swa_start or node.swa, "a locked window lost SWA"
        for node in self.tree._nodes():
            assert node.full_lock == locks.get(id(node), 0), "full lock count drifted"
            assert node.host_lock == 0, "a host copy pinned between steps"
            assert node.state_lock == 0, "a snapshot pinned between steps"
        for req in self._waiting:
            assert req.row < 0 and req.lock is None and req.kv_len == 0
        assert len(self._free_rows) + len(active) == self.config.max_running_requests
        if self.states is not None:
            held = self.tree._check_states()
            held += self._in_flight_states
            for req in active:
                held.append(req.state_slot)
                if req.snapshot is not None:
                    held.append(req.snapshot[1])
            pages = [torch.tensor(held, dtype=torch.int64, device=self.device)]
            _assert_partition("state", pages, self.states.allocator)
            assert len(held) == len(set(held)), "a state slot held twice"

    def flush(self) -> None:
        """Wait for every pending host<->device transfer."""
        if self.tree.host is not None:
            self.tree.host.transfers.flush()

    def close(self) -> None:
        """Flush and drop every request; the manager is unusable afterwards."""
        self.flush()
        self._reqs.clear()
        self._waiting.clear()
        self._running.clear()
        self._chunked = None
        self._pending = None
        self._pending_reqs = []
        self._in_flight_states = []


def _assert_partition(pool: str, owners: list[torch.Tensor], allocator: PagedAllocator) -> None:
    """Assert every page but page 0 is held by exactly one owner or free, page 0 by none."""
    free = allocator.free_pages_view()
    count = torch.zeros(allocator.num_pages, dtype=torch.int64, device=free.device)
    for pages in owners:
        pages = torch.unique(pages)
        count.index_add_(0, pages, torch.ones_like(pages))
    count.index_add_(0, free, torch.ones_like(free))
    assert int(count[0]) == 0, f"{pool}: page 0 is in use"
    bad = (count[1:] != 1).nonzero().flatten() + 1
    assert bad.numel() == 0, f"{pool}: pages {bad[:8].tolist()} are lost or held twice"
