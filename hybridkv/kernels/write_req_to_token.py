"""write_req_to_token: write prefix slots and new slots into ``req_to_token`` rows.

Request ``i`` writes two segments of its row ``req_to_token[req_pool_indices[i]]``::

    pos:   0              prefix_len      extend_start         extend_start + extend_len
           |  prefix_slots  |  untouched  |  new_slots          |  untouched
              segment i                      segment i

``prefix_slots`` and ``new_slots`` are flat: request ``i``'s segment starts at the exclusive
cumsum of ``prefix_lens`` (resp. ``extend_lens``). A request whose prefix is already in its
row passes ``prefix_len = 0``; a decode step is ``prefix_len = 0, extend_len = 1``.
"""

from __future__ import annotations

import torch

from hybridkv.kernels._common import (
    check_nonnegative,
    check_rows,
    check_same_len,
    check_tensor,
    debug_enabled,
    exclusive_cumsum,
    grid_blocks,
    kernel_jit,
    resolve_backend,
)
from hybridkv.kernels._triton import tl


@kernel_jit(
    unaligned=[
        "req_pool_indices_ptr",
        "prefix_slots_ptr",
        "prefix_lens_ptr",
        "new_slots_ptr",
        "extend_starts_ptr",
        "extend_lens_ptr",
    ]
)
def _write_req_to_token_kernel(
    req_to_token_ptr,
    req_pool_indices_ptr,
    prefix_slots_ptr,
    prefix_lens_ptr,
    prefix_offsets_ptr,
    new_slots_ptr,
    extend_starts_ptr,
    extend_lens_ptr,
    new_offsets_ptr,
    stride_row,
    BLOCK: tl.constexpr,
):
    # Axis 0: a request; axis 1: blocks of its segments, grid-strided (past its lengths: no
    # work).
    pid = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1).to(tl.int64) * BLOCK
    step = tl.num_programs(1) * BLOCK
    row = tl.load(req_pool_indices_ptr + pid).to(tl.int64)
    dst = req_to_token_ptr + row * stride_row
    prefix_len = tl.load(prefix_lens_ptr + pid)
    src = prefix_slots_ptr + tl.load(prefix_offsets_ptr + pid)
    for off in range(start, prefix_len, step):
        j = off + tl.arange(0, BLOCK)
        mask = j < prefix_len
        slot = tl.load(src + j, mask=mask, other=0)
        tl.store(dst + j, slot.to(tl.int32), mask=mask)
    extend_start = tl.load(extend_starts_ptr + pid)
    extend_len = tl.load(extend_lens_ptr + pid)
    src = new_slots_ptr + tl.load(new_offsets_ptr + pid)
    for off in range(start, extend_len, step):
        j = off + tl.arange(0, BLOCK)
        mask = j < extend_len
        slot = tl.load(src + j, mask=mask, other=0)
        tl.store(dst + extend_start + j, slot.to(tl.int32), mask=mask)


def _write_req_to_token_triton(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    new_slots: torch.Tensor,
    extend_starts: torch.Tensor,
    extend_lens: torch.Tensor,
) -> None:
    batch = req_pool_indices.shape[0]
    work = max(prefix_slots.numel(), new_slots.numel())
    if batch and work:
        block = 256
        _write_req_to_token_kernel[(batch, grid_blocks(work, batch, block))](
            req_to_token,
            req_pool_indices,
            prefix_slots,
            prefix_lens,
            exclusive_cumsum(prefix_lens),
            new_slots,
            extend_starts,
            extend_lens,
            exclusive_cumsum(extend_lens),
            req_to_token.stride(0),
            BLOCK=block,
        )


def _scatter_segments(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """``req_to_token[req_pool_indices[i], starts[i] + j] = slots[offset_i + j]`` for
    ``j < lens[i]``, as one scatter into the flat table (``slots.numel()`` sizes it: no sync).
    """
    n = slots.numel()
    req = torch.repeat_interleave(lens, output_size=n)
    base = req_pool_indices * req_to_token.stride(0) + starts - exclusive_cumsum(lens)
    flat = base[req] + torch.arange(n, device=slots.device)
    req_to_token.view(-1).index_copy_(0, flat, slots.to(torch.int32))


def write_req_to_token_reference(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    new_slots: torch.Tensor,
    extend_starts: torch.Tensor,
    extend_lens: torch.Tensor,
) -> None:
    """Torch reference of :func:`write_req_to_token` (same signature, no checks; mutates).

    Sync-free: the slot tensors' lengths size everything.
    """
    if prefix_slots.numel():
        zeros = torch.zeros_like(prefix_lens)
        _scatter_segments(req_to_token, req_pool_indices, zeros, prefix_lens, prefix_slots)
    if new_slots.numel():
        _scatter_segments(req_to_token, req_pool_indices, extend_starts, extend_lens, new_slots)


def _check_values(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    new_slots: torch.Tensor,
    extend_starts: torch.Tensor,
    extend_lens: torch.Tensor,
) -> None:
    """The debug-mode checks of :func:`write_req_to_token` (they sync)."""
    rows, max_context = req_to_token.shape
    check_nonnegative("prefix_lens", prefix_lens)
    check_nonnegative("extend_lens", extend_lens)
    if int(prefix_lens.sum()) != prefix_slots.numel():
        raise ValueError(
            f"prefix_slots has {prefix_slots.numel()} slots, sum(prefix_lens) is "
            f"{int(prefix_lens.sum())}"
        )
    if int(extend_lens.sum()) != new_slots.numel():
        raise ValueError(
            f"new_slots has {new_slots.numel()} slots, sum(extend_lens) is {int(extend_lens.sum())}"
        )
    check_rows(req_pool_indices, rows, distinct=True)
    if req_pool_indices.numel():
        if bool((extend_starts < prefix_lens).any()):
            raise ValueError("extend_starts must be >= prefix_lens")
        if bool((extend_starts + extend_lens > max_context).any()):
            raise ValueError(f"extend_starts + extend_lens must be <= max_context = {max_context}")


def write_req_to_token(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    new_slots: torch.Tensor,
    extend_starts: torch.Tensor,
    extend_lens: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Write each request's prefix slots and new slots into its ``req_to_token`` row.

    Args:
        req_to_token: int32 ``[rows, max_context]``. **Mutated**: row ``req_pool_indices[i]``
            gets ``[0, prefix_lens[i])`` and ``[extend_starts[i], + extend_lens[i])``; every
            other element is left as it was.
        req_pool_indices: int64 ``[batch]``, distinct rows.
        prefix_slots: int64 ``[sum(prefix_lens)]`` full slots, request by request.
        prefix_lens: int64 ``[batch]``; 0 where the prefix is already written.
        new_slots: int64 ``[sum(extend_lens)]`` full slots, request by request.
        extend_starts: int64 ``[batch]``, ``>= prefix_lens`` (the segments never overlap).
        extend_lens: int64 ``[batch]``, ``extend_starts + extend_lens <= max_context``.

    Slots are stored as int32. Two cumsums over the batch and one Triton launch; no
    device->host sync outside debug mode (the slot tensors' lengths size the work).
    """
    check_tensor("req_to_token", req_to_token, dtype=torch.int32, ndim=2)
    device = req_to_token.device
    check_tensor("req_pool_indices", req_pool_indices, dtype=torch.int64, ndim=1, device=device)
    check_tensor("prefix_slots", prefix_slots, dtype=torch.int64, ndim=1, device=device)
    check_tensor("prefix_lens", prefix_lens, dtype=torch.int64, ndim=1, device=device)
    check_tensor("new_slots", new_slots, dtype=torch.int64, ndim=1, device=device)
    check_tensor("extend_starts", extend_starts, dtype=torch.int64, ndim=1, device=device)
    check_tensor("extend_lens", extend_lens, dtype=torch.int64, ndim=1, device=device)
    check_same_len(
        ("req_pool_indices", "prefix_lens", "extend_starts", "extend_lens"),
        req_pool_indices,
        prefix_lens,
        extend_starts,
        extend_lens,
    )
    backend = resolve_backend(backend, device)
    if debug_enabled():
        _check_values(
            req_to_token,
            req_pool_indices,
            prefix_slots,
            prefix_lens,
            new_slots,
            extend_starts,
            extend_lens,
        )
    if backend == "torch":
        write_req_to_token_reference(
            req_to_token,
            req_pool_indices,
            prefix_slots,
            prefix_lens,
            new_slots,
            extend_starts,
            extend_lens,
        )
    else:
        _write_req_to_token_triton(
            req_to_token,
            req_pool_indices,
            prefix_slots,
            prefix_lens,
            new_slots,
            extend_starts,
            extend_lens,
        )
