"""The caching path: a request's KV and recurrent state go to the tree after a prefill
chunk, and on finish, abort and retraction."""

from __future__ import annotations

import torch

from hybridkv.allocator import StatePool, SWAAllocator
from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.records import ReqState
from hybridkv.scheduler.table import RequestTable
from hybridkv.tree import Node, RadixTree
from hybridkv.undo import UndoLog


class Caching:
    """Inserts requests' whole pages into the tree and moves their locks onto them."""

    def __init__(
        self,
        config: CacheConfig,
        table: RequestTable,
        tree: RadixTree,
        allocator: SWAAllocator,
        states: StatePool | None,
        undo: UndoLog,
    ) -> None:
        self.config = config
        self.undo = undo
        self.table = table
        self.tree = tree
        self.allocator = allocator
        self.states = states
        self.in_flight_states: list[int] = []  # working slots of aborted in-flight requests

    def cache_prefix(self, req: ReqState) -> None:
        """Give the whole pages of a prefilled chunk to the tree and lock them instead.

        Other requests can share the prompt from now on, and the tree (not the request's
        sliding window) decides when its SWA KV goes. Where the tree already held the tokens,
        the request's duplicates are freed and its row points at the tree's slots.
        """
        t, row, ps = self.table, req.row, self.config.page_size
        kv_len, cached = int(t.kv_len[row]), int(t.cached_len[row])
        aligned = kv_len - kv_len % ps
        if aligned <= cached:
            return
        released = int(t.released[row])
        node, slots = self.tree.insert(
            t.fill_ids(row, aligned), t.slots(row, 0, aligned), cached, max(released, cached)
        )
        t.repoint(row, cached, slots[cached:])
        lock = self.tree.inc_lock(node)
        assert req.lock is not None
        self.tree.dec_lock(req.lock)
        t.set_lock(req, lock)
        t.cached_len[row] = aligned
        t.released[row] = max(released, aligned)
        if self.states is not None and kv_len == aligned:
            self.tree.attach_state(node, req.state_slot)

    def release(self, req: ReqState, in_flight: bool = False) -> None:
        """Give a request's KV to the tree (whole pages), free the rest, unlock, free its row.

        ``in_flight``: the request is in the pending plan (aborted before commit), so the
        engine may be writing its working state slot now.
        """
        t, row, ps = self.table, req.row, self.config.page_size
        kv_len, cached = int(t.kv_len[row]), int(t.cached_len[row])
        aligned = kv_len - kv_len % ps
        slots = t.slots(row, 0, int(t.alloc_len[row]))
        released = int(t.released[row]) if self.config.window is not None else 0
        node = req.lock.node
        with self.allocator.free_group():
            if aligned > cached:
                node, _ = self.tree.insert(
                    t.fill_ids(row, aligned), slots[:aligned], cached, released
                )
            self.allocator.free(slots[max(aligned, cached) :])
        if self.states is not None:
            self._release_states(req, node, aligned, kv_len, in_flight)
        assert req.lock is not None
        self.tree.dec_lock(req.lock)
        t.set_lock(req, None)
        t.give_back(req)

    def _release_states(
        self, req: ReqState, node: Node, end: int, kv_len: int, in_flight: bool
    ) -> None:
        """Leave the state after ``end`` tokens to ``node`` (ending there) if the request has
        it, and free its working and snapshot slots.

        NOTE: an in-flight request's working slot may hold the state before or after the
        engine's forward of the pending step: it is neither snapshotted nor reused until
        the plan is committed.
        """
        working, snapshot = req.state_slot, req.snapshot
        self.undo.save(req, "state_slot", "snapshot")
        req.state_slot, req.snapshot = -1, None
        free, attached = [], False
        if in_flight:
            self.in_flight_states.append(working)
        elif kv_len == end:
            attached = self.tree.attach_state(node, working, owned=True)  # hands it over
        else:
            free.append(working)
        if snapshot is not None:
            if snapshot[0] == end and not attached:
                self.tree.attach_state(node, snapshot[1], owned=True)
            else:
                free.append(snapshot[1])
        if free:
            self.states.allocator.free_pages(torch.tensor(free, device=self.states.device))

    def free_in_flight_states(self) -> None:
        """Free the working slots of requests aborted while their plan was pending."""
        if self.in_flight_states:
            device = self.states.device
            self.states.allocator.free_pages(torch.tensor(self.in_flight_states, device=device))
            self.in_flight_states = []

    def take_snapshots(self, reqs: list[ReqState]) -> None:
        """Copy decoding requests' states at a page boundary into their snapshot slots (one
        copy): the tree keeps it when the request is cached. Best effort: a request that
        cannot get a slot keeps none (snapshots are a cache)."""
        src, dst = [], []
        for req in reqs:
            slot = req.snapshot[1] if req.snapshot is not None else self.tree.alloc_state()
            if slot is None:
                continue
            self.undo.save(req, "snapshot")
            req.snapshot = (int(self.table.kv_len[req.row]), slot)
            src.append(req.state_slot)
            dst.append(slot)
        if src:
            device = self.states.device
            self.states.copy(torch.tensor(src, device=device), torch.tensor(dst, device=device))
