"""Decode steps: one slot per running request, SWA release, retraction when short.

A steady step (nothing to evict or retract) is array arithmetic on the host and a fixed
handful of device calls whatever the batch size: the SWA release, one ``alloc_decode`` per
pool, one write into ``req_to_token`` and one page table per pool. It never waits for the
device, and its commit advances the batch with array operations too.
"""

from __future__ import annotations

import numpy as np

from hybridkv.allocator import StatePool, SWAAllocator
from hybridkv.scheduler.admission import Admission
from hybridkv.scheduler.caching import Caching
from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.pages import PlanBuilder
from hybridkv.scheduler.plan import StepBatch, StepPlan
from hybridkv.scheduler.queues import Queues
from hybridkv.scheduler.records import ReqState
from hybridkv.scheduler.swa_slide import SWASlide
from hybridkv.scheduler.table import RequestTable


class Decode:
    """Plans and commits decode steps of every running request."""

    def __init__(
        self,
        config: CacheConfig,
        table: RequestTable,
        queues: Queues,
        allocator: SWAAllocator,
        states: StatePool | None,
        admission: Admission,
        caching: Caching,
        slide: SWASlide,
        pages: PlanBuilder,
        counters: dict[str, int],
    ) -> None:
        self.config = config
        self.table = table
        self.queues = queues
        self.allocator = allocator
        self.states = states
        self.admission = admission
        self.caching = caching
        self.slide = slide
        self.pages = pages
        self.counters = counters
        self._constant_arrays: tuple[np.ndarray, ...] = ()

    def schedule(self) -> StepPlan | None:
        q, t, ps = self.queues, self.table, self.config.page_size
        if not q.running:
            return None
        rows, rids = q.running_batch()
        self.slide.release(rows)
        while True:
            kv = t.kv_len[rows]
            new_pages = int(np.count_nonzero(kv % ps == 0))
            need = new_pages * ps
            if self.admission.make_room(need, need if self.config.has_swa else 0):
                break
            # NOTE: a lone request always fits (add_request and CacheConfig check it).
            if q.chunked is not None:
                victim = q.chunked
                q.set_chunked(None)
            else:
                assert len(rows) > 1, "a single running request does not fit the pools"
                # least output first, then the latest arrival
                i = np.lexsort((-t.arrival[rows], t.output_len[rows]))[0]
                victim = t.owner[int(rows[i])]
                q.stop(victim)
                rows, rids = q.running_batch()
            self.retract(victim)
        ones, zeros, indptr, produces, no_states = self._constants(len(rows))
        batch = StepBatch(
            rids=rids,
            rows=rows,
            extend_starts=kv,
            extend_lens=ones,
            qo_indptr=indptr,
            is_decode=True,
            produces_token=produces,
            cached_lens=zeros,
            loaded_lens=zeros,
            state_slots=no_states if self.states is None else t.state_slot[rows],
        )
        last = t.flat_positions(rows, kv - 1)
        inputs = self.pages.inputs(batch, last)
        (last_dev,) = inputs.extra
        last_loc = t.flat.index_select(0, last_dev).long()
        out = self.allocator.alloc_decode(kv + 1, last_loc, inputs.seq_lens, new_pages)
        assert out is not None, "decode batch does not fit after eviction"
        t.flat.index_copy_(0, last_dev + 1, out.int())
        t.alloc_len[rows] = kv + 1
        self.admission.decay()
        return self.pages.build(batch, out, inputs)

    def _constants(self, n: int) -> tuple[np.ndarray, ...]:
        """Per-request arrays every decode batch of ``n`` shares (never mutated): ones, zeros,
        ``qo_indptr``, the produces-a-token flags and the no-state slots (-1)."""
        if not self._constant_arrays or self._constant_arrays[0].shape[0] != n:
            arrays = (
                np.ones(n, dtype=np.int64),
                np.zeros(n, dtype=np.int64),
                np.arange(n + 1, dtype=np.int64),
                np.ones(n, dtype=bool),
                np.full(n, -1, dtype=np.int64),
            )
            self._constant_arrays = arrays
        return self._constant_arrays

    def commit(self, batch: StepBatch, ids: np.ndarray, gone: set[int]) -> list[ReqState]:
        """Advance every request of a decode ``batch`` by its token; return those finished.

        ``gone``: rows of requests aborted since the plan (skipped).
        """
        t, rows = self.table, batch.rows
        if gone:
            keep = ~np.isin(rows, list(gone))
            rows, ids = rows[keep], ids[keep]
        kv = t.kv_len[rows] + 1
        t.kv_len[rows] = kv
        t.tokens[rows, t.fill_len[rows]] = ids
        t.fill_len[rows] += 1
        t.output_len[rows] += 1
        self.counters["computed_tokens"] += len(rows)
        if self.states is not None:
            boundary = rows[kv % self.config.page_size == 0]
            if len(boundary):
                self.caching.take_snapshots([t.owner[r] for r in boundary.tolist()])
        done = rows[t.output_len[rows] >= t.max_new[rows]]
        return [t.owner[r] for r in done.tolist()]

    def retract(self, req: ReqState) -> None:
        """Cache a running request's KV in the tree, free its slots and re-queue it first."""
        self.caching.release(req)
        self.queues.requeue(req)
        self.counters["retracted_requests"] += 1
        self.admission.reset()
