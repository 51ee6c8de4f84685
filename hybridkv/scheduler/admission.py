"""The admission policy's state and figures: rooms, reservations, eviction on demand."""

from __future__ import annotations

from dataclasses import astuple

import numpy as np

from hybridkv.allocator import Arena, PagedAllocator, StatePool, SWAAllocator
from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.cost import (
    CLIP_MAX_NEW_TOKENS,
    Cost,
    chunks_short,
    decode_reserve,
    swa_steady,
)
from hybridkv.scheduler.queues import Queues
from hybridkv.scheduler.records import (
    INIT_NEW_TOKEN_RATIO,
    MIN_NEW_TOKEN_RATIO,
    NEW_TOKEN_RATIO_DECAY,
    ReqState,
)
from hybridkv.scheduler.table import RequestTable
from hybridkv.scheduler.tp import TPSync
from hybridkv.tree import EvictParams, RadixTree

# Eviction order under pressure: SWA tombstones are the cheapest to lose (the full KV stays
# cached), then recurrent snapshots, then full KV.
EVICT_ORDER = ("swa", "state", "full")


class Admission:
    """What each pool can still give (free + evictable), what running decodes hold back
    (the new-token ratio), and eviction when a step needs the room.

    With an arena (``arena``), a pool short of pages takes free chunks; under pressure
    (when admission or a decode step comes up short) it evicts, and the arena takes back the
    wholly free chunks of the other pools (a sync).
    """

    def __init__(
        self,
        config: CacheConfig,
        table: RequestTable,
        queues: Queues,
        tree: RadixTree,
        allocator: SWAAllocator,
        states: StatePool | None,
        counters: dict[str, int],
        arena: Arena | None = None,
        tp: TPSync | None = None,
    ) -> None:
        self.config = config
        self.arena = arena
        self.tp = tp or TPSync(None)
        self.table = table
        self.queues = queues
        self.tree = tree
        self.allocator = allocator
        self.states = states
        self.counters = counters
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self._relieved_at: tuple[int, ...] | None = None  # free pages at the last relief

    def decay(self) -> None:
        """A decode step ran: running requests need a little less held back."""
        self.new_token_ratio = max(
            MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY
        )

    def reset(self) -> None:
        """A request was retracted: hold back the most again."""
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    def rooms(self) -> Cost:
        """Each pool's available + evictable tokens (state: slots and unpinned snapshots)."""
        tree, alloc = self.tree, self.allocator
        state = 0
        if self.states is not None:
            state = self.states.available + tree.cached_states - tree.pinned_states
        free_chunks = self.arena.free_chunks if self.arena is not None else 0
        return Cost(
            alloc.full_available + tree.evictable_full,
            alloc.swa_available + tree.evictable_swa,
            state,
            free_chunks,
        )

    def swa_held(self, req: ReqState) -> int:
        """SWA KV present on the device that a running request keeps alive, which its chunk's
        charge counts as had: the window of its prefix that its lock pins and its own SWA KV
        not yet released."""
        if self.config.window is None:
            return 0
        pinned = max(0, req.lock.node.end - req.lock.swa_start)
        t, row = self.table, req.row
        return pinned + int(t.alloc_len[row] - max(t.cached_len[row], t.released[row]))

    def prefix_swa_held(self, end: int, swa_load: int) -> int:
        """The same for a new request whose matched prefix ends at ``end``: the prefix's last
        window less the ``swa_load`` of it still to be loaded back from host (a tombstone in
        the window is pinned but holds nothing yet)."""
        if self.config.window is None:
            return 0
        return end - self.window_start(end) - swa_load

    def running_reservation(self) -> Cost:
        """Full tokens held back for running decodes; SWA tokens they may still grow by."""
        rows, _ = self.queues.running_batch()
        if not len(rows):
            return Cost()
        t = self.table
        remaining = np.minimum(t.max_new[rows] - t.output_len[rows], CLIP_MAX_NEW_TOKENS)
        # NOTE: the same figure as decode_reserve() per request (truncation of a float).
        full = int((remaining * self.new_token_ratio).astype(np.int64).sum())
        if not self.config.has_swa:
            return Cost(full, 0)
        own = t.alloc_len[rows] - np.maximum(t.cached_len[rows], t.released[rows])
        swa = int(np.maximum(swa_steady(self.config) - own, 0).sum())
        return Cost(full, swa)

    def decode_reserve(self, req: ReqState, admitted_others: bool) -> int:
        """The decode reservation of a request being admitted: none when nothing else runs
        (a lone request always fits, and reserving for it could block it forever)."""
        if not self.queues.running and not admitted_others:
            return 0
        remaining = req.max_new_tokens - self._output_len(req)
        return decode_reserve(remaining, self.new_token_ratio)

    def _output_len(self, req: ReqState) -> int:
        return int(self.table.output_len[req.row]) if req.row >= 0 else req.output_len

    def window_start(self, end: int) -> int:
        """First position of the last window before ``end``, on a page boundary."""
        start = max(0, end - (self.config.window or 0))
        return start - start % self.config.page_size

    def make_room(self, full_tokens: int, swa_tokens: int, state_slots: int = 0) -> bool:
        """Evict (and with an arena take chunks) until each pool has the tokens (state: the
        slots) free; False if even that cannot. Without an arena the state slots are
        evicted for but not part of the answer (the caller checks its allocation)."""
        if self.arena is not None:
            return self._make_room_arena(Cost(full_tokens, swa_tokens, state_slots))
        alloc = self.allocator
        short_full = max(0, full_tokens - alloc.full_available)
        short_swa = max(0, swa_tokens - alloc.swa_available)
        if short_full or short_swa:
            self._evict(Cost(short_full, short_swa))
        if state_slots:
            self.tree.evict_states(state_slots - self.states.available)
        return full_tokens <= alloc.full_available and swa_tokens <= alloc.swa_available

    def _evict(self, amounts: Cost) -> None:
        """Evict ``amounts`` tokens of full KV and SWA KV, and state snapshots."""
        if amounts.full or amounts.swa:
            freed = self.tree.evict(EvictParams(full=amounts.full, swa=amounts.swa))
            self.counters["evicted_full_tokens"] += freed.full
            self.counters["evicted_swa_tokens"] += freed.swa
        if amounts.state:
            self.tree.evict_states(amounts.state)

    def _pool(self, pool: str) -> PagedAllocator | None:
        if pool == "state":
            return None if self.states is None else self.states.allocator
        return getattr(self.allocator, pool)

    def _free(self) -> Cost:
        """Each pool's free tokens (state: slots)."""
        state = self.states.available if self.states is not None else 0
        return Cost(self.allocator.full_available, self.allocator.swa_available, state)

    def _evictable(self) -> Cost:
        tree = self.tree
        state = 0 if self.states is None else tree.cached_states - tree.pinned_states
        return Cost(tree.evictable_full, tree.evictable_swa, state)

    def _make_room_arena(self, need: Cost) -> bool:
        """Arena ``make_room``: free chunks first (no eviction, no sync); then each short pool
        evicts its own cache, cheapest first, while chunks cannot cover the rest (what
        admission counted on: a grant always fits here); then, under pressure, the arena
        takes back wholly free chunks of the other pools, evicting their cache in growing
        rounds until the pools fit or nothing is left to evict."""
        if self._grant(need):
            return True
        for pool in EVICT_ORDER:
            short = max(0, getattr(need, pool) - getattr(self._free(), pool))
            amount = min(short, getattr(self._evictable(), pool))
            if amount:
                self._evict(Cost(**{pool: amount}))
                if self._grant(need):
                    return True
        rounds = 1
        while True:
            if self.arena.reclaim() and self._grant(need):
                return True
            if not self._evict_donors(need, rounds):
                return self._grant(need, partial=True)
            rounds *= 2

    def _grant(self, need: Cost, partial: bool = False) -> bool:
        """Give the pools short of ``need`` free chunks when they all fit (``partial``: as
        many as there are, pool by pool); whether every pool then has what it needs."""
        cfg, arena = self.config, self.arena
        free = self._free()
        short = chunks_short(cfg, free, need)
        if short is None or (short > arena.free_chunks and not partial):
            return False
        ps = cfg.page_size
        for pool in cfg.arena_pools:
            per_page = 1 if pool == "state" else ps
            lack = getattr(need, pool) - getattr(free, pool)
            if lack > 0:
                arena.grant(cfg.arena_pools.index(pool), -(-lack // per_page))
        free = self._free()
        return all(getattr(need, p) <= getattr(free, p) for p in ("full", "swa", "state"))

    def _evict_donors(self, need: Cost, rounds: int) -> bool:
        """Evict ``rounds`` chunks' worth of cache from each pool that is not short (its
        chunks may then empty out); False when that evicted nothing."""
        cfg, layout, free = self.config, self.arena.layout, self._free()
        evictable, amounts = self._evictable(), {}
        for i, pool in enumerate(cfg.arena_pools):
            if getattr(need, pool) > getattr(free, pool) and getattr(evictable, pool):
                continue  # its own eviction came first
            per_chunk = layout.min_pages_per_chunk(i) * (1 if pool == "state" else cfg.page_size)
            amounts[pool] = min(rounds * per_chunk, getattr(evictable, pool))
        if not any(amounts.values()):
            amounts = {p: getattr(evictable, p) for p in cfg.arena_pools}
            if not any(amounts.values()):
                return False
        self._evict(Cost(**amounts))
        return self._evictable() != evictable

    def relieve(self) -> bool:
        """Admission found no room: with an arena, take back the wholly free chunks of every
        pool (a sync, so only when the pools' free pages changed since the last relief), and
        when nothing runs (waiting would be forever) evict cache until a chunk comes free.
        Returns whether any rank freed a chunk (one collective under TP: the caller then
        retries admission on every rank)."""
        freed = 0
        if self.arena is not None:
            now = tuple(astuple(self._free()))
            if now != self._relieved_at:
                freed = self.arena.reclaim()
                self._relieved_at = now
            idle = not self.queues.running
            while idle and not freed and self._evict_donors(Cost(), 1):
                freed = self.arena.reclaim()
        return self.tp.reduce_min([-int(freed > 0)])[0] < 0
