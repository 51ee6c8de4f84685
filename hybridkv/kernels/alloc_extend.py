"""alloc_extend: slots for the new tokens of a batch of prefills.

For request ``i``, positions ``[prefix_lens[i], seq_lens[i])`` get slots::

    page:   |  ...  | last_loc page |  new page  |  new page  |
    slots:           ^prefix   ^fill  ^whole pages from free_pages, in order

first the rest of the page that holds ``last_loc`` (the slot of position ``prefix_len - 1``;
ignored when ``prefix_len`` is page-aligned), then whole pages taken from the front of
``free_pages``, request by request.
"""

from __future__ import annotations

import torch

from hybridkv.kernels._common import (
    ceil_div,
    check_count,
    check_nonnegative,
    check_page_size,
    check_same_len,
    check_tensor,
    debug_enabled,
    exclusive_cumsum,
    grid_blocks,
    host_count,
    kernel_jit,
    resolve_backend,
)
from hybridkv.kernels._triton import tl


@kernel_jit(unaligned=["prefix_lens_ptr", "seq_lens_ptr", "last_loc_ptr", "free_pages_ptr"])
def _alloc_extend_kernel(
    out_slots_ptr,
    prefix_lens_ptr,
    seq_lens_ptr,
    last_loc_ptr,
    free_pages_ptr,
    out_starts_ptr,
    page_starts_ptr,
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Axis 0: a request; axis 1: blocks of its tokens, grid-strided (past its count: no work).
    pid = tl.program_id(0).to(tl.int64)
    prefix = tl.load(prefix_lens_ptr + pid)
    count = tl.load(seq_lens_ptr + pid) - prefix
    last = tl.load(last_loc_ptr + pid)
    out_start = tl.load(out_starts_ptr + pid)
    page_start = tl.load(page_starts_ptr + pid)
    # Slots still free in the page of last_loc (0 when prefix is page-aligned).
    fill = tl.minimum(count, (PAGE_SIZE - prefix % PAGE_SIZE) % PAGE_SIZE)
    for off in range(tl.program_id(1).to(tl.int64) * BLOCK, count, tl.num_programs(1) * BLOCK):
        j = off + tl.arange(0, BLOCK)
        mask = j < count
        k = tl.maximum(j - fill, 0)
        in_fill = j < fill
        page = tl.load(
            free_pages_ptr + page_start + k // PAGE_SIZE, mask=mask & (j >= fill), other=0
        )
        slot = tl.where(in_fill, last + 1 + j, page * PAGE_SIZE + k % PAGE_SIZE)
        tl.store(out_slots_ptr + out_start + j, slot, mask=mask)


def _alloc_extend_triton(
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    last_loc: torch.Tensor,
    free_pages: torch.Tensor,
    page_size: int,
    counts: torch.Tensor,
    new_pages: torch.Tensor,
    total: int,
) -> torch.Tensor:
    out = torch.empty(total, dtype=torch.int64, device=prefix_lens.device)
    batch = prefix_lens.shape[0]
    if batch and total:
        block = 256
        _alloc_extend_kernel[(batch, grid_blocks(total, batch, block))](
            out,
            prefix_lens,
            seq_lens,
            last_loc,
            free_pages,
            exclusive_cumsum(counts),
            exclusive_cumsum(new_pages),
            PAGE_SIZE=page_size,
            BLOCK=block,
        )
    return out


def alloc_extend_reference(
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    last_loc: torch.Tensor,
    free_pages: torch.Tensor,
    page_size: int,
    *,
    num_new_pages: int | None = None,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Torch reference of :func:`alloc_extend` (same signature, no checks).

    Sync-free when both counts are given: every token computes both its fill slot and its
    new-page slot, ``torch.where`` keeps one.
    """
    counts = seq_lens - prefix_lens
    new_pages = ceil_div(seq_lens, page_size) - ceil_div(prefix_lens, page_size)
    if num_tokens is None:
        num_tokens = int(counts.sum())
    if num_new_pages is None:
        num_new_pages = int(new_pages.sum())
    device = counts.device
    if num_tokens == 0:
        return torch.empty(0, dtype=torch.int64, device=device), num_new_pages
    req = torch.repeat_interleave(counts, output_size=num_tokens)
    j = torch.arange(num_tokens, device=device) - exclusive_cumsum(counts)[req]
    fill_slot = last_loc[req] + 1 + j
    if num_new_pages == 0:
        return fill_slot, 0
    k = j - torch.minimum(counts, (-prefix_lens) % page_size)[req]
    # NOTE: a fill token (k < 0) reads a page it does not keep; the clamp keeps that read in
    # bounds (its request's first new page may be past the end of the batch's pages).
    page_idx = torch.clamp(exclusive_cumsum(new_pages)[req] + k // page_size, 0, num_new_pages - 1)
    page_slot = free_pages[page_idx] * page_size + k % page_size
    return torch.where(k >= 0, page_slot, fill_slot), num_new_pages


def alloc_extend(
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    last_loc: torch.Tensor,
    free_pages: torch.Tensor,
    page_size: int,
    *,
    num_new_pages: int | None = None,
    num_tokens: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, int]:
    """Allocate slots for positions ``[prefix_lens[i], seq_lens[i])`` of every request.

    Args:
        prefix_lens, seq_lens, last_loc: int64 ``[batch]``; ``last_loc[i]`` is the slot of
            position ``prefix_lens[i] - 1`` (ignored when ``prefix_lens[i] % page_size == 0``).
        free_pages: int64 ``[>= num_new_pages]``; pages are taken from its front.
        page_size: tokens per page.
        num_new_pages: ``sum(ceil(seq / page_size) - ceil(prefix / page_size))``, and
        num_tokens: ``sum(seq_lens - prefix_lens)``, when the caller knows them from its
            host-side lengths: given both, no device->host sync happens (outside debug mode,
            which checks them). Each ``None`` is computed on the device, with a sync.

    Returns:
        ``(out_slots, num_new_pages)``: int64 ``[num_tokens]`` in request order, and how many
        pages of ``free_pages`` were taken. Nothing is mutated.

    Two cumsums over the batch and one Triton launch with grid ``(batch, token blocks)``:
    O(batch + tokens) work.
    """
    check_tensor("prefix_lens", prefix_lens, dtype=torch.int64, ndim=1)
    device = prefix_lens.device
    check_tensor("seq_lens", seq_lens, dtype=torch.int64, ndim=1, device=device)
    check_tensor("last_loc", last_loc, dtype=torch.int64, ndim=1, device=device)
    check_tensor("free_pages", free_pages, dtype=torch.int64, ndim=1, device=device)
    check_same_len(("prefix_lens", "seq_lens", "last_loc"), prefix_lens, seq_lens, last_loc)
    page_size = check_page_size(page_size)
    num_new_pages = check_count("num_new_pages", num_new_pages)
    num_tokens = check_count("num_tokens", num_tokens)
    backend = resolve_backend(backend, device)
    if debug_enabled():
        check_nonnegative("prefix_lens", prefix_lens)
        if bool((seq_lens < prefix_lens).any()):
            raise ValueError("seq_lens must be >= prefix_lens")
        partial = prefix_lens % page_size != 0
        if bool((partial & (last_loc % page_size != (prefix_lens - 1) % page_size)).any()):
            raise ValueError(
                "last_loc must be the slot of position prefix_len - 1 (wrong page offset)"
            )
    sized = num_new_pages is not None and num_tokens is not None
    if backend == "triton" or debug_enabled() or not sized:
        counts = seq_lens - prefix_lens
        new_pages = ceil_div(seq_lens, page_size) - ceil_div(prefix_lens, page_size)
        num_new_pages = host_count("num_new_pages", num_new_pages, new_pages.sum())
        num_tokens = host_count("num_tokens", num_tokens, counts.sum())
    if num_new_pages > free_pages.numel():
        raise ValueError(
            f"free_pages has {free_pages.numel()} pages, the batch needs {num_new_pages}"
        )
    if backend == "torch":
        return alloc_extend_reference(
            prefix_lens,
            seq_lens,
            last_loc,
            free_pages,
            page_size,
            num_new_pages=num_new_pages,
            num_tokens=num_tokens,
        )
    out = _alloc_extend_triton(
        prefix_lens, seq_lens, last_loc, free_pages, page_size, counts, new_pages, num_tokens
    )
    return out, num_new_pages
