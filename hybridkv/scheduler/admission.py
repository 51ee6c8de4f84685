"""The admission policy's state and figures: rooms, reservations, eviction on demand."""

from __future__ import annotations

import numpy as np

from hybridkv.allocator import StatePool, SWAAllocator
from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.cost import CLIP_MAX_NEW_TOKENS, Cost, decode_reserve, swa_steady
from hybridkv.scheduler.queues import Queues
from hybridkv.scheduler.records import (
    INIT_NEW_TOKEN_RATIO,
    MIN_NEW_TOKEN_RATIO,
    NEW_TOKEN_RATIO_DECAY,
    ReqState,
)
from hybridkv.scheduler.table import RequestTable
from hybridkv.tree import EvictParams, RadixTree


class Admission:
    """What each pool can still give (free + evictable), what running decodes hold back
    (the new-token ratio), and eviction when a step needs the room."""

    def __init__(
        self,
        config: CacheConfig,
        table: RequestTable,
        queues: Queues,
        tree: RadixTree,
        allocator: SWAAllocator,
        states: StatePool | None,
        counters: dict[str, int],
    ) -> None:
        self.config = config
        self.table = table
        self.queues = queues
        self.tree = tree
        self.allocator = allocator
        self.states = states
        self.counters = counters
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

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
        return Cost(
            alloc.full_available + tree.evictable_full,
            alloc.swa_available + tree.evictable_swa,
            state,
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

    def make_room(self, full_tokens: int, swa_tokens: int) -> bool:
        """Evict until each pool has the tokens free; False if even eviction cannot."""
        alloc = self.allocator
        short_full = max(0, full_tokens - alloc.full_available)
        short_swa = max(0, swa_tokens - alloc.swa_available)
        if short_full or short_swa:
            freed = self.tree.evict(EvictParams(full=short_full, swa=short_swa))
            self.counters["evicted_full_tokens"] += freed.full
            self.counters["evicted_swa_tokens"] += freed.swa
        return full_tokens <= alloc.full_available and swa_tokens <= alloc.swa_available
