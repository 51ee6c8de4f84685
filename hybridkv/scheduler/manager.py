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
from dataclasses import dataclass

import torch

from hybridkv import kernels
from hybridkv.allocator import HostPool, KVPool, PagedAllocator, StatePool, SWAAllocator
from hybridkv.scheduler.adder import PrefillAdder
from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.cost import NO_LOAD, Cost, cost, decode_reserve, swa_steady
from hybridkv.scheduler.plan import PageTable, Request, ScheduledReq, StepPlan
from hybridkv.scheduler.tp import TPSync
from hybridkv.tree import EvictParams, HostTier, LockHandle, MatchResult, Node, RadixTree
from hybridkv.tree.storage import FileStorage

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001

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


@dataclass(slots=True, eq=False)
class _Req:
    """A request's progress. Positions ``[0, kv_len)`` have KV, ``[0, alloc_len)`` slots
    (in ``req_to_token[row]``); ``[0, cached_len)`` are the tree's (locked by ``lock``)."""

    rid: str
    fill_ids: list[int]  # prompt, then every generated token
    output_len: int
    max_new_tokens: int
    arrival: int
    row: int = -1
    kv_len: int = 0
    alloc_len: int = 0
    cached_len: int = 0
    lock: LockHandle | None = None
    state_slot: int = -1  # working recurrent state (running requests of a mamba model)
    snapshot: tuple[int, int] | None = None  # (position, slot): its state at a page boundary

    @property
    def remaining_new_tokens(self) -> int:
        return self.max_new_tokens - self.output_len


@dataclass(frozen=True, slots=True)
class _Admitted:
    """A request's chunk admitted this step; ``match`` is its matched prefix if it is new,
    ``load`` what loading that prefix back from host takes."""

    req: _Req
    chunk: int
    swa_held: int
    match: MatchResult | None = None
    load: Cost = NO_LOAD
    load_start: int = 0  # where its pin on host copies starts (unpin from there)

    @property
    def completes(self) -> bool:
        return self.req.kv_len + self.chunk == len(self.req.fill_ids)


class MemoryManager:
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
        self._reqs: dict[str, _Req] = {}
        self._waiting: deque[_Req] = deque()
        self._running: dict[str, _Req] = {}  # past their prefill (or on its last chunk)
        self._chunked: _Req | None = None
        self._pending: StepPlan | None = None
        self._pending_reqs: list[_Req] = []  # the pending plan's requests, in its order
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
        req = _Req(request.rid, list(ids), 0, n, self._arrivals)
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

    def _get(self, rid: str) -> _Req:
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
            self.tree.host.transfers.wait()
        plan = self._schedule_prefill() or self._schedule_decode()
        if self.tree.host is not None:
            # NOTE: and after every copy issued while planning (write-back backups of pages
            # this plan may reuse): the engine's forward must come after them.
            self.tree.host.transfers.wait()
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

    # ---------------------------------------------------------------- prefill

    def _rooms(self) -> Cost:
        """Each pool's available + evictable tokens (state: slots and unpinned snapshots)."""
        tree, alloc = self.tree, self.allocator
        state = 0
        if self.states is not None:
            pinned = sum(1 for n in tree._nodes() if n.state is not None and n.state_lock)
            state = self.states.available + tree.cached_states - pinned
        return Cost(
            alloc.full_available + tree.evictable_full,
            alloc.swa_available + tree.evictable_swa,
            state,
        )

    def _swa_held(self, req: _Req) -> int:
        """SWA tokens a request keeps alive: the window of its prefix its lock pins in the
        tree, and (once running) its own SWA tokens not yet released. A new request's chunk
        is charged only for what it adds to them."""
        if self.config.window is None:
            return 0
        pinned = max(0, req.lock.node.end - req.lock.swa_start)
        if req.row < 0:
            return pinned
        return pinned + req.alloc_len - max(req.cached_len, int(self.released_lens[req.row]))

    def _running_reservation(self) -> Cost:
        """Full tokens held back for running decodes; SWA tokens they may still grow by."""
        full = swa = 0
        steady = swa_steady(self.config)
        released = self.released_lens.tolist()
        for req in self._running.values():
            full += decode_reserve(req.remaining_new_tokens, self.new_token_ratio)
            own = req.alloc_len - max(req.cached_len, released[req.row])
            swa += max(0, steady - own)
        return Cost(full, swa if self.config.has_swa else 0)

    def _window_start(self, end: int) -> int:
        """First position of the last window before ``end``, on a page boundary."""
        start = max(0, end - (self.config.window or 0))
        return start - start % self.config.page_size

    def _decode_reserve(self, req: _Req, admitted: list[_Admitted]) -> int:
        """The decode reservation of a request being admitted: none when nothing else runs
        (a lone request always fits, and reserving for it could block it forever)."""
        if not self._running and not any(a.req is not req for a in admitted):
            return 0
        return decode_reserve(req.remaining_new_tokens, self.new_token_ratio)

    def _schedule_prefill(self) -> StepPlan | None:
        if self._chunked is None and not self._waiting:
            return None
        adder = PrefillAdder(self.config, self._running_reservation())
        admitted: list[_Admitted] = []
        chunked = self._chunked
        if chunked is not None:
            self._release_swa([chunked])
            held = self._swa_held(chunked)
            chunk = adder.admit(
                self._rooms(),
                chunked.kv_len,
                len(chunked.fill_ids) - chunked.kv_len,
                self._decode_reserve(chunked, admitted),
                held,
            )
            if chunk == 0:
                return None
            admitted.append(_Admitted(chunked, chunk, held, None))
        for req in self._waiting:
            if len(admitted) - (chunked is not None) == len(self._free_rows):
                break
            if admitted and not admitted[-1].completes:
                break  # a partial chunk took what was left
            match = self._match(req)
            lock = self.tree.inc_lock(match.last_node, self._window_start(match.last_host_node.end))
            load_start = match.load_start
            self.tree.pin_host(match.last_host_node, load_start, +1)
            load = Cost(
                match.host_hit_length, match.swa_host_hit_length, int(match.state_from_host)
            )
            prefix_len = match.length + match.host_hit_length
            req.lock, req.kv_len = lock, prefix_len
            held = self._swa_held(req)
            seed = match.last_host_node if self.states is not None else None
            if seed is not None:
                seed.state_lock += 1  # its snapshot seeds the working state
            chunk = adder.admit(
                self._rooms(),
                prefix_len,
                len(req.fill_ids) - prefix_len,
                self._decode_reserve(req, admitted),
                held,
                load,
                new=True,
            )
            if chunk == 0:
                if seed is not None:
                    seed.state_lock -= 1
                self.tree.pin_host(match.last_host_node, load_start, -1)
                self.tree.dec_lock(lock)
                req.lock, req.kv_len = None, 0
                break
            admitted.append(_Admitted(req, chunk, held, match, load, load_start))
        if not admitted:
            return None
        for a in admitted:
            if a.match is not None:
                self._waiting.popleft()
                a.req.row = self._free_rows.pop()
        plan = self._extend(admitted)
        self._chunked = None
        for a in admitted:
            if a.completes:
                self._running[a.req.rid] = a.req
            else:
                self._chunked = a.req
        return plan

    def _extend(self, admitted: list[_Admitted]) -> StepPlan:
        """Evict what the batch lacks, load back matched host KV, allocate the new tokens in one
        call per pool, and fill req_to_token."""
        cfg, ps = self.config, self.config.page_size
        prefix_lens = torch.tensor([a.req.kv_len for a in admitted], dtype=torch.int64)
        seq_lens = prefix_lens + torch.tensor([a.chunk for a in admitted], dtype=torch.int64)
        pages = (seq_lens + ps - 1) // ps - (prefix_lens + ps - 1) // ps
        for n, a in zip(pages.tolist(), admitted, strict=True):
            # NOTE: allocation never takes more than admission charged (one cost function);
            # both pools take n pages (SWA pages are paired with full pages).
            end = a.req.kv_len + a.chunk
            charged = cost(cfg, a.chunk, a.swa_held, a.load, chunk_end=end, new=a.match is not None)
            assert n * ps + a.load.full <= charged.full, "full allocation exceeds the cost"
            assert cfg.window is None or n * ps + a.load.swa <= charged.swa, "SWA exceeds the cost"
            takes = int(a.match is not None) + a.load.state + int(end % ps == 0)
            assert self.states is None or takes <= charged.state, "state exceeds the cost"
        load = sum((a.load for a in admitted), NO_LOAD)
        self._make_room(int(pages.sum()) * ps + load.full, int(pages.sum()) * ps + load.swa)
        if self.states is not None:
            new = sum(1 for a in admitted if a.match is not None)
            self.tree.evict_states(new + load.state - self.states.available)
        prefixes = self._take_prefixes([a for a in admitted if a.match is not None])
        rows = torch.tensor([a.req.row for a in admitted], dtype=torch.int64, device=self.device)
        prefix_dev = prefix_lens.to(self.device)
        last_loc = self.req_to_token[rows, (prefix_dev - 1).clamp(min=0)].long()
        out = self.allocator.alloc_extend(prefix_lens, seq_lens, last_loc)
        assert out is not None, "admitted batch does not fit after eviction"
        write_lens = [a.req.kv_len if a.match is not None else 0 for a in admitted]
        kernels.write_req_to_token(
            self.req_to_token,
            rows,
            torch.cat(prefixes) if prefixes else out[:0],
            torch.tensor(write_lens, dtype=torch.int64, device=self.device),
            out,
            prefix_dev,
            seq_lens.to(self.device) - prefix_dev,
            backend=cfg.backend,
        )
        sreqs = []
        for a in admitted:
            start = a.req.kv_len
            a.req.alloc_len = start + a.chunk
            sreqs.append(
                ScheduledReq(
                    rid=a.req.rid,
                    req_pool_index=a.req.row,
                    extend_start=start,
                    extend_len=a.chunk,
                    is_decode=False,
                    produces_token=a.completes,
                    cached_len=a.match.length if a.match is not None else 0,
                    loaded_len=a.load.full,
                    state_slot=a.req.state_slot,
                )
            )
        return self._plan(sreqs, out, rows, prefix_dev, seq_lens.to(self.device))

    def _match(self, req: _Req) -> MatchResult:
        """Prefetch from storage, then match: the same result on every TP rank.

        Every rank makes the same collective calls whatever its local state: one MIN
        reduction for the prefetch, one for the match lengths; a rank that matched more than
        another (its trees drifted) re-matches to the common length.
        """
        limit = len(req.fill_ids) - 1
        self.counters["storage_hit_tokens"] += self.tree.prefetch(
            req.fill_ids, limit, self.tp.reduce_min
        )
        match = self.tree.match_prefix(req.fill_ids, limit)
        local = [match.length, match.host_hit_length, match.swa_host_hit_length]
        common = self.tp.reduce_min(local)
        if common != local:
            match = self.tree.match_prefix(req.fill_ids, common[0] + common[1])
        return match

    def _take_prefixes(self, new: list[_Admitted]) -> list[torch.Tensor]:
        """Load the new requests' host hits back (one call per pool), move each lock to the end
        of its whole prefix, and return each prefix's device slots."""
        ends = [a.match.last_host_node for a in new if a.load.full or a.load.swa]
        if ends:
            self.counters["loaded_tokens"] += self.tree.load_back(ends)
        if self.states is not None:
            self._seed_states(new)
        prefixes = []
        for a in new:
            req, match = a.req, a.match
            if a.load.full or a.load.swa:
                lock = self.tree.inc_lock(match.last_host_node)
                self.tree.dec_lock(req.lock)
                req.lock = lock
            self.tree.pin_host(match.last_host_node, a.load_start, -1)
            req.cached_len = req.kv_len
            self.released_lens[req.row] = req.cached_len
            self.counters["device_hit_tokens"] += match.length
            self.counters["host_hit_tokens"] += a.load.full
            prefixes.append(self.tree.prefix_slots(req.lock.node))
        return prefixes

    def _seed_states(self, new: list[_Admitted]) -> None:
        """Give each new request a working state slot: a copy of the snapshot its prefix ends
        at (loaded back from host first if need be; one copy for the batch), or zeros."""
        slots = self.states.allocator.alloc_pages(len(new))
        assert slots is not None, "admitted working states do not fit"
        src, dst, fresh = [], [], []
        for a, slot in zip(new, slots.tolist(), strict=True):
            a.req.state_slot = slot
            end = a.match.last_host_node
            if end is not self.tree.root:
                assert self.tree.load_state(end), "admitted state load back does not fit"
                src.append(end.state)
                dst.append(slot)
            else:
                fresh.append(slot)
            end.state_lock -= 1
        device = self.states.buf.device
        if self.tree.host is not None:
            # NOTE: snapshots just loaded back, and freed slots just backed up, are read and
            # overwritten on this stream: after those side-stream copies.
            self.tree.host.transfers.wait()
        if src:
            self.states.copy(torch.tensor(src, device=device), torch.tensor(dst, device=device))
        if fresh:
            self.states.zero(torch.tensor(fresh, device=device))

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

    # ---------------------------------------------------------------- decode

    def _schedule_decode(self) -> StepPlan | None:
        batch = list(self._running.values())
        if not batch:
            return None
        self._release_swa(batch)
        ps = self.config.page_size
        while True:
            need = sum(1 for r in batch if r.kv_len % ps == 0) * ps
            if self._make_room(need):
                break
            # NOTE: a lone request always fits (add_request and CacheConfig check it).
            if self._chunked is not None:
                victim, self._chunked = self._chunked, None
            else:
                assert len(batch) > 1, "a single running request does not fit the pools"
                victim = min(batch, key=lambda r: (r.output_len, -r.arrival))
                batch.remove(victim)
                del self._running[victim.rid]
            self._retract(victim)
        kv_lens = torch.tensor([r.kv_len for r in batch], dtype=torch.int64)
        rows = torch.tensor([r.row for r in batch], dtype=torch.int64, device=self.device)
        kv_dev = kv_lens.to(self.device)
        last_loc = self.req_to_token[rows, kv_dev - 1].long()
        out = self.allocator.alloc_decode(kv_lens + 1, last_loc)
        assert out is not None, "decode batch does not fit after eviction"
        ones = torch.ones_like(kv_dev)
        kernels.write_req_to_token(
            self.req_to_token,
            rows,
            out[:0],
            ones * 0,
            out,
            kv_dev,
            ones,
            backend=self.config.backend,
        )
        sreqs = []
        for req in batch:
            req.alloc_len = req.kv_len + 1
            sreqs.append(
                ScheduledReq(req.rid, req.row, req.kv_len, 1, True, True, state_slot=req.state_slot)
            )
        self.new_token_ratio = max(
            MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY
        )
        return self._plan(sreqs, out, rows, kv_dev, kv_dev + 1)

    def _release_swa(self, reqs: list[_Req]) -> None:
        """Free the SWA pages that slid out of these requests' windows (one kernel call)."""
        if self.config.window is None or not reqs:
            return
        rows = torch.tensor([r.row for r in reqs], dtype=torch.int64, device=self.device)
        seq = torch.tensor([r.kv_len for r in reqs], dtype=torch.int64, device=self.device)
        self.released_lens[rows] = self.allocator.swa_release(
            self.req_to_token, rows, seq, self.released_lens[rows], self.config.window
        )
        ps, reach = self.config.page_size, max(self.config.window, self.config.page_size)
        step = self.config.swa_lock_step
        for req in reqs:
            lock = req.lock
            if lock.swa_start >= lock.node.end:
                continue  # pins no SWA any more
            frontier = max(0, req.kv_len - reach)
            frontier = min(frontier - frontier % ps, lock.node.end)
            if lock.swa_start < frontier and (
                frontier == lock.node.end or frontier - lock.swa_start >= step
            ):
                # NOTE: the request's window slides over its cached prefix: stop pinning the
                # prefix's SWA KV behind it (the tree may tombstone it), as its own is released.
                req.lock = self.tree.inc_lock(lock.node, frontier)
                self.tree.dec_lock(lock)

    def _retract(self, req: _Req) -> None:
        """Cache a running request's KV in the tree, free its slots and re-queue it first."""
        self._release(req)
        req.kv_len = req.alloc_len = req.cached_len = 0
        self._waiting.appendleft(req)
        self.counters["retracted_requests"] += 1
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    def _cache_prefix(self, req: _Req) -> None:
        """Give the whole pages of a prefilled chunk to the tree and lock them instead.

        Other requests can share the prompt from now on, and the tree (not the request's
        sliding window) decides when its SWA KV goes. Where the tree already held the tokens,
        the request's duplicates are freed and its row points at the tree's slots.
        """
        ps = self.config.page_size
        aligned = req.kv_len - req.kv_len % ps
        if aligned <= req.cached_len:
            return
        row = req.row
        released = int(self.released_lens[row])
        node, slots = self.tree.insert(
            req.fill_ids[:aligned],
            self.req_to_token[row, :aligned].long(),
            req.cached_len,
            max(released, req.cached_len),
        )
        self.req_to_token[row, req.cached_len : aligned] = slots[req.cached_len :].to(torch.int32)
        lock = self.tree.inc_lock(node)
        assert req.lock is not None
        self.tree.dec_lock(req.lock)
        req.lock, req.cached_len = lock, aligned
        self.released_lens[row] = max(released, aligned)
        if self.states is not None and req.kv_len == aligned:
            self.tree.attach_state(node, req.state_slot)

    def _release(self, req: _Req, in_flight: bool = False) -> None:
        """Give a request's KV to the tree (whole pages), free the rest, unlock, free its row.

        ``in_flight``: the request is in the pending plan (aborted before commit), so the
        engine may be writing its working state slot now.
        """
        ps = self.config.page_size
        aligned = req.kv_len - req.kv_len % ps
        slots = self.req_to_token[req.row, : req.alloc_len].long()
        released = int(self.released_lens[req.row]) if self.config.window is not None else 0
        node = req.lock.node
        with self.allocator.free_group():
            if aligned > req.cached_len:
                node, _ = self.tree.insert(
                    req.fill_ids[:aligned], slots[:aligned], req.cached_len, released
                )
            self.allocator.free(slots[max(aligned, req.cached_len) :])
        if self.states is not None:
            self._release_states(req, node, aligned, in_flight)
        assert req.lock is not None
        self.tree.dec_lock(req.lock)
        req.lock = None
        self._free_rows.append(req.row)
        req.row = -1

    def _take_snapshots(self, reqs: list[_Req]) -> None:
        """Copy decoding requests' states at a page boundary into their snapshot slots (one
        copy): the tree keeps it when the request is cached. Best effort: a request that
        cannot get a slot keeps none (snapshots are a cache)."""
        src, dst = [], []
        for req in reqs:
            slot = req.snapshot[1] if req.snapshot is not None else self.tree.alloc_state()
            if slot is None:
                continue
            req.snapshot = (req.kv_len, slot)
            src.append(req.state_slot)
            dst.append(slot)
        if src:
            device = self.states.buf.device
            self.states.copy(torch.tensor(src, device=device), torch.tensor(dst, device=device))

    def _release_states(self, req: _Req, node: Node, end: int, in_flight: bool) -> None:
        """Leave the state after ``end`` tokens to ``node`` (ending there) if the request has
        it, and free its working and snapshot slots.

        NOTE: an in-flight request's working slot may hold the state before or after the
        engine's forward of the pending step: it is neither snapshotted nor reused until
        the plan is committed.
        """
        working, snapshot = req.state_slot, req.snapshot
        req.state_slot, req.snapshot = -1, None
        free, attached = [], False
        if in_flight:
            self._in_flight_states.append(working)
        elif req.kv_len == end:
            attached = self.tree.attach_state(node, working, owned=True)  # hands it over
        else:
            free.append(working)
        if snapshot is not None:
            if snapshot[0] == end and not attached:
                self.tree.attach_state(node, snapshot[1], owned=True)
            else:
                free.append(snapshot[1])
        if free:
            self.states.allocator.free_pages(torch.tensor(free, device=self.states.buf.device))

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
