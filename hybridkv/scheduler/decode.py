"""Decode steps: one slot per running request, SWA release, retraction when short."""

from __future__ import annotations

import torch

from hybridkv import kernels
from hybridkv.scheduler.plan import ScheduledReq, StepPlan
from hybridkv.scheduler.records import (
    INIT_NEW_TOKEN_RATIO,
    MIN_NEW_TOKEN_RATIO,
    NEW_TOKEN_RATIO_DECAY,
    ReqState,
)


class DecodeMixin:
    """The decode half of :class:`MemoryManager` (its state, its helpers)."""

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

    def _release_swa(self, reqs: list[ReqState]) -> None:
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

    def _retract(self, req: ReqState) -> None:
        """Cache a running request's KV in the tree, free its slots and re-queue it first."""
        self._release(req)
        req.kv_len = req.alloc_len = req.cached_len = 0
        self._waiting.appendleft(req)
        self.counters["retracted_requests"] += 1
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    def _take_snapshots(self, reqs: list[ReqState]) -> None:
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
