"""Giving a request's KV and recurrent state to the tree: after a prefill chunk, on finish,
abort and retraction."""

from __future__ import annotations

import torch

from hybridkv.scheduler.records import (
    ReqState,
)
from hybridkv.tree import Node


class CachingMixin:
    """The caching part of :class:`MemoryManager` (its state, its helpers)."""

    def _cache_prefix(self, req: ReqState) -> None:
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

    def _release(self, req: ReqState, in_flight: bool = False) -> None:
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

    def _release_states(self, req: ReqState, node: Node, end: int, in_flight: bool) -> None:
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
