"""Where every request is: waiting, running, or the one whose prefill is chunked."""

from __future__ import annotations

from collections import deque

import numpy as np

from hybridkv.scheduler.records import ReqState
from hybridkv.undo import UndoLog


class Queues:
    """Waiting requests (FIFO; a retracted one goes first), running ones (past their
    prefill, or on its last chunk; in the order they got there) and the chunked one.

    The running set is also kept as a row array and a rid list, rebuilt only when it
    changes, so a steady decode step reads its batch without a loop over requests.
    Change them through the methods (they keep what a step changes in ``undo``).
    """

    def __init__(self, undo: UndoLog | None = None) -> None:
        self.reqs: dict[str, ReqState] = {}
        self.waiting: deque[ReqState] = deque()
        self.chunked: ReqState | None = None
        self._running: dict[str, ReqState] = {}
        self._batch: tuple[np.ndarray, list[str]] | None = None
        self._undo = undo or UndoLog()

    @property
    def running(self) -> dict[str, ReqState]:
        """The running requests by rid (read only: use :meth:`start` / :meth:`stop`)."""
        return self._running

    def add(self, req: ReqState) -> None:
        """A new request: known by its rid, last in the waiting queue."""
        self._undo.save(self, "reqs", "waiting")
        self.reqs[req.rid] = req
        self.waiting.append(req)

    def forget(self, req: ReqState) -> None:
        """Drop a request that is in no queue (finished or aborted)."""
        self._undo.save(self, "reqs")
        del self.reqs[req.rid]

    def pop_waiting(self) -> ReqState:
        """Take the first waiting request out of the queue."""
        self._undo.save(self, "waiting")
        return self.waiting.popleft()

    def unwait(self, req: ReqState) -> None:
        """Take ``req`` out of the waiting queue, wherever it is."""
        self._undo.save(self, "waiting")
        self.waiting.remove(req)

    def requeue(self, req: ReqState) -> None:
        """Put a retracted request first in the waiting queue."""
        self._undo.save(self, "waiting")
        self.waiting.appendleft(req)

    def set_chunked(self, req: ReqState | None) -> None:
        self._undo.save(self, "chunked")
        self.chunked = req

    def start(self, req: ReqState) -> None:
        self._undo.save(self, "_running", "_batch")
        self._running[req.rid] = req
        self._batch = None

    def stop(self, req: ReqState) -> None:
        self._undo.save(self, "_running", "_batch")
        del self._running[req.rid]
        self._batch = None

    def running_batch(self) -> tuple[np.ndarray, list[str]]:
        """Rows (int64) and rids of the running requests, in order. Never mutate them."""
        if self._batch is None:
            reqs = self._running.values()
            rows = np.fromiter((r.row for r in reqs), dtype=np.int64, count=len(reqs))
            self._batch = rows, list(self._running)
        return self._batch

    def clear(self) -> None:
        self.reqs.clear()
        self.waiting.clear()
        self._running.clear()
        self.chunked = None
        self._batch = None
