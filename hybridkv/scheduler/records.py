"""Plain records of the scheduler: a request and a chunk admitted this step."""

from __future__ import annotations

from dataclasses import dataclass

from hybridkv.scheduler.cost import NO_LOAD, Cost
from hybridkv.tree import LockHandle, MatchResult

# The decode reservation's new-token ratio: starts high, decays each decode step, and is
# reset on a retraction (as SGLang's scheduler does).
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001


@dataclass(slots=True, eq=False)
class ReqState:
    """A request. While it holds a row (``row >= 0``), its lengths and ids are the
    :class:`~hybridkv.scheduler.table.RequestTable`'s; ``fill_ids`` and ``output_len`` are
    what it had when it last gave its row back (or its prompt)."""

    rid: str
    fill_ids: list[int]  # prompt, then every generated token
    output_len: int
    max_new_tokens: int
    arrival: int
    row: int = -1
    lock: LockHandle | None = None  # the tree path it pins (its cached prefix)
    state_slot: int = -1  # working recurrent state (running requests of a mamba model)
    snapshot: tuple[int, int] | None = None  # (position, slot): its state at a page boundary
    prefetched: int = 0  # tokens its prefetches read from storage, not yet counted as hits

    @property
    def remaining_new_tokens(self) -> int:
        return self.max_new_tokens - self.output_len


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request's chunk ``[start, start + chunk)`` admitted this step; ``match`` is its
    matched prefix if it is new, ``load`` what loading that prefix back from host takes."""

    req: ReqState
    start: int
    chunk: int
    fill_len: int  # ids the request has: the chunk completes its prefill when it ends there
    swa_held: int
    match: MatchResult | None = None
    load: Cost = NO_LOAD
    load_start: int = 0  # where its pin on host copies starts (unpin from there)

    @property
    def completes(self) -> bool:
        return self.start + self.chunk == self.fill_len
