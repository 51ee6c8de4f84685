"""Sliding windows moving forward: SWA release and the lock slide, for a batch of rows.

As a request's window moves past positions, their SWA KV is never read again::

    pos:  0        pin_start      pin_end (cached prefix)          kv_len
          | tree's, unpinned | tree's, pinned |  own: released  | kept (>= window) |

Its own pages before the window go back to the SWA pool (one ``swa_release`` call for the
batch), and its lock stops pinning the cached prefix's SWA behind the window, in steps of
``swa_lock_step`` (so the tree may tombstone it). Both are decided on host lengths: the rows
that move are found with array operations, and only those are touched.
"""

from __future__ import annotations

import numpy as np

from hybridkv.allocator import SWAAllocator
from hybridkv.allocator.upload import upload_many
from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.table import RequestTable
from hybridkv.tree import RadixTree


class SWASlide:
    """Frees what slid out of the windows of a batch of rows and slides their locks."""

    def __init__(
        self, config: CacheConfig, table: RequestTable, tree: RadixTree, allocator: SWAAllocator
    ) -> None:
        self.config = config
        self.table = table
        self.tree = tree
        self.allocator = allocator

    def release(self, rows: np.ndarray) -> None:
        """Release and slide for ``rows`` at their current ``kv_len`` (no-op without SWA)."""
        cfg = self.config
        if cfg.window is None or not len(rows):
            return
        t, ps = self.table, cfg.page_size
        keep = max(cfg.window, ps)
        kv = t.kv_len[rows]
        released = t.released[rows]
        frontier = np.maximum(kv - keep, 0) // ps * ps
        new = np.maximum(released, frontier)
        moving = np.flatnonzero(new > released)
        if len(moving):
            moved = rows[moving]
            rows_dev, seq_dev, released_dev = upload_many(
                t.device, moved, kv[moving], released[moving]
            )
            self.allocator.swa_release(
                t.req_to_token,
                rows_dev,
                seq_dev,
                released_dev,
                cfg.window,
                num_freed=int((new[moving] - released[moving]).sum()) // ps,
            )
            t.released[moved] = new[moving]
        self._slide_locks(rows, kv)

    def _slide_locks(self, rows: np.ndarray, kv: np.ndarray) -> None:
        """Move the SWA pin of each row whose window slid a lock step past it (or past the
        whole cached prefix)."""
        t, ps = self.table, self.config.page_size
        start, end = t.pin_start[rows], t.pin_end[rows]
        frontier = np.maximum(kv - max(self.config.window, ps), 0)
        frontier = np.minimum(frontier - frontier % ps, end)
        move = (start < end) & (start < frontier)
        move &= (frontier == end) | (frontier - start >= self.config.swa_lock_step)
        moving = np.flatnonzero(move)
        if not len(moving):
            return
        # NOTE: the requests' windows slide over their cached prefixes: stop pinning the
        # prefixes' SWA KV behind them (the tree may tombstone it), as their own is released.
        reqs = [t.owner[r] for r in rows[moving].tolist()]
        handles = self.tree.slide_swa_locks([r.lock for r in reqs], frontier[moving].tolist())
        for req, handle in zip(reqs, handles, strict=True):
            t.set_lock(req, handle)
