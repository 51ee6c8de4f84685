"""swa_release: free the SWA pages that slid out of each request's window.

A sliding-window layer never again reads a token more than ``window`` positions behind the
end, so the SWA KV of whole pages before the window can go back to the SWA pool. With
``keep = max(window, page_size)``, request ``i`` releases the pages that start in
``[released_lens[i], new_released_lens[i])``::

    pos:  0              released            new                       seq
          |  released    |  freed this call  |  kept: >= keep tokens   |
          |  earlier     |  whole pages      |  (the window + partial) |
                                             ^ floor_to_page(seq - keep), never below released

For each such page it emits the SWA page ``full_to_swa_map[first slot] // page_size`` and
tombstones the whole page in the map (every slot of it -> 0): the full KV stays, the SWA KV
is gone.
"""

from __future__ import annotations

import torch

from hybridkv.kernels._common import (
    check_count,
    check_nonnegative,
    check_page_size,
    check_rows,
    check_same_len,
    check_tensor,
    debug_enabled,
    exclusive_cumsum,
    host_count,
    kernel_jit,
    resolve_backend,
)
from hybridkv.kernels._triton import tl, triton


@kernel_jit(unaligned=["req_pool_indices_ptr", "released_lens_ptr"])
def _swa_release_kernel(
    freed_pages_ptr,
    full_to_swa_map_ptr,
    req_to_token_ptr,
    req_pool_indices_ptr,
    released_lens_ptr,
    counts_ptr,
    out_starts_ptr,
    stride_row,
    PAGE_SIZE: tl.constexpr,
    PAGE_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(req_pool_indices_ptr + pid).to(tl.int64)
    released = tl.load(released_lens_ptr + pid)
    count = tl.load(counts_ptr + pid)
    out_start = tl.load(out_starts_ptr + pid)
    o = tl.arange(0, PAGE_BLOCK)
    zeros = tl.zeros([BLOCK, PAGE_BLOCK], dtype=tl.int64)
    for off in range(0, count, BLOCK):
        j = off + tl.arange(0, BLOCK)
        mask = j < count
        pos = released + j * PAGE_SIZE
        full = tl.load(req_to_token_ptr + row * stride_row + pos, mask=mask, other=0)
        full = full.to(tl.int64)
        swa = tl.load(full_to_swa_map_ptr + full, mask=mask, other=0)
        tl.store(freed_pages_ptr + out_start + j, swa // PAGE_SIZE, mask=mask)
        base = (full // PAGE_SIZE) * PAGE_SIZE
        # NOTE: the tombstone store below writes map[full] (o == 0) too, from the lanes of a
        # [BLOCK, PAGE_BLOCK] layout, while the load above ran in the lanes of a [BLOCK]
        # layout (replicated across warps when BLOCK < the thread count): on a GPU the two are
        # different threads, and without an order a store can land before another warp's load,
        # which then reads 0 (page 0 freed, the real page leaked). The barrier (bar.sync)
        # makes every thread's load of this tile complete before any thread's store, and
        # orders global memory among the program's threads. Other tiles and programs never
        # touch these entries: the released full pages are distinct across the batch.
        tl.debug_barrier()
        tomb = mask[:, None] & (o[None, :] < PAGE_SIZE)
        tl.store(full_to_swa_map_ptr + base[:, None] + o[None, :], zeros, mask=tomb)


def _swa_release_triton(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    released_lens: torch.Tensor,
    full_to_swa_map: torch.Tensor,
    page_size: int,
    counts: torch.Tensor,
    total: int,
) -> torch.Tensor:
    out = torch.empty(total, dtype=torch.int64, device=req_to_token.device)
    if total:
        _swa_release_kernel[(counts.shape[0],)](
            out,
            full_to_swa_map,
            req_to_token,
            req_pool_indices,
            released_lens,
            counts,
            exclusive_cumsum(counts),
            req_to_token.stride(0),
            PAGE_SIZE=page_size,
            PAGE_BLOCK=triton.next_power_of_2(page_size),
            BLOCK=32,
        )
    return out


def _new_released_lens(
    seq_lens: torch.Tensor, released_lens: torch.Tensor, window: int, page_size: int
) -> torch.Tensor:
    keep = max(window, page_size)
    frontier = torch.clamp(seq_lens - keep, min=0) // page_size * page_size
    return torch.maximum(released_lens, frontier)


def swa_release_reference(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    released_lens: torch.Tensor,
    full_to_swa_map: torch.Tensor,
    window: int,
    page_size: int,
    *,
    num_freed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`swa_release` (same signature, no checks; mutates the map).

    Sync-free when ``num_freed`` is given.
    """
    new = _new_released_lens(seq_lens, released_lens, window, page_size)
    counts = (new - released_lens) // page_size
    if num_freed is None:
        num_freed = int(counts.sum())
    device = seq_lens.device
    if num_freed == 0:
        return torch.empty(0, dtype=torch.int64, device=device), new
    req = torch.repeat_interleave(counts, output_size=num_freed)
    j = torch.arange(num_freed, device=device) - exclusive_cumsum(counts)[req]
    pos = released_lens[req] + j * page_size
    full = req_to_token[req_pool_indices[req], pos].long()
    freed = full_to_swa_map[full] // page_size
    base = full // page_size * page_size
    offsets = torch.arange(page_size, device=device)
    full_to_swa_map.index_fill_(0, (base[:, None] + offsets).flatten(), 0)
    return freed, new


def swa_release(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    released_lens: torch.Tensor,
    full_to_swa_map: torch.Tensor,
    window: int,
    page_size: int,
    *,
    num_freed: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Release the SWA pages of every request that lie wholly before its window.

    Args:
        req_to_token: int32 ``[rows, max_context]`` table of full slots.
        req_pool_indices: int64 ``[batch]``, distinct rows of ``req_to_token``.
        seq_lens: int64 ``[batch]``, ``<= max_context``: at most the next step's first query
            position, so no page its trailing window ``[pos - window, ...)`` reads is freed.
        released_lens: int64 ``[batch]``, page-aligned: positions before it have no SWA KV.
        full_to_swa_map: int64 ``[num_full_slots]``, full slot -> SWA slot (0: none).
            **Mutated**: every slot of a released page is set to 0.
        window: sliding window in tokens, ``>= 1``.
        page_size: tokens per page (an SWA page pairs with a full page, offset for offset).
        num_freed: how many pages this call frees (``sum(new - released) / page_size``), when
            the caller knows it from its host-side lengths: then no device->host sync
            happens (outside debug mode, which checks it). ``None`` counts on the device.

    Returns:
        ``(freed_swa_pages, new_released_lens)``: int64 ``[num_freed]`` SWA pages in request
        order then position order, and a new int64 ``[batch]`` with
        ``max(released, floor_to_page(seq - max(window, page_size)))`` (``released_lens`` is
        not mutated).

    The released full pages must be distinct across the batch and still mapped (a tombstoned
    page yields SWA page 0). One cumsum over the batch and one Triton launch (none when
    nothing is freed).
    """
    check_tensor("req_to_token", req_to_token, dtype=torch.int32, ndim=2)
    device = req_to_token.device
    check_tensor("req_pool_indices", req_pool_indices, dtype=torch.int64, ndim=1, device=device)
    check_tensor("seq_lens", seq_lens, dtype=torch.int64, ndim=1, device=device)
    check_tensor("released_lens", released_lens, dtype=torch.int64, ndim=1, device=device)
    check_tensor("full_to_swa_map", full_to_swa_map, dtype=torch.int64, ndim=1, device=device)
    check_same_len(
        ("req_pool_indices", "seq_lens", "released_lens"),
        req_pool_indices,
        seq_lens,
        released_lens,
    )
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    page_size = check_page_size(page_size)
    num_freed = check_count("num_freed", num_freed)
    backend = resolve_backend(backend, device)
    rows, max_context = req_to_token.shape
    if debug_enabled():
        check_rows(req_pool_indices, rows, distinct=True)
        check_nonnegative("seq_lens", seq_lens)
        if seq_lens.numel() and bool((seq_lens > max_context).any()):
            raise ValueError(f"seq_lens must be <= max_context = {max_context}")
        check_nonnegative("released_lens", released_lens)
        if bool((released_lens % page_size != 0).any()):
            raise ValueError(f"released_lens must be multiples of page_size = {page_size}")
    if backend == "triton" or debug_enabled():
        new = _new_released_lens(seq_lens, released_lens, window, page_size)
        counts = (new - released_lens) // page_size
        num_freed = host_count("num_freed", num_freed, counts.sum())
    if backend == "torch":
        return swa_release_reference(
            req_to_token,
            req_pool_indices,
            seq_lens,
            released_lens,
            full_to_swa_map,
            window,
            page_size,
            num_freed=num_freed,
        )
    freed = _swa_release_triton(
        req_to_token, req_pool_indices, released_lens, full_to_swa_map, page_size, counts, num_freed
    )
    return freed, new
