"""One device byte arena shared by the full, SWA and state pools, in chunks that migrate.

The arena is one ``uint8`` tensor of ``num_chunks * chunk_bytes`` bytes. Each pool sees the
whole arena with its own page stride ``B`` (page ``p`` at bytes ``[p * B, (p + 1) * B)``), so
its buffer is a page-major view of the arena and its page ids are plain indices of it.
Chunk ``c`` (bytes ``[c * C, (c + 1) * C)``) gives the pool that owns it the pages lying
wholly inside it. Chunk 0 is reserved: it holds every pool's page 0 (padding writes).

Ownership lives on the host (one small numpy array): granting a chunk to a pool appends its
pages to the pool's free stack (host-computed, no sync); taking chunks back from a pool reads
its free stack (a sync), which only happens under pressure (a step that must evict or
retract anyway), never on a steady decode step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hybridkv.allocator.paged import PagedAllocator
from hybridkv.errors import ensure
from hybridkv.undo import UndoLog

FREE = -1  # chunk owner: nobody
RESERVED = -2  # chunk 0: every pool's padding page

# The chunk is the LCM of the pools' page bytes when that is at most this many of the
# largest page, else this many largest pages (waste below one page per pool and chunk).
MAX_CHUNK_PAGES = 4


@dataclass(frozen=True)
class ArenaLayout:
    """The arena's geometry: chunk size and count, and each pool's page bytes (in the
    order of ``pools``, the pool indices the arena's owners name)."""

    chunk_bytes: int
    num_chunks: int
    page_bytes: tuple[int, ...]

    @classmethod
    def plan(cls, memory_bytes: int, page_bytes: tuple[int, ...]) -> ArenaLayout:
        """The layout of ``memory_bytes`` (rounded down to whole chunks) for pools of
        ``page_bytes`` bytes per page (all positive)."""
        largest = max(page_bytes)
        lcm = math.lcm(*page_bytes)
        chunk = lcm if lcm <= MAX_CHUNK_PAGES * largest else MAX_CHUNK_PAGES * largest
        return cls(chunk, memory_bytes // chunk, tuple(page_bytes))

    @property
    def total_bytes(self) -> int:
        return self.chunk_bytes * self.num_chunks

    def capacity(self, pool: int) -> int:
        """Pages of ``pool``'s view of the whole arena (page 0 included)."""
        return self.total_bytes // self.page_bytes[pool]

    def pages_in(self, pool: int, chunk: int) -> tuple[int, int]:
        """``[first, end)``: the pages of ``pool`` lying wholly inside ``chunk``."""
        b, c = self.page_bytes[pool], self.chunk_bytes
        return -(-chunk * c // b), (chunk + 1) * c // b

    def min_pages_per_chunk(self, pool: int) -> int:
        """The fewest pages of ``pool`` any chunk but chunk 0 holds."""
        b, c = self.page_bytes[pool], self.chunk_bytes
        return c // b if c % b == 0 else c // b - 1

    def chunks_of(self, pool: int, pages: np.ndarray) -> np.ndarray:
        """The chunk holding each page (pages wholly inside a chunk)."""
        return pages * self.page_bytes[pool] // self.chunk_bytes


class Arena:
    """The arena's bytes and who owns each chunk; pools attach their allocators.

    Args:
        layout: the geometry (:meth:`ArenaLayout.plan`).
        device: where the bytes live.
        undo: the undo log of the steps that change ownership.
    """

    def __init__(self, layout: ArenaLayout, device: torch.device, undo: UndoLog) -> None:
        ensure(layout.num_chunks >= 2, "an arena needs a reserved chunk and one more")
        self.layout = layout
        self.device = torch.device(device)
        self.buf = torch.zeros(layout.total_bytes, dtype=torch.uint8, device=self.device)
        self.owner = np.full(layout.num_chunks, FREE, dtype=np.int8)
        self.owner[0] = RESERVED
        self.pools: list[PagedAllocator | None] = [None] * len(layout.page_bytes)
        self._undo = undo

    def view(self, pool: int, dtype: torch.dtype, page_shape: tuple[int, ...]) -> torch.Tensor:
        """``pool``'s page-major view ``[capacity, *page_shape]`` of the whole arena."""
        pages = self.layout.capacity(pool)
        flat = self.buf[: pages * self.layout.page_bytes[pool]].view(dtype)
        return flat.view(pages, *page_shape)

    def attach(self, pool: int, allocator: PagedAllocator) -> None:
        """``allocator`` hands out ``pool``'s pages (its free stack starts empty)."""
        self.pools[pool] = allocator

    @property
    def free_chunks(self) -> int:
        return int(np.count_nonzero(self.owner == FREE))

    def owned_chunks(self, pool: int) -> int:
        return int(np.count_nonzero(self.owner == pool))

    def owned_pages(self, pool: int) -> int:
        """Pages of ``pool``'s chunks (free or allocated)."""
        return self.pools[pool].owned_pages

    def grant(self, pool: int, pages: int) -> int:
        """Give ``pool`` free chunks until it gained ``pages`` pages or none is left; returns
        the pages it gained. Host work and one upload: no sync."""
        if pages <= 0:
            return 0
        free = np.flatnonzero(self.owner == FREE)
        b, c = self.layout.page_bytes[pool], self.layout.chunk_bytes
        firsts, ends = -(-free * c // b), (free + 1) * c // b
        counts = ends - firsts
        # the fewest free chunks (lowest first) whose pages reach ``pages``
        take = int(np.searchsorted(np.cumsum(counts), pages)) + 1
        chunks, firsts, counts = free[:take], firsts[:take], counts[:take]
        if not chunks.size:
            return 0
        self._undo.save(self, "owner")
        self.owner[chunks] = pool
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        self.pools[pool].add_pages(np.repeat(firsts, counts) + offsets)
        return int(counts.sum())

    def reclaim(self, keep: int | None = None) -> int:
        """Take back every wholly free chunk of the pools but ``keep``; returns how many.

        Reads the donors' free stacks (a sync: only under pressure) and reorders what stays
        free so the pages of their emptiest chunks are handed out last (they empty out).
        """
        reclaimed = 0
        for pool, alloc in enumerate(self.pools):
            if alloc is None or pool == keep or not self.owned_chunks(pool):
                continue
            free = alloc.free_pages_view().cpu().numpy()
            chunks = self.layout.chunks_of(pool, free)
            counts = np.bincount(chunks, minlength=self.layout.num_chunks)
            firsts, ends = np.array(
                [self.layout.pages_in(pool, c) for c in range(self.layout.num_chunks)]
            ).T
            whole = (counts == ends - firsts) & (self.owner == pool)
            if not whole.any():
                alloc.reorder_free(free[np.argsort(counts[chunks], kind="stable")])
                continue
            stays = ~whole[chunks]
            kept = free[stays]
            alloc.reorder_free(kept[np.argsort(counts[chunks[stays]], kind="stable")])
            for chunk in np.flatnonzero(whole).tolist():
                self._set_owner(chunk, FREE)
                reclaimed += 1
        return reclaimed

    def _set_owner(self, chunk: int, owner: int) -> None:
        self._undo.save(self, "owner")
        self.owner[chunk] = owner

    def check(self) -> None:
        """Raise :class:`~hybridkv.errors.CheckError` unless every chunk has one owner (free,
        reserved or a pool), each pool owns exactly the pages of its chunks, and its free
        pages lie in them."""
        layout = self.layout
        ensure(self.owner[0] == RESERVED, "chunk 0 is not reserved")
        valid = (self.owner >= FREE) & (self.owner < len(self.pools))
        ensure(bool(valid[1:].all()), "a chunk has no valid owner")
        owned_bytes = 0
        for pool, alloc in enumerate(self.pools):
            if alloc is None:
                ensure(not (self.owner == pool).any(), "a chunk owned by a pool not attached")
                continue
            chunks = np.flatnonzero(self.owner == pool)
            owned_bytes += chunks.size * layout.chunk_bytes
            pages = sum(end - first for first, end in (layout.pages_in(pool, c) for c in chunks))
            ensure(alloc.owned_pages == pages, f"pool {pool} owns pages of chunks it lacks")
            free = alloc.free_pages_view().cpu().numpy()
            if free.size:
                ensure(
                    bool((self.owner[layout.chunks_of(pool, free)] == pool).all()),
                    f"pool {pool} has a free page in a chunk it does not own",
                )
        free_bytes = (self.owner == FREE).sum() * layout.chunk_bytes
        ensure(
            owned_bytes + free_bytes + layout.chunk_bytes == layout.total_bytes,
            "the chunks' bytes do not sum to the arena",
        )

    def owned_page_mask(self, pool: int) -> torch.Tensor:
        """Bool ``[capacity]``: the pages of ``pool``'s chunks (for checks)."""
        layout = self.layout
        mask = np.zeros(layout.capacity(pool), dtype=bool)
        for chunk in np.flatnonzero(self.owner == pool).tolist():
            first, end = layout.pages_in(pool, chunk)
            mask[first:end] = True
        return torch.from_numpy(mask).to(self.device)
