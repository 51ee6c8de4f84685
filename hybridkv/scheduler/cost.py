"""The one cost function: what admitting a chunk takes from each pool.

Admission budgets with it, allocation draws from what it granted (a reservation), and
a chunk of positions ``[start, end)`` (prefix loaded back from host, ``load``) is charged::

    full:  |<-- the pages of [start, end) the request does not have -->| + load.full
    swa:   |<-- max(held + load.swa + chunk, window), in pages -->|+1 page| - held
           (the window it slides over, loaded back or computed, and the page a decode
           step slides into; less what it holds already)
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridkv.scheduler.config import CacheConfig

# Decode reservations count at most this many future tokens per request, as SGLang does,
# so a huge max_new_tokens does not block admission forever.
CLIP_MAX_NEW_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class Cost:
    """Tokens taken from each pool; as rooms, also the arena's free chunks any pool may take."""

    full: int = 0
    swa: int = 0
    state: int = 0  # recurrent-state slots
    chunks: int = 0  # free arena chunks (rooms only)

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.full + other.full,
            self.swa + other.swa,
            self.state + other.state,
            self.chunks + other.chunks,
        )

    def __sub__(self, other: Cost) -> Cost:
        return Cost(
            self.full - other.full,
            self.swa - other.swa,
            self.state - other.state,
            self.chunks - other.chunks,
        )


NO_LOAD = Cost()


def _pages(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def cost(
    config: CacheConfig,
    chunk_len: int,
    swa_held: int = 0,
    load: Cost = NO_LOAD,
    *,
    chunk_end: int | None = None,
    new: bool = False,
) -> Cost:
    """What computing ``chunk_len`` new tokens of a request takes from each pool.

    Full: the pages of the chunk's positions ``[chunk_end - chunk_len, chunk_end)`` that the
    request does not have yet (a partial last page it owns is filled first; without
    ``chunk_end``, a chunk from position 0: the most any start takes), and the full KV of its
    matched prefix to load back from host (``load.full``).

    SWA: ``swa_held`` is what the request holds already (present SWA KV of its prefix's
    window that it pins, and its own not yet released; 0 when new). Its footprint grows to
    ``max(held + load.swa + chunk, window)`` and a page: the window's SWA loaded back from
    host counts as part of that window (charging it on top of a computed window charged it
    twice, and a window from host never fitted the smallest SWA pool). SGLang PR 27391
    forgot the SWA load back altogether and ran out after admitting.

    State (with recurrent layers): a working slot for a ``new`` request, a snapshot slot when
    the chunk ends on a page boundary (``chunk_end``), where the tree keeps its state, and
    ``load.state`` for a snapshot loaded back from host.
    """
    ps = config.page_size
    end = chunk_len if chunk_end is None else chunk_end
    full = (_pages(end, ps) - _pages(end - chunk_len, ps)) * ps + load.full
    state = 0
    if config.mamba_layer_ids:
        state = int(new) + int(chunk_end is not None and chunk_end % ps == 0) + load.state
    if config.window is None:
        return Cost(full, 0, state)
    footprint = _pages(max(swa_held + load.swa + chunk_len, config.window), ps) + 1
    return Cost(full, (footprint - _pages(swa_held, ps)) * ps, state)


def largest_chunk(
    config: CacheConfig, full_room: int, swa_room: int, swa_held: int = 0, load: Cost = NO_LOAD
) -> int:
    """The largest page-multiple chunk whose :func:`cost` fits the rooms (0 if none)."""
    ps = config.page_size
    chunk = (full_room - load.full) // ps * ps
    if config.window is not None:
        footprint_pages = swa_room // ps + _pages(swa_held, ps) - 1
        if footprint_pages < _pages(config.window, ps):
            return 0
        chunk = min(chunk, footprint_pages * ps - swa_held - load.swa)
    return max(chunk - chunk % ps, 0)


def chunks_short(config: CacheConfig, rooms: Cost, used: Cost) -> int | None:
    """The arena chunks that pools using ``used`` lack beyond their ``rooms`` (each pool's
    free + evictable), in whole chunks; ``None`` when a pool outside the arena is short."""
    layout, chunks = config.arena_layout, 0
    pools = config.arena_pools
    for pool in ("full", "swa", "state"):
        short = getattr(used, pool) - getattr(rooms, pool)
        if short <= 0:
            continue
        if pool not in pools:
            return None
        i = pools.index(pool)
        per_chunk = layout.min_pages_per_chunk(i) * (1 if pool == "state" else config.page_size)
        chunks += -(-short // per_chunk)
    return chunks


def decode_reserve(remaining_new_tokens: int, new_token_ratio: float) -> int:
    """Full tokens held back for a running request's future decode steps."""
    return int(min(remaining_new_tokens, CLIP_MAX_NEW_TOKENS) * new_token_ratio)


def swa_steady(config: CacheConfig) -> int:
    """SWA tokens a decoding request may hold at most: its window (at least a page) and a
    page, in whole pages; a running request below it may still grow to it."""
    if config.window is None:
        return 0
    return (_pages(max(config.window, config.page_size), config.page_size) + 1) * config.page_size
