"""The prefill adder: which waiting requests (and how much of each) fit this step."""

from __future__ import annotations

from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.cost import NO_LOAD, Cost, cost, largest_chunk


class PrefillAdder:
    """Admission budgets of one step, in the order requests are offered.

    Every pool must satisfy ``available + evictable >= reserved + admitted costs``; the
    full pool also holds back each admitted request's decode reservation. Input tokens
    are capped by ``max_prefill_tokens`` and a chunk by ``chunked_prefill_size``.
    """

    def __init__(self, config: CacheConfig, reserved: Cost) -> None:
        self.config = config
        self.used = reserved
        self.input_left = config.max_prefill_tokens

    def admit(
        self,
        full_room: int,
        swa_room: int,
        remaining: int,
        reserve: int,
        swa_held: int = 0,
        load: Cost = NO_LOAD,
    ) -> int:
        """Tokens of a request's next chunk to compute now (0: defer it and stop adding).

        ``full_room`` / ``swa_room``: each pool's available + evictable tokens now (after
        locking the request's prefix); ``remaining``: tokens it still has to compute;
        ``reserve``: full tokens held back for its decode; ``swa_held``: SWA tokens it holds
        already (a continuing chunked request); ``load``: what loading its prefix back from
        host takes (admitted with the first chunk or not at all). The chunk is the whole
        remainder when that fits, else the largest page multiple that does.
        """
        ps = self.config.page_size
        chunk = min(remaining, self.config.chunked_prefill_size, self.input_left)
        if chunk < remaining:
            chunk -= chunk % ps
        full_left = full_room - self.used.full - reserve
        swa_left = swa_room - self.used.swa
        need = cost(self.config, chunk, swa_held, load)
        if chunk and (need.full > full_left or need.swa > swa_left):
            # NOTE: a chunk is shrunk, never given an unchecked budget: defer rather than
            # take the last page (the bug of chunked prefill that admits what cannot fit).
            room = largest_chunk(self.config, full_left - load.full, swa_left - load.swa, swa_held)
            chunk = min(chunk - chunk % ps, room)
            need = cost(self.config, chunk, swa_held, load)
        if chunk <= 0:
            return 0
        self.used = self.used + need + Cost(full=reserve)
        self.input_left -= chunk
        return chunk
