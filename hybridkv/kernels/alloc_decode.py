"""alloc_decode: one slot per request for the token a decode step computes.

Request ``i`` computes position ``seq_lens[i] - 1``; ``last_loc[i]`` is the slot of the
position before it. The new slot is the next one in the same page, unless the position
starts a page, in which case it is the first slot of the next page from ``free_pages``::

    mid-page:    | .. last_loc new .. |                slot = last_loc + 1
    page start:  | .. .. .. last_loc |  | new .. .. |   slot = free_pages[k] * page_size
                 (seq_len - 1) % page_size == 0        (also when seq_len == 1)

where ``k`` is the number of earlier requests of the batch that took a page.
"""

from __future__ import annotations

import torch

from hybridkv.kernels._common import (
    check_count,
    check_page_size,
    check_same_len,
    check_tensor,
    debug_enabled,
    exclusive_cumsum,
    host_count,
    kernel_jit,
    resolve_backend,
)
from hybridkv.kernels._triton import tl, triton


@kernel_jit(sizes=["batch"], unaligned=["seq_lens_ptr", "last_loc_ptr", "free_pages_ptr"])
def _alloc_decode_kernel(
    out_slots_ptr,
    seq_lens_ptr,
    last_loc_ptr,
    free_pages_ptr,
    page_starts_ptr,
    batch,
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    mask = i < batch
    seq = tl.load(seq_lens_ptr + i, mask=mask, other=1)
    new_page = (seq - 1) % PAGE_SIZE == 0
    last = tl.load(last_loc_ptr + i, mask=mask & ~new_page, other=0)
    page_start = tl.load(page_starts_ptr + i, mask=mask & new_page, other=0)
    page = tl.load(free_pages_ptr + page_start, mask=mask & new_page, other=0)
    slot = tl.where(new_page, page * PAGE_SIZE, last + 1)
    tl.store(out_slots_ptr + i, slot, mask=mask)


def _alloc_decode_triton(
    seq_lens: torch.Tensor,
    last_loc: torch.Tensor,
    free_pages: torch.Tensor,
    page_size: int,
    page_starts: torch.Tensor,
) -> torch.Tensor:
    batch = seq_lens.shape[0]
    out = torch.empty(batch, dtype=torch.int64, device=seq_lens.device)
    if batch:
        block = 256
        _alloc_decode_kernel[(triton.cdiv(batch, block),)](
            out,
            seq_lens,
            last_loc,
            free_pages,
            page_starts,
            batch,
            PAGE_SIZE=page_size,
            BLOCK=block,
        )
    return out


def alloc_decode_reference(
    seq_lens: torch.Tensor,
    last_loc: torch.Tensor,
    free_pages: torch.Tensor,
    page_size: int,
    *,
    num_new_pages: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Torch reference of :func:`alloc_decode` (same signature, no checks).

    Sync-free when ``num_new_pages`` is given: the new-page requests take
    ``free_pages[cumsum(new_page) - 1]``, a gather that every request does and only the
    new-page ones keep.
    """
    new_page = (seq_lens - 1) % page_size == 0
    if num_new_pages is None:
        num_new_pages = int(new_page.sum())
    if num_new_pages == 0:
        return last_loc + 1, 0
    # NOTE: before the batch's first new page the index is -1, which wraps to the last page;
    # torch.where drops it (free_pages is non-empty here).
    page = free_pages[torch.cumsum(new_page, 0) - 1]
    return torch.where(new_page, page * page_size, last_loc + 1), num_new_pages


def alloc_decode(
    seq_lens: torch.Tensor,
    last_loc: torch.Tensor,
    free_pages: torch.Tensor,
    page_size: int,
    *,
    num_new_pages: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, int]:
    """Allocate the slot of position ``seq_lens[i] - 1`` of every request.

    Args:
        seq_lens, last_loc: int64 ``[batch]``; ``seq_lens[i] >= 1`` counts the new token;
            ``last_loc[i]`` is the slot of position ``seq_lens[i] - 2`` (ignored when
            ``(seq_lens[i] - 1) % page_size == 0``, i.e. when the new token starts a page).
        free_pages: int64 ``[>= num_new_pages]``; pages are taken from its front, in request
            order.
        page_size: tokens per page.
        num_new_pages: how many requests start a page, when the caller knows it (from its
            host-side lengths): then no device->host sync happens (outside debug mode, which
            checks it). ``None`` counts them on the device and syncs.

    Returns:
        ``(out_slots, num_new_pages)``: int64 ``[batch]`` and how many pages of ``free_pages``
        were taken. Nothing is mutated.

    One cumsum over the batch and one Triton launch: O(batch) work.
    """
    check_tensor("seq_lens", seq_lens, dtype=torch.int64, ndim=1)
    device = seq_lens.device
    check_tensor("last_loc", last_loc, dtype=torch.int64, ndim=1, device=device)
    check_tensor("free_pages", free_pages, dtype=torch.int64, ndim=1, device=device)
    check_same_len(("seq_lens", "last_loc"), seq_lens, last_loc)
    page_size = check_page_size(page_size)
    num_new_pages = check_count("num_new_pages", num_new_pages)
    backend = resolve_backend(backend, device)
    if debug_enabled() or num_new_pages is None or backend == "triton":
        new_page = (seq_lens - 1) % page_size == 0
        if debug_enabled():
            if seq_lens.numel() and bool((seq_lens < 1).any()):
                raise ValueError("seq_lens must be >= 1 (they count the token being decoded)")
            if bool((~new_page & (last_loc % page_size != (seq_lens - 2) % page_size)).any()):
                raise ValueError(
                    "last_loc must be the slot of position seq_len - 2 (wrong page offset)"
                )
        num_new_pages = host_count("num_new_pages", num_new_pages, new_page.sum())
    if num_new_pages > free_pages.numel():
        raise ValueError(
            f"free_pages has {free_pages.numel()} pages, the batch needs {num_new_pages}"
        )
    if backend == "torch":
        return alloc_decode_reference(
            seq_lens, last_loc, free_pages, page_size, num_new_pages=num_new_pages
        )
    page_starts = exclusive_cumsum(new_page.to(torch.int64))
    out = _alloc_decode_triton(seq_lens, last_loc, free_pages, page_size, page_starts)
    return out, num_new_pages
