"""Plain records of the scheduler: a request, what admission granted it, a chunk admitted."""

from __future__ import annotations

from dataclasses import dataclass

from hybridkv.errors import CheckError
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


@dataclass(slots=True, eq=False)
class Reservation:
    """What admission granted a request this step: a chunk of ``chunk`` tokens and, per pool
    (full and SWA tokens, state slots), the slots its new tokens may take (``compute``: its
    chunk's pages, working and snapshot state) and those loading its matched prefix back from
    host may take (``load``). Together they are its :func:`~hybridkv.scheduler.cost.cost`.

    The step's allocation and load-back paths draw what they take (:meth:`draw`,
    :meth:`draw_load`); taking more than granted is a bug in hybridkv and raises
    :class:`~hybridkv.errors.CheckError`. The chunk's pages and the working state slot are
    drawn before the pools are touched; the load back (one copy for the batch, so what a
    request's share is shows only once it is done) right after it. What is left undrawn
    when the step is planned lapses: the SWA window a request still grows into while it
    decodes (later steps hold it back for running requests) and the snapshot slot its
    commit may take (a cache, taken best effort).
    """

    chunk: int
    compute: Cost
    load: Cost = NO_LOAD
    drawn: Cost = NO_LOAD  # taken from ``compute`` so far
    loaded: Cost = NO_LOAD  # taken from ``load`` so far

    def draw(self, taken: Cost, what: str) -> None:
        """Take ``taken`` from the compute grant; ``what`` names the taker in the error."""
        self.drawn = _within(self.drawn + taken, self.compute, what)

    def draw_load(self, taken: Cost, what: str) -> None:
        """Take ``taken`` from the load-back grant."""
        self.loaded = _within(self.loaded + taken, self.load, what)


def _within(total: Cost, granted: Cost, what: str) -> Cost:
    for pool in ("full", "swa", "state"):
        if getattr(total, pool) > getattr(granted, pool):
            raise CheckError(
                f"{what} takes {getattr(total, pool)} {pool}, more than admission reserved "
                f"({getattr(granted, pool)})"
            )
    return total


def prefix_load(match: MatchResult) -> Cost:
    """What loading a matched prefix back from host takes from the device pools: its host-only
    full KV, its last window's SWA KV not on the device, and its snapshot if only on host."""
    return Cost(match.host_hit_length, match.swa_host_hit_length, int(match.state_from_host))


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request's chunk ``[start, start + chunk)`` admitted this step with ``reservation``;
    ``match`` is its matched prefix if it is new, ``load`` what loading that back from host
    takes (its :func:`prefix_load` when admitted: a later match may split the match's nodes)."""

    req: ReqState
    start: int
    fill_len: int  # ids the request has: the chunk completes its prefill when it ends there
    reservation: Reservation
    match: MatchResult | None = None
    load: Cost = NO_LOAD
    load_start: int = 0  # where its pin on host copies starts (unpin from there)

    @property
    def chunk(self) -> int:
        return self.reservation.chunk

    @property
    def completes(self) -> bool:
        return self.start + self.chunk == self.fill_len
