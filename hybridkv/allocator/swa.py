"""Hybrid allocator: a full pool, a smaller SWA pool and the full->SWA slot map.

Every full page that holds SWA KV is paired with one SWA page at the same offsets:
``full_to_swa[full_page * ps + o] == swa_page * ps + o``. A full slot whose entry is 0 is
a tombstone (its SWA KV was freed). The map is written for every newly allocated full
slot and cleared by whole pages on free, so a free full page never maps anywhere.

A model without SWA layers has no SWA pool and no map (``swa_tokens=0``): allocation and
freeing touch the full pool only. With an arena a pool starts empty and grows by chunks; the
map covers the full pool's whole view, its largest size.
"""

from __future__ import annotations

import numpy as np
import torch

from hybridkv import kernels
from hybridkv.allocator.paged import FreeGroup, PagedAllocator
from hybridkv.allocator.upload import host_ints, upload, upload_many
from hybridkv.errors import CheckError, ensure
from hybridkv.undo import UndoLog


class SWAAllocator(FreeGroup):
    """Full + SWA allocators and the map between them; ``None`` when either pool is short.

    ``in_arena``: per pool (full, SWA), whether it is a pool of an arena: its token count is
    then its view's capacity and it starts with no pages.
    """

    def __init__(
        self,
        full_tokens: int,
        swa_tokens: int,
        page_size: int,
        device: torch.device | str,
        backend: str | None,
        undo: UndoLog | None = None,
        in_arena: tuple[bool, bool] = (False, False),
    ) -> None:
        self.page_size = page_size
        self.device = torch.device(device)
        self.backend = backend
        self._undo = undo or UndoLog()
        self.full = PagedAllocator(full_tokens, page_size, device, backend, self._undo, in_arena[0])
        self.swa: PagedAllocator | None = None
        self.full_to_swa: torch.Tensor | None = None
        if swa_tokens:
            self.swa = PagedAllocator(
                swa_tokens, page_size, device, backend, self._undo, in_arena[1]
            )
            self.full_to_swa = torch.zeros(
                self.full.num_slots, dtype=torch.int64, device=self.device
            )

    @property
    def has_swa(self) -> bool:
        return self.swa is not None

    @property
    def full_available(self) -> int:
        return self.full.available

    @property
    def swa_available(self) -> int:
        """Free SWA tokens (0 without an SWA pool)."""
        return self.swa.available if self.swa is not None else 0

    def translate(self, full_slots: torch.Tensor) -> torch.Tensor:
        """SWA slots of ``full_slots`` (0 for tombstones)."""
        return kernels.full_to_swa(full_slots, self.full_to_swa, backend=self.backend)

    def _fits(self, pages: int) -> bool:
        swa_free = self.swa.free_page_count if self.swa is not None else pages
        return pages <= self.full.free_page_count and pages <= swa_free

    def alloc_extend(
        self,
        prefix_lens: object,
        seq_lens: object,
        last_loc: torch.Tensor,
        device_lens: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_new_pages: int | None = None,
    ) -> torch.Tensor | None:
        """Full slots (with SWA slots mapped) for ``[prefix_lens[i], seq_lens[i])``.

        Same arguments as :meth:`PagedAllocator.alloc_extend` (``num_new_pages``: the pages
        it takes from each pool, if the caller has counted them). The SWA KV of position
        ``prefix_len - 1`` must exist when ``prefix_len`` is not page-aligned (the new tokens
        continue its SWA page); debug mode checks it.
        """
        prefix, seq = host_ints(prefix_lens), host_ints(seq_lens)
        need = self.full.pages_for_extend(prefix, seq) if num_new_pages is None else num_new_pages
        if not self._fits(need):
            return None
        if device_lens is None:
            device_lens = tuple(upload_many(self.device, prefix, seq))
        swa_last_loc = self._swa_last_loc(last_loc, prefix, seq)
        full_slots = self.full.alloc_extend(prefix, seq, last_loc, device_lens, need)
        if swa_last_loc is not None:
            swa_slots = self.swa.alloc_extend(prefix, seq, swa_last_loc, device_lens, need)
            self.map_swa(full_slots, swa_slots)
        return full_slots

    def alloc_decode(
        self,
        seq_lens: object,
        last_loc: torch.Tensor,
        seq_lens_device: torch.Tensor | None = None,
        num_new_pages: int | None = None,
    ) -> torch.Tensor | None:
        """One full slot (and its SWA slot) per request for position ``seq_lens[i] - 1``.

        ``seq_lens``: host lengths; ``seq_lens_device``: the same on the device (optional);
        ``num_new_pages``: the pages it takes from each pool, if the caller has counted them.
        The SWA KV of ``last_loc[i]`` must exist where the new token continues its page
        (``seq_lens[i] - 1`` not page-aligned); debug mode checks it.
        """
        seq = host_ints(seq_lens)
        need = self.full.decode_pages(seq) if num_new_pages is None else num_new_pages
        if not self._fits(need):
            return None
        if seq_lens_device is None:
            seq_lens_device = upload(seq, self.device)
        swa_last_loc = self._swa_last_loc(last_loc, None, seq)
        full_slots = self.full.alloc_decode(seq, last_loc, seq_lens_device, need)
        if swa_last_loc is not None:
            swa_slots = self.swa.alloc_decode(seq, swa_last_loc, seq_lens_device, need)
            self.map_swa(full_slots, swa_slots)
        return full_slots

    def map_swa(self, full_slots: torch.Tensor, swa_slots: torch.Tensor) -> None:
        """Map ``full_slots``, which map to none (new, or tombstoned), to ``swa_slots``."""
        self.full_to_swa.index_copy_(0, full_slots, swa_slots)
        self._undo.on_undo(lambda: self.full_to_swa.index_fill_(0, full_slots, 0))

    def _keep_map(self, full_slots: torch.Tensor) -> None:
        """Keep the map of ``full_slots`` for the undo log before changing it."""
        if self._undo.active:
            kept = self.full_to_swa[full_slots]
            self._undo.on_undo(lambda: self.full_to_swa.index_copy_(0, full_slots, kept))

    def _swa_last_loc(
        self, last_loc: torch.Tensor, prefix: np.ndarray | None, seq: np.ndarray
    ) -> torch.Tensor | None:
        """SWA slots of ``last_loc`` (``None`` without an SWA pool) for extending requests from
        host lengths ``prefix`` (``None``: a decode step, ``seq - 1``) to ``seq``. A request
        continuing its last page must have one: a tombstone translates to slot 0, and
        continuing it would hand out slots of the reserved page 0. Debug mode checks it (it
        syncs); only then are the continuing requests worked out."""
        if self.swa is None:
            return None
        swa_last_loc = self.translate(last_loc.clamp(min=0))
        if not kernels.debug_enabled():
            return swa_last_loc
        if prefix is None:
            continues = (seq - 1) % self.page_size != 0
        else:
            continues = (prefix % self.page_size != 0) & (seq > prefix)
        if continues.any():
            mask = torch.from_numpy(continues).to(swa_last_loc.device)
            if bool(((swa_last_loc == 0) & mask).any()):
                raise ValueError(
                    "last_loc: a request continuing its last page has no SWA KV at its last "
                    "slot (tombstoned), so SWA slots would come from the reserved page 0"
                )
        return swa_last_loc

    def free(self, full_slots: torch.Tensor, whole_pages: bool = False) -> None:
        """Free whole full pages and the SWA pages they map to (tombstones map to none).

        ``whole_pages``: the slots are runs of whole pages, each from a page's first slot,
        no page twice (a tree node's slots); their pages are then read off directly instead
        of marking the pool (``slots_to_pages``), which costs O(pool) and a sync.
        """
        if full_slots.numel() == 0:
            return
        if self._grouped(full_slots):
            return
        pages = self._pages(full_slots, whole_pages)
        if self.swa is not None:
            self._free_swa_of_pages(pages)
        self.full.free_pages(pages)

    def free_swa(self, full_slots: torch.Tensor, whole_pages: bool = False) -> None:
        """Tombstone whole pages: free their SWA pages, keep their full KV (``whole_pages``
        as for :meth:`free`)."""
        if full_slots.numel() == 0:
            return
        self._free_swa_of_pages(self._pages(full_slots, whole_pages))

    def _pages(self, full_slots: torch.Tensor, whole_pages: bool) -> torch.Tensor:
        """The sorted distinct full pages of ``full_slots``."""
        if not whole_pages:
            return kernels.slots_to_pages(
                full_slots, self.page_size, self.full.num_pages, backend=self.backend
            )
        pages = torch.sort(full_slots[:: self.page_size] // self.page_size).values
        if kernels.debug_enabled():
            marked = kernels.slots_to_pages(
                full_slots, self.page_size, self.full.num_pages, backend=self.backend
            )
            if not torch.equal(pages, marked):
                raise AssertionError("whole_pages slots are not runs of distinct whole pages")
        return pages

    def _free_swa_of_pages(self, full_pages: torch.Tensor) -> None:
        by_page = self.full_to_swa.view(-1, self.page_size)
        if self._undo.active:
            kept = by_page[full_pages]
            self._undo.on_undo(lambda: by_page.index_copy_(0, full_pages, kept))
        swa_first = by_page[full_pages, 0]
        # NOTE: a tombstoned page maps to 0; page 0 is reserved and must never be freed.
        self.swa.free_pages(swa_first[swa_first != 0] // self.page_size)
        by_page[full_pages] = 0

    def adopt_swa(self, keep_slots: torch.Tensor, dup_slots: torch.Tensor) -> None:
        """Move the SWA KV of ``dup_slots`` to ``keep_slots`` (same tokens, same offsets).

        Used when a tombstoned cached copy meets a duplicate that still has SWA KV: the
        cached full slots take over the duplicate's SWA slots before the duplicate is freed.
        """
        self._keep_map(keep_slots)
        self._keep_map(dup_slots)
        self.full_to_swa[keep_slots] = self.full_to_swa[dup_slots]
        self.full_to_swa[dup_slots] = 0

    def swa_release(
        self,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        released_lens: torch.Tensor,
        window: int,
        num_freed: int | None = None,
    ) -> torch.Tensor:
        """Free the SWA pages that slid out of each request's window; return new released lens.

        ``req_pool_indices``, ``seq_lens``, ``released_lens``: int64 on the pool's device.
        ``num_freed``: the pages this frees, known on the host: then nothing syncs, and every
        page released must still be mapped (a request's own pages always are; checked in
        debug mode). Without it, pages tombstoned before their release are skipped.
        """
        released, new_released = kernels.swa_release(
            req_to_token,
            req_pool_indices,
            seq_lens,
            released_lens,
            self.full_to_swa,
            window,
            self.page_size,
            num_freed=num_freed,
            backend=self.backend,
        )
        self._undo.on_undo(
            lambda: self._unrelease(
                req_to_token, req_pool_indices, released_lens, new_released, released
            )
        )
        freed = released
        if num_freed is None:
            # NOTE: a page tombstoned before its release comes back as SWA page 0.
            freed = released[released != 0]
        elif kernels.debug_enabled() and bool((released == 0).any()):
            raise CheckError("swa_release freed a tombstoned page (SWA page 0)")
        self.swa.free_pages(freed)
        return new_released

    def _unrelease(
        self,
        req_to_token: torch.Tensor,
        rows: torch.Tensor,
        released_lens: torch.Tensor,
        new_released: torch.Tensor,
        freed: torch.Tensor,
    ) -> None:
        """Map again the full pages a failed step's :meth:`swa_release` tombstoned: each
        row's pages in ``[released_lens, new_released)``, in the order of ``freed`` (their SWA
        pages; 0 where none was mapped). Undo only: it syncs."""
        ps, by_page = self.page_size, self.full_to_swa.view(-1, self.page_size)
        swa_pages = iter(freed.tolist())
        for row, start, end in zip(
            rows.tolist(), released_lens.tolist(), new_released.tolist(), strict=True
        ):
            for pos in range(start, end, ps):
                swa_page = next(swa_pages)
                if swa_page:
                    full_page = int(req_to_token[row, pos]) // ps
                    by_page[full_page] = torch.arange(
                        swa_page * ps, (swa_page + 1) * ps, device=self.device
                    )

    def check(self) -> None:
        """Raise :class:`~hybridkv.errors.CheckError` unless both free lists and the map are
        consistent with each other."""
        self.full.check()
        if self.swa is None:
            return
        self.swa.check()
        by_page = self.full_to_swa.view(-1, self.page_size)
        ensure(not bool(by_page[0].any()), "page 0 maps to SWA")
        ensure(not bool(by_page[self.full.free_pages_view()].any()), "a free full page maps to SWA")
        mapped = self.full_to_swa[self.full_to_swa != 0]
        ensure(mapped.numel() == torch.unique(mapped).numel(), "two full slots share an SWA slot")
        swa_free = torch.zeros(self.swa.num_pages, dtype=torch.bool, device=self.device)
        swa_free[self.swa.free_pages_view()] = True
        maps_free = bool(swa_free[mapped // self.page_size].any())
        ensure(not maps_free, "a full slot maps to a free SWA page")
