"""The one cost function: what admitting a chunk takes from each pool.

Admission budgets with it, and allocation asserts it never takes more than it::

    full:  |<-- chunk, rounded up to pages -->|+1 page|   (the page alloc_extend may fill)
    swa:   |<-- max(chunk, window), in pages -->|+1 page|   (what the request holds while it
                                                            slides: the window and a page)
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridkv.scheduler.config import CacheConfig

# Decode reservations count at most this many future tokens per request, as SGLang does,
# so a huge max_new_tokens does not block admission forever.
CLIP_MAX_NEW_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class Cost:
    """Tokens taken from each pool."""

    full: int = 0
    swa: int = 0
    state: int = 0  # recurrent-state slots

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.full + other.full, self.swa + other.swa, self.state + other.state)


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

    ``swa_held``: SWA tokens the request holds already (after its release; 0 when new).
    Its SWA footprint grows to ``max(held + chunk, window)`` plus a page, of which it holds
    ``held`` (in whole pages) already. ``load``: the full, SWA and state of its matched prefix
    to load back from host (SGLang PR 27391 forgot the SWA part and ran out after admitting).
    With recurrent layers: a working state slot for a ``new`` request, and a snapshot slot
    when the chunk ends on a page boundary (``chunk_end``), where the tree keeps its state.
    """
    ps = config.page_size
    full = (_pages(chunk_len, ps) + 1) * ps + load.full
    state = 0
    if config.mamba_layer_ids:
        state = int(new) + int(chunk_end is not None and chunk_end % ps == 0) + load.state
    if config.window is None:
        return Cost(full, 0, state)
    footprint = _pages(max(swa_held + chunk_len, config.window), ps) + 1
    return Cost(full, (footprint - _pages(swa_held, ps)) * ps + load.swa, state)


def largest_chunk(config: CacheConfig, full_room: int, swa_room: int, swa_held: int = 0) -> int:
    """The largest page-multiple chunk whose :func:`cost` fits the rooms (0 if none)."""
    ps = config.page_size
    chunk = (full_room // ps - 1) * ps
    if config.window is not None:
        footprint_pages = swa_room // ps + _pages(swa_held, ps) - 1
        if footprint_pages < _pages(config.window, ps):
            return 0
        chunk = min(chunk, footprint_pages * ps - swa_held)
    return max(chunk - chunk % ps, 0)


def decode_reserve(remaining_new_tokens: int, new_token_ratio: float) -> int:
    """Full tokens held back for a running request's future decode steps."""
    return int(min(remaining_new_tokens, CLIP_MAX_NEW_TOKENS) * new_token_ratio)


def swa_steady(config: CacheConfig) -> int:
    """SWA tokens a decoding request may hold at most: its window (at least a page) and a
    page, in whole pages; a running request below it may still grow to it."""
    if config.window is None:
        return 0
    return (_pages(max(config.window, config.page_size), config.page_size) + 1) * config.page_size
