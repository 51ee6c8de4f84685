"""page_table: FlashInfer-style paged KV tables (CSR) from ``req_to_token`` rows.

Request ``i`` gets the pages that hold positions ``[kv_starts[i], seq_lens[i])``, whole pages
from the one holding ``kv_starts[i]``::

    pos:               0   4   8   12  16
    tokens:            ....-#########..     page_size 4; '#': [kv_starts, seq_lens) = [5, 14)
    pages:             [p0][p1][p2][p3]     listed: p1 p2 p3 (5 // 4 = 1 .. ceil(14 / 4) = 4)
    kv_indices:        req_to_token[row, 4] // 4, [row, 8] // 4, [row, 12] // 4
    kv_last_page_len:  14 - (4 - 1) * 4 = 2

Full-attention layers pass ``kv_starts = 0``. Sliding-window layers pass
``kv_starts = max(0, first_query_pos - window)`` and ``full_to_swa_map``: the page ids are
then SWA pages, ``full_to_swa_map[req_to_token[row, page * page_size]] // page_size``, the
table of the trailing window only.
"""

from __future__ import annotations

import torch

from hybridkv.kernels._common import (
    ceil_div,
    check_count,
    check_nonnegative,
    check_page_size,
    check_rows,
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


@kernel_jit(unaligned=["req_pool_indices_ptr", "kv_starts_ptr", "seq_lens_ptr"])
def _page_table_kernel(
    kv_indices_ptr,
    kv_last_page_len_ptr,
    req_to_token_ptr,
    full_to_swa_map_ptr,
    req_pool_indices_ptr,
    kv_starts_ptr,
    seq_lens_ptr,
    counts_ptr,
    out_starts_ptr,
    stride_row,
    PAGE_SIZE: tl.constexpr,
    HAS_MAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Axis 0: a request; axis 1: blocks of its pages, grid-strided (past its count: no work).
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(req_pool_indices_ptr + pid).to(tl.int64)
    first = tl.load(kv_starts_ptr + pid) // PAGE_SIZE
    seq = tl.load(seq_lens_ptr + pid)
    count = tl.load(counts_ptr + pid)
    out_start = tl.load(out_starts_ptr + pid)
    if tl.program_id(1) == 0:
        last = tl.where(count > 0, seq - (first + count - 1) * PAGE_SIZE, 0)
        tl.store(kv_last_page_len_ptr + pid, last.to(tl.int32))
    for off in range(tl.program_id(1).to(tl.int64) * BLOCK, count, tl.num_programs(1) * BLOCK):
        j = off + tl.arange(0, BLOCK)
        mask = j < count
        pos = (first + j) * PAGE_SIZE
        slot = tl.load(req_to_token_ptr + row * stride_row + pos, mask=mask, other=0)
        slot = slot.to(tl.int64)
        if HAS_MAP:
            slot = tl.load(full_to_swa_map_ptr + slot, mask=mask, other=0)
        tl.store(kv_indices_ptr + out_start + j, (slot // PAGE_SIZE).to(tl.int32), mask=mask)


def _page_table_triton(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    kv_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    full_to_swa_map: torch.Tensor | None,
    counts: torch.Tensor,
    num_pages: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = req_to_token.device
    batch = seq_lens.shape[0]
    kv_indptr = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    kv_indptr[1:] = torch.cumsum(counts, 0)
    kv_indices = torch.empty(num_pages, dtype=torch.int32, device=device)
    kv_last_page_len = torch.empty(batch, dtype=torch.int32, device=device)
    if batch:
        has_map = full_to_swa_map is not None
        block = 64
        _page_table_kernel[(batch, grid_blocks(num_pages, batch, block))](
            kv_indices,
            kv_last_page_len,
            req_to_token,
            full_to_swa_map if has_map else req_to_token,
            req_pool_indices,
            kv_starts,
            seq_lens,
            counts,
            exclusive_cumsum(counts),
            req_to_token.stride(0),
            PAGE_SIZE=page_size,
            HAS_MAP=has_map,
            BLOCK=block,
        )
    return kv_indptr, kv_indices, kv_last_page_len


def page_table_reference(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    kv_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    *,
    full_to_swa_map: torch.Tensor | None = None,
    num_pages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`page_table` (same signature, no checks).

    Sync-free when ``num_pages`` is given. Page ``j`` of the flat output belongs to request
    ``req = repeat_interleave(counts)[j]`` and reads the flat ``req_to_token`` element
    ``row * stride + (first + j - indptr) * page_size``, i.e. ``base[req] + j * page_size``.
    """
    device = seq_lens.device
    first = kv_starts // page_size
    end = ceil_div(seq_lens, page_size)
    counts = end - first
    indptr = torch.cumsum(counts, 0)
    if num_pages is None:
        num_pages = int(counts.sum())
    kv_indptr = torch.nn.functional.pad(indptr, (1, 0)).int()
    kv_last_page_len = torch.where(counts > 0, seq_lens - (end - 1) * page_size, 0).int()
    if num_pages == 0:
        return kv_indptr, torch.empty(0, dtype=torch.int32, device=device), kv_last_page_len
    req = torch.repeat_interleave(counts, output_size=num_pages)
    base = req_pool_indices * req_to_token.stride(0) + (first - indptr + counts) * page_size
    flat = base[req] + torch.arange(0, num_pages * page_size, page_size, device=device)
    slot = req_to_token.view(-1)[flat].long()
    if full_to_swa_map is not None:
        slot = full_to_swa_map[slot]
    kv_indices = (slot // page_size).int()
    return kv_indptr, kv_indices, kv_last_page_len


def page_table(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    kv_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    *,
    full_to_swa_map: torch.Tensor | None = None,
    num_pages: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the paged KV table of positions ``[kv_starts[i], seq_lens[i])`` of every request.

    Args:
        req_to_token: int32 ``[rows, max_context]`` table of full slots.
        req_pool_indices: int64 ``[batch]``, rows of ``req_to_token`` (repeats allowed).
        kv_starts: int64 ``[batch]``, first position attended to; need not be page-aligned.
        seq_lens: int64 ``[batch]``, ``kv_starts <= seq_lens <= max_context``.
        page_size: tokens per page.
        full_to_swa_map: optional int64 ``[num_full_slots]``; when given, page ids are SWA
            pages (the pages read must not be tombstoned: those would show as page 0).
        num_pages: the length of ``kv_indices``,
            ``sum(ceil(seq_lens / page_size) - kv_starts // page_size)``, when the caller knows
            it from its host-side lengths: then no device->host sync happens (outside debug
            mode, which checks it). ``None`` counts on the device.

    Returns:
        ``(kv_indptr, kv_indices, kv_last_page_len)``, all int32: ``[batch + 1]`` starting at
        0; ``[num_pages]`` page ids in request then position order; ``[batch]`` tokens in
        each request's last page (0 for a request with no pages). Nothing is mutated.

    One cumsum over the batch and one Triton launch.
    """
    check_tensor("req_to_token", req_to_token, dtype=torch.int32, ndim=2)
    device = req_to_token.device
    check_tensor("req_pool_indices", req_pool_indices, dtype=torch.int64, ndim=1, device=device)
    check_tensor("kv_starts", kv_starts, dtype=torch.int64, ndim=1, device=device)
    check_tensor("seq_lens", seq_lens, dtype=torch.int64, ndim=1, device=device)
    if full_to_swa_map is not None:
        check_tensor("full_to_swa_map", full_to_swa_map, dtype=torch.int64, ndim=1, device=device)
    check_same_len(
        ("req_pool_indices", "kv_starts", "seq_lens"), req_pool_indices, kv_starts, seq_lens
    )
    page_size = check_page_size(page_size)
    num_pages = check_count("num_pages", num_pages)
    backend = resolve_backend(backend, device)
    rows, max_context = req_to_token.shape
    if debug_enabled():
        check_rows(req_pool_indices, rows, distinct=False)
        if req_pool_indices.numel():
            if bool((seq_lens > max_context).any()):
                raise ValueError(f"seq_lens must be <= max_context = {max_context}")
            if bool((kv_starts > seq_lens).any()):
                raise ValueError("kv_starts must be <= seq_lens")
        check_nonnegative("kv_starts", kv_starts)
    if backend == "triton" or debug_enabled():
        counts = ceil_div(seq_lens, page_size) - kv_starts // page_size
        num_pages = host_count("num_pages", num_pages, counts.sum())
    if backend == "torch":
        return page_table_reference(
            req_to_token,
            req_pool_indices,
            kv_starts,
            seq_lens,
            page_size,
            full_to_swa_map=full_to_swa_map,
            num_pages=num_pages,
        )
    return _page_table_triton(
        req_to_token,
        req_pool_indices,
        kv_starts,
        seq_lens,
        page_size,
        full_to_swa_map,
        counts,
        num_pages,
    )
