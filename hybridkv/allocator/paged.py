"""Paged allocator: a free-page stack as a device tensor.

The free pages are ``stack[head:end]``: allocation takes pages from the front (``head``
advances), freeing pushes pages back in front of it (``head`` retreats), so both are
O(pages) slices with no concatenation; ``head`` is the count of allocated pages. Page 0 is
reserved for padding writes and is never handed out. Running short is a ``None`` return,
never an exception. A pool of an arena (``hybridkv.allocator.arena``) starts with no pages
and gains and loses them by whole chunks (``end`` moves; :meth:`PagedAllocator.add_pages`,
:meth:`PagedAllocator.reorder_free`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from hybridkv import kernels
from hybridkv.allocator.upload import host_ints, upload, upload_many
from hybridkv.errors import ensure
from hybridkv.undo import UndoLog


class FreeGroup:
    """``with free_group():`` batches every ``free(slots)`` inside it into one call at its end;
    an inner group joins the outer one. Subclasses queue in ``free`` via ``_grouped``."""

    _group: list[torch.Tensor] | None = None

    def _grouped(self, slots: torch.Tensor) -> bool:
        """Queue ``slots`` if a group is open (the caller then frees nothing now)."""
        if self._group is None:
            return False
        self._group.append(slots)
        return True

    @contextmanager
    def free_group(self) -> Iterator[None]:
        if self._group is not None:
            yield
            return
        self._group = []
        try:
            yield
        except BaseException:
            self._group = None  # a failed step frees nothing
            raise
        group, self._group = self._group, None
        if group:
            self.free(torch.cat(group))


class PagedAllocator(FreeGroup):
    """Slots of one pool, handed out by pages.

    Args:
        num_tokens: usable slots (rounded down to whole pages); the pool has one more
            page (page 0) for padding.
        page_size: tokens per page.
        device: where the free-page stack lives (the pool's device).
        backend: kernel backend (``"triton"``, ``"torch"`` or ``None`` for automatic).
        undo: the undo log of the steps that use the pool (``None``: not part of a manager).
        empty: start with no free pages (a pool of an arena: ``num_tokens`` is then the
            capacity of its view, and chunks it is granted add pages).
    """

    def __init__(
        self,
        num_tokens: int,
        page_size: int,
        device: torch.device | str,
        backend: str | None,
        undo: UndoLog | None = None,
        empty: bool = False,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_tokens < page_size:
            raise ValueError(f"num_tokens ({num_tokens}) must hold at least one page")
        self.page_size = page_size
        self.num_pages = num_tokens // page_size + 1  # including the reserved page 0
        self.device = torch.device(device)
        self.backend = backend
        self._stack = torch.arange(1, self.num_pages, dtype=torch.int64, device=self.device)
        self._head = 0
        self._end = 0 if empty else self._stack.numel()
        self._undo = undo or UndoLog()
        self._freed_in = 0  # the last step (UndoLog.steps) that freed pages

    @property
    def num_slots(self) -> int:
        """Slots in the pool, page 0 included: the size of a buffer indexed by slot."""
        return self.num_pages * self.page_size

    @property
    def free_page_count(self) -> int:
        return self._end - self._head

    @property
    def owned_pages(self) -> int:
        """Pages the pool has (allocated or free; page 0 not counted)."""
        return self._end

    @property
    def allocated_pages(self) -> int:
        return self._head

    @property
    def available(self) -> int:
        """Free tokens (whole free pages times page size)."""
        return self.free_page_count * self.page_size

    def free_pages_view(self) -> torch.Tensor:
        """The free pages in allocation order (a view: do not mutate)."""
        return self._stack[self._head : self._end]

    def add_pages(self, pages: np.ndarray) -> None:
        """Append ``pages`` (host ints, new to the pool) to the free stack, handed out last."""
        n = len(pages)
        end = self._end
        ensure(end + n <= self._stack.numel(), "more pages than the pool's view holds")
        if self._undo.active:
            self._undo.save(self, "_end")
            kept = self._stack[end : end + n].clone()
            self._undo.on_undo(lambda: self._stack[end : end + n].copy_(kept))
        self._stack[end : end + n] = upload(pages.astype(np.int64, copy=False), self.device)
        self._end = end + n

    def reorder_free(self, pages: np.ndarray) -> None:
        """Make the free stack ``pages`` (host ints: a subset of the free pages, in the order
        they are to be handed out); the free pages left out leave the pool. Rare: it keeps a
        copy of the whole stack for the undo log."""
        if self._undo.active:
            self._undo.save(self, "_end")
            kept = self._stack.clone()
            self._undo.on_undo(lambda: self._stack.copy_(kept))
        head, n = self._head, len(pages)
        self._stack[head : head + n] = upload(pages.astype(np.int64), self.device)
        self._end = head + n

    def alloc_pages(self, n: int) -> torch.Tensor | None:
        """Take ``n`` whole pages from the front of the free stack, or ``None`` if short."""
        if n > self.free_page_count:
            return None
        pages = self._stack[self._head : self._head + n].clone()
        self._take(n)
        return pages

    def pages_for_extend(self, prefix_lens: object, seq_lens: object) -> int:
        """New pages that extending each request from ``prefix_lens`` to ``seq_lens`` takes
        (host lengths: a list, a numpy array or a CPU tensor)."""
        ps = self.page_size
        prefix, seq = host_ints(prefix_lens), host_ints(seq_lens)
        return int(((seq + ps - 1) // ps - (prefix + ps - 1) // ps).sum())

    def alloc_extend(
        self,
        prefix_lens: object,
        seq_lens: object,
        last_loc: torch.Tensor,
        device_lens: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_new_pages: int | None = None,
    ) -> torch.Tensor | None:
        """Slots for positions ``[prefix_lens[i], seq_lens[i])`` of each request.

        ``prefix_lens``, ``seq_lens``: int64 host lengths (the decision needs no device sync);
        ``last_loc``: int64 on the pool's device; ``device_lens``: the same lengths already on
        the device (uploaded here when ``None``); ``num_new_pages``: their
        :meth:`pages_for_extend`, if the caller has it. Returns int64 slots in request order,
        or ``None`` (nothing taken) when the pool is short.
        """
        prefix, seq = host_ints(prefix_lens), host_ints(seq_lens)
        need = self.pages_for_extend(prefix, seq) if num_new_pages is None else num_new_pages
        if need > self.free_page_count:
            return None
        if device_lens is None:
            device_lens = tuple(upload_many(self.device, prefix, seq))
        free = self._stack[self._head : self._head + need]
        slots, _ = kernels.alloc_extend(
            *device_lens,
            last_loc,
            free,
            self.page_size,
            num_new_pages=need,
            num_tokens=int((seq - prefix).sum()),
            backend=self.backend,
        )
        self._take(need)
        return slots

    def decode_pages(self, seq_lens: object) -> int:
        """New pages a decode step of requests at ``seq_lens`` (host, counting the new token)
        takes: one per request whose new token starts a page."""
        return int(np.count_nonzero((host_ints(seq_lens) - 1) % self.page_size == 0))

    def alloc_decode(
        self,
        seq_lens: object,
        last_loc: torch.Tensor,
        seq_lens_device: torch.Tensor | None = None,
        num_new_pages: int | None = None,
    ) -> torch.Tensor | None:
        """One slot per request for position ``seq_lens[i] - 1``; ``None`` when short.

        ``seq_lens``: int64 host lengths; ``last_loc``: int64 on the pool's device;
        ``seq_lens_device``: ``seq_lens`` already on the device (uploaded when ``None``);
        ``num_new_pages``: their :meth:`decode_pages`, if the caller has it.
        """
        seq = host_ints(seq_lens)
        need = self.decode_pages(seq) if num_new_pages is None else num_new_pages
        if need > self.free_page_count:
            return None
        if seq_lens_device is None:
            seq_lens_device = upload(seq, self.device)
        free = self._stack[self._head : self._head + need]
        slots, _ = kernels.alloc_decode(
            seq_lens_device,
            last_loc,
            free,
            self.page_size,
            num_new_pages=need,
            backend=self.backend,
        )
        self._take(need)
        return slots

    def free(self, slots: torch.Tensor) -> None:
        """Return the pages holding ``slots`` (whole pages: every slot of them is released)."""
        if slots.numel() == 0:
            return
        if self._grouped(slots):
            return
        self.free_pages(
            kernels.slots_to_pages(slots, self.page_size, self.num_pages, backend=self.backend)
        )

    def free_pages(self, pages: torch.Tensor) -> None:
        """Push distinct, currently allocated ``pages`` back; they are handed out next."""
        n = pages.numel()
        if n == 0:
            return
        ensure(n <= self._head, "freeing more pages than are allocated")
        undo = self._undo
        if undo.active:
            undo.save(self, "_head", "_freed_in")
            self._freed_in = undo.steps
            # NOTE: taking pages only moves the head, so the free pages a step started with
            # stay in the stack behind it; pushing pages back may overwrite some of them,
            # and only those need keeping (a steady step frees before it takes: none).
            low = max(self._head - n, self._start_head())
            if low < self._head:
                kept = self._stack[low : self._head].clone()
                undo.on_undo(lambda: self._stack[low : low + kept.numel()].copy_(kept))
        self._head -= n
        self._stack[self._head : self._head + n] = pages

    @property
    def reuses_freed(self) -> bool:
        """Whether pages taken now may be ones the running step freed: their old contents
        (KV a failed step's undo puts back in the tree) must be kept before writing them."""
        return self._undo.active and self._freed_in == self._undo.steps

    def keep_contents(self, buf: torch.Tensor, pages: torch.Tensor) -> None:
        """Before the running step writes ``buf[pages]`` (``buf`` indexed by this pool's
        pages), keep their contents for its undo if they may hold what it must put back."""
        if self.reuses_freed and pages.numel():
            kept = buf[pages]
            self._undo.on_undo(lambda: buf.index_copy_(0, pages, kept))

    def _take(self, n: int) -> None:
        self._undo.save(self, "_head")
        self._head += n

    def _start_head(self) -> int:
        """Where the head was when the running step began."""
        return self._undo.saved_value(self, "_head")

    def check(self) -> None:
        """Raise :class:`~hybridkv.errors.CheckError` unless the free pages are distinct, in
        range and never page 0."""
        free = self.free_pages_view()
        ensure(self._head <= self._end <= self._stack.numel(), "the free stack's ends drifted")
        ensure(free.numel() == torch.unique(free).numel(), "a page is free twice")
        if free.numel():
            ensure(int(free.min()) >= 1 and int(free.max()) < self.num_pages, "bad free page")
