"""Host pool: a page-first mirror of one device pool in (pinned) host memory."""

from __future__ import annotations

import torch

from hybridkv import kernels
from hybridkv.allocator.paged import PagedAllocator
from hybridkv.undo import UndoLog


class HostPool:
    """Host pages ``[pages, chunks, chunk_elems]`` with their own paged allocator.

    A host page holds what one device page holds in every layer (``chunks`` = 2 * layers
    for KV, layers for state), contiguous per page so a page is one block for storage.
    Pinned when CUDA is present so copies can be asynchronous.
    """

    def __init__(
        self,
        num_tokens: int,
        page_size: int,
        chunks: int,
        chunk_elems: int,
        dtype: torch.dtype,
        backend: str | None = None,
        undo: UndoLog | None = None,
    ) -> None:
        self.allocator = PagedAllocator(num_tokens, page_size, "cpu", backend, undo)
        self.backend = backend
        self.page_size = page_size
        self.buf = torch.zeros(
            self.allocator.num_pages,
            chunks,
            chunk_elems,
            dtype=dtype,
            pin_memory=torch.cuda.is_available(),
        )

    @property
    def available(self) -> int:
        return self.allocator.available

    def backup(self, device_view: torch.Tensor, device_pages: torch.Tensor) -> torch.Tensor | None:
        """Copy ``device_pages`` of ``device_view`` into new host pages; ``None`` when short."""
        host_pages = self.allocator.alloc_pages(device_pages.numel())
        if host_pages is None:
            return None
        self.allocator.keep_contents(self.buf, host_pages)
        kernels.page_copy(
            device_view,
            self.buf,
            device_pages,
            host_pages.to(device_pages.device),
            backend=self.backend,
        )
        return host_pages

    def load(
        self,
        device_view: torch.Tensor,
        host_pages: torch.Tensor,
        device_pages: torch.Tensor,
        chunks: slice = slice(None),
    ) -> None:
        """Copy ``host_pages`` back into ``device_pages`` of ``device_view`` (only ``chunks``
        of each page, e.g. one layer's K and V)."""
        device_view = device_view[:, chunks]
        kernels.page_copy(
            self.buf[:, chunks],
            device_view,
            host_pages.to(device_pages.device),
            device_pages,
            backend=self.backend,
        )

    def free(self, host_pages: torch.Tensor) -> None:
        self.allocator.free_pages(host_pages)
