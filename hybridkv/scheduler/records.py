"""Plain records of the scheduler: a request's progress and a chunk admitted this step."""

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
    """A request's progress. Positions ``[0, kv_len)`` have KV, ``[0, alloc_len)`` slots
    (in ``req_to_token[row]``); ``[0, cached_len)`` are the tree's (locked by ``lock``)."""

    rid: str
    fill_ids: list[int]  # prompt, then every generated token
    output_len: int
    max_new_tokens: int
    arrival: int
    row: int = -1
    kv_len: int = 0
    alloc_len: int = 0
    cached_len: int = 0
    lock: LockHandle | None = None
    state_slot: int = -1  # working recurrent state (running requests of a mamba model)
    snapshot: tuple[int, int] | None = None  # (position, slot): its state at a page boundary

    @property
    def remaining_new_tokens(self) -> int:
        return self.max_new_tokens - self.output_len


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request's chunk admitted this step; ``match`` is its matched prefix if it is new,
    ``load`` what loading that prefix back from host takes."""

    req: ReqState
    chunk: int
    swa_held: int
    match: MatchResult | None = None
    load: Cost = NO_LOAD
    load_start: int = 0  # where its pin on host copies starts (unpin from there)

    @property
    def completes(self) -> bool:
        return self.req.kv_len + self.chunk == len(self.req.fill_ids)
