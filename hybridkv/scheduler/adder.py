"""The prefill adder: which waiting requests (and how much of each) fit this step."""

from __future__ import annotations

from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.cost import NO_LOAD, Cost, chunks_short, cost, largest_chunk
from hybridkv.scheduler.records import Reservation


class PrefillAdder:
    """Admission budgets of one step, in the order requests are offered.

    Every pool must satisfy ``available + evictable >= reserved + admitted costs``; the
    full pool also holds back each admitted request's decode reservation. With an arena a
    pool may also take free chunks: what the pools lack beyond their own free + evictable
    must fit the free chunks, all pools together. Input tokens are capped by
    ``max_prefill_tokens`` and a chunk by ``chunked_prefill_size``.
    """

    def __init__(self, config: CacheConfig, reserved: Cost) -> None:
        self.config = config
        self.used = reserved
        self.input_left = config.max_prefill_tokens
        self.refused = False  # a request was offered and did not fit

    def admit(
        self,
        rooms: Cost,
        start: int,
        remaining: int,
        reserve: int,
        swa_held: int = 0,
        load: Cost = NO_LOAD,
        new: bool = False,
    ) -> Reservation | None:
        """What a request's next chunk may take now (``None``: defer it and stop adding).

        ``rooms``: each pool's available + evictable now (after locking the request's prefix);
        ``start``: the chunk's first position; ``remaining``: tokens it still has to compute;
        ``reserve``: full tokens held back for its decode; ``swa_held``: SWA KV it holds
        already (present, see :meth:`Admission.swa_held`); ``load``: what loading its prefix
        back from host takes (admitted with the first chunk or not at all); ``new``: its first
        chunk. The chunk is the whole remainder when that fits, else the largest page multiple
        that does. With recurrent layers a chunk also stops at the prompt's last page
        boundary, where the tree keeps its state. The reservation holds the chunk and its
        :func:`cost`: what the step's allocation and load back draw from.
        """
        cfg, ps = self.config, self.config.page_size
        chunk = min(remaining, cfg.chunked_prefill_size, self.input_left)
        if chunk < remaining:
            chunk -= chunk % ps
        boundary = (start + remaining) - (start + remaining) % ps
        if cfg.mamba_layer_ids and start < boundary < start + chunk:
            chunk = boundary - start
        if cfg.arena:
            return self._admit_arena(rooms, start, chunk, reserve, swa_held, load, new)
        full_left = rooms.full - self.used.full - reserve
        swa_left = rooms.swa - self.used.swa
        need = cost(cfg, chunk, swa_held, load, chunk_end=start + chunk, new=new)
        if chunk and (need.full > full_left or need.swa > swa_left):
            # NOTE: a chunk is shrunk, never given an unchecked budget: defer rather than
            # take the last page (the bug of chunked prefill that admits what cannot fit).
            room = largest_chunk(cfg, full_left, swa_left, swa_held, load)
            chunk = min(chunk - chunk % ps, room)
            need = cost(cfg, chunk, swa_held, load, chunk_end=start + chunk, new=new)
        if chunk <= 0 or need.state > rooms.state - self.used.state:
            self.refused = True
            return None
        self.used = self.used + need + Cost(full=reserve)
        self.input_left -= chunk
        return Reservation(chunk, need - load, load)

    def _admit_arena(
        self,
        rooms: Cost,
        start: int,
        chunk: int,
        reserve: int,
        swa_held: int,
        load: Cost,
        new: bool,
    ) -> Reservation | None:
        """:meth:`admit` with an arena: the largest chunk (the whole one, else a page
        multiple, by bisection: the cost grows with the chunk) whose pools, together with
        what is admitted already, lack no more than the free chunks."""
        cfg, ps = self.config, self.config.page_size

        def need(n: int) -> Cost:
            return cost(cfg, n, swa_held, load, chunk_end=start + n, new=new)

        def fits(n: int) -> bool:
            short = chunks_short(cfg, rooms, self.used + need(n) + Cost(full=reserve))
            return short is not None and short <= rooms.chunks

        if not (chunk and fits(chunk)):
            lo, hi = 0, chunk // ps  # pages: fits(lo * ps) or lo == 0
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits(mid * ps):
                    lo = mid
                else:
                    hi = mid - 1
            chunk = lo * ps
        if chunk <= 0:
            self.refused = True
            return None
        got = need(chunk)
        self.used = self.used + got + Cost(full=reserve)
        self.input_left -= chunk
        return Reservation(chunk, got - load, load)
