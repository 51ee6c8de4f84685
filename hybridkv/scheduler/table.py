"""The request table: per-row state of every request that holds slots.

A row is a request's place in ``req_to_token`` (the engine's page table, on the device).
Its lengths and token ids live on the host in numpy arrays indexed by row, so a step
reads and advances a whole batch with a few array operations and never asks the device::

    pos:  0          cached_len        released       kv_len   alloc_len   fill_len
          |  the tree's (locked)  |  own, no SWA  |  own KV  | allocated |  ids only
                                  (SWA layers)

``tokens[row, :fill_len]`` are the prompt and every generated token; ``pin_start`` and
``pin_end`` mirror the request's tree lock (it pins the SWA KV of ``[pin_start, pin_end)``),
``state_slot`` its working recurrent state slot (-1: none).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from hybridkv.undo import UndoLog

if TYPE_CHECKING:
    from hybridkv.scheduler.records import ReqState
    from hybridkv.tree import LockHandle


# The per-row int64 fields, rows of one array (``_fields``) so that a step's undo log keeps
# them all with one copy. A step writes token ids only past a row's fill_len (or into a free
# row), which nobody reads until it completes, so ``tokens`` needs no keeping.
ROW_FIELDS = (
    "kv_len",
    "alloc_len",
    "cached_len",
    "released",
    "fill_len",
    "output_len",
    "max_new",
    "arrival",
    "pin_start",
    "pin_end",
    "state_slot",  # mirrors ReqState.state_slot (-1: none)
)


class RequestTable:
    """Rows, their device page-table rows and their host-side lengths and tokens.

    ``undo``: the manager's undo log; :meth:`begin_step` keeps the host state a step may
    change, and the methods that change a request or a row's KV slots keep those.
    """

    def __init__(
        self, rows: int, max_context: int, device: torch.device, undo: UndoLog | None = None
    ) -> None:
        self.rows = rows
        self.max_context = max_context
        self.device = device
        self.req_to_token = torch.zeros(rows, max_context, dtype=torch.int32, device=device)
        self.flat = self.req_to_token.view(-1)  # position p of row r is flat[r * max_context + p]
        self.tokens = np.zeros((rows, max_context), dtype=np.int64)
        self._fields = np.zeros((len(ROW_FIELDS), rows), dtype=np.int64)
        (
            self.kv_len,
            self.alloc_len,
            self.cached_len,
            self.released,
            self.fill_len,
            self.output_len,
            self.max_new,
            self.arrival,
            self.pin_start,
            self.pin_end,
            self.state_slot,
        ) = self._fields
        self.state_slot[:] = -1
        self.owner: list[ReqState | None] = [None] * rows
        self._free = list(range(rows - 1, -1, -1))
        self._undo = undo or UndoLog()

    def begin_step(self) -> None:
        """Keep what a step may change (it writes the per-row fields directly)."""
        self._undo.save(self._fields)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def take(self, req: ReqState, kv_len: int) -> int:
        """Give ``req`` a row holding its ids, ``kv_len`` positions of which have KV (its
        cached prefix); return the row."""
        self._undo.save(req, "row")
        self._undo.save(self, "owner", "_free")
        row = self._free.pop()
        ids = req.fill_ids
        self.tokens[row, : len(ids)] = ids
        self.fill_len[row] = len(ids)
        self.kv_len[row] = self.alloc_len[row] = kv_len
        self.cached_len[row] = self.released[row] = 0
        self.output_len[row] = req.output_len
        self.max_new[row] = req.max_new_tokens
        self.arrival[row] = req.arrival
        self.owner[row] = req
        req.row = row
        self.set_lock(req, req.lock)
        return row

    def give_back(self, req: ReqState) -> None:
        """Free ``req``'s row, leaving its ids and output count on the request."""
        self._undo.save(req)
        self._undo.save(self, "owner", "_free")
        row = req.row
        req.fill_ids = self.fill_ids(row)
        req.output_len = int(self.output_len[row])
        self.owner[row] = None
        self.state_slot[row] = -1
        self._free.append(row)
        req.row = -1

    def set_lock(self, req: ReqState, lock: LockHandle | None) -> None:
        """Set ``req.lock`` (and its mirror in the row, if it has one)."""
        # NOTE: the one field: saving every field copies the request's token list, and a
        # synchronised lock slide sets hundreds of locks in one step.
        self._undo.save(req, "lock")
        req.lock = lock
        if req.row >= 0 and lock is not None:
            self.pin_start[req.row] = lock.swa_start
            self.pin_end[req.row] = lock.node.end

    def set_state_slot(self, req: ReqState, slot: int) -> None:
        """Set ``req.state_slot`` and its mirror in the row."""
        self._undo.save(req, "state_slot")
        req.state_slot = slot
        if req.row >= 0:
            self.state_slot[req.row] = slot

    def repoint(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Point positions ``[start, start + len(slots))`` of ``row``, which have KV, at
        ``slots`` (the tree's copy of the same tokens)."""
        end = start + slots.numel()
        if self._undo.active:
            kept = self.req_to_token[row, start:end].clone()
            self._undo.on_undo(lambda: self.req_to_token[row, start:end].copy_(kept))
        self.req_to_token[row, start:end] = slots.to(torch.int32)

    def fill_ids(self, row: int, end: int | None = None) -> list[int]:
        """The ids of positions ``[0, end)`` of ``row`` (default: every id it has)."""
        return self.tokens[row, : self.fill_len[row] if end is None else end].tolist()

    def slots(self, row: int, start: int, end: int) -> torch.Tensor:
        """int64 full slots of positions ``[start, end)`` of ``row``."""
        return self.req_to_token[row, start:end].long()

    def flat_positions(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Indices into :attr:`flat` of ``(rows[i], positions[i])``."""
        return rows * self.max_context + positions
