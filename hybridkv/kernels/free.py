"""free: the distinct pages that hold a set of slots, ready to go back on the free-page stack.

An eviction frees the slots of many nodes at once; their pages are ``slot // page_size``::

    slots:  13 12 40  5 13  0        (any order, duplicates allowed)
    marks:  [1 1 0 1 0 0 0 0 0 0 1]  (one byte per page; every writer stores 1)
    pages:  0 1 3 10                 (sorted, distinct)

One launch marks the pages, ``torch.nonzero`` compacts the marks. The caller pushes the
result on its free-page stack.
"""

from __future__ import annotations

import torch

from hybridkv.kernels._common import (
    check_page_size,
    check_tensor,
    debug_enabled,
    kernel_jit,
    resolve_backend,
)
from hybridkv.kernels._triton import tl, triton


@kernel_jit(sizes=["num_slots"], unaligned=["slots_ptr"])
def _slots_to_pages_kernel(
    marks_ptr,
    slots_ptr,
    num_slots,
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    mask = i < num_slots
    slot = tl.load(slots_ptr + i, mask=mask, other=0)
    # NOTE: several programs may mark one page; they all store 1, so the race is benign.
    ones = tl.full([BLOCK], 1, dtype=tl.int8)
    tl.store(marks_ptr + slot // PAGE_SIZE, ones, mask=mask)


def _slots_to_pages_triton(slots: torch.Tensor, page_size: int, num_pages: int) -> torch.Tensor:
    marks = torch.zeros(num_pages, dtype=torch.int8, device=slots.device)
    n = slots.shape[0]
    if n:
        block = 1024
        _slots_to_pages_kernel[(triton.cdiv(n, block),)](
            marks, slots, n, PAGE_SIZE=page_size, BLOCK=block
        )
    return torch.nonzero(marks).flatten()


def slots_to_pages_reference(slots: torch.Tensor, page_size: int, num_pages: int) -> torch.Tensor:
    """Torch reference of :func:`slots_to_pages` (same signature, no checks).

    Marks pages rather than sorting slots (``torch.unique``): O(slots + pages), about 4x
    faster for a 2M-slot eviction on CPU, where this is the production path.
    """
    mark = torch.zeros(num_pages, dtype=torch.bool, device=slots.device)
    mark[slots // page_size] = True
    return mark.nonzero().flatten()


def slots_to_pages(
    slots: torch.Tensor,
    page_size: int,
    num_pages: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The sorted distinct pages ``slot // page_size`` of ``slots``.

    Args:
        slots: int64 ``[n]``, each in ``[0, num_pages * page_size)``; any order, duplicates
            allowed, may be empty.
        page_size: tokens per page.
        num_pages: pages in the pool the slots belong to.

    Returns:
        int64 ``[num_distinct_pages]``, ascending. Nothing is mutated.

    One launch over the slots plus a ``num_pages``-byte mark buffer and one ``torch.nonzero``,
    which synchronizes with the device to size its output: this is the eviction path, not the
    decode step, and the caller needs the count anyway. The range check of ``slots`` runs in
    debug mode only.
    """
    check_tensor("slots", slots, dtype=torch.int64, ndim=1)
    page_size = check_page_size(page_size)
    if not isinstance(num_pages, int) or isinstance(num_pages, bool) or num_pages < 1:
        raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
    backend = resolve_backend(backend, slots.device)
    if debug_enabled() and slots.numel():
        if bool(((slots < 0) | (slots >= num_pages * page_size)).any()):
            limit = num_pages * page_size
            raise ValueError(f"slots must lie in [0, num_pages * page_size = {limit})")
    if backend == "torch":
        return slots_to_pages_reference(slots, page_size, num_pages)
    return _slots_to_pages_triton(slots, page_size, num_pages)
