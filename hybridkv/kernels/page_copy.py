"""page_copy: copy whole pages, all layers, K and V, between two pools of any layout.

A pool is seen as a 3-D view ``[num_pages, num_chunks, chunk_elems]`` whose last dim is
contiguous and whose first two strides are arbitrary, so one call serves every layout::

    layer-first (device)  buf [num_layers*2, num_pages, page_size*heads*dim] -> buf.transpose(0, 1)
    page-first  (host)    buf [num_pages, num_layers*2, page_size*heads*dim] -> buf
    state slots           buf [num_slots, num_layers, state_elems]           -> buf

``dst[dst_pages[i]] = src[src_pages[i]]`` for every ``i``: each copy moves ``num_chunks``
strided runs of ``chunk_elems`` contiguous elements. Data is reinterpreted as integers
(widened to int64 where the layout allows), so copies are bit-exact, NaN payloads included.
"""

from __future__ import annotations

import contextlib

import torch

from hybridkv.kernels._common import (
    MAX_GRID_YZ,
    check_same_len,
    check_tensor,
    debug_enabled,
    kernel_jit,
    resolve_backend,
)
from hybridkv.kernels._triton import tl, triton

_MAX_GRID_YZ = MAX_GRID_YZ  # the kernel grid-strides past it
# Bytes one program moves per loop step (BLOCK elements of the integer view).
_BLOCK_BYTES = 8192
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@kernel_jit(unaligned=["dst_pages_ptr", "src_pages_ptr"])
def _page_copy_kernel(
    dst_ptr,
    src_ptr,
    dst_pages_ptr,
    src_pages_ptr,
    num_chunks,
    chunk_elems,
    dst_page_stride,
    dst_chunk_stride,
    src_page_stride,
    src_chunk_stride,
    BLOCK: tl.constexpr,
):
    # Axis 0: one copy (pid <= 2**31 - 1); axes 1, 2: chunks and blocks, grid-strided.
    pid = tl.program_id(0).to(tl.int64)
    src_page = tl.load(src_pages_ptr + pid).to(tl.int64)
    dst_page = tl.load(dst_pages_ptr + pid).to(tl.int64)
    src_page_ptr = src_ptr + src_page * src_page_stride
    dst_page_ptr = dst_ptr + dst_page * dst_page_stride
    for c in range(tl.program_id(1).to(tl.int64), num_chunks, tl.num_programs(1)):
        src_chunk_ptr = src_page_ptr + c * src_chunk_stride
        dst_chunk_ptr = dst_page_ptr + c * dst_chunk_stride
        for off in range(
            tl.program_id(2).to(tl.int64) * BLOCK, chunk_elems, tl.num_programs(2) * BLOCK
        ):
            j = off + tl.arange(0, BLOCK)
            mask = j < chunk_elems
            x = tl.load(src_chunk_ptr + j, mask=mask)
            tl.store(dst_chunk_ptr + j, x, mask=mask)


def _int_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as the integer dtype of the same element size (a view)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def _widest_int_views(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer views of ``src`` and ``dst`` with the widest element both layouts allow.

    NOTE: widening (fp16 -> int64 moves 4 elements per lane) needs the last dim's bytes, the
    other strides' bytes and the storage offset to divide by the new size; torch checks that.
    """
    src_i, dst_i = _int_view(src), _int_view(dst)
    for size in (8, 4):
        if size <= src_i.element_size():
            break
        try:
            src_w, dst_w = src_i.view(_INT_OF_SIZE[size]), dst_i.view(_INT_OF_SIZE[size])
        except RuntimeError:
            continue
        if src_w.data_ptr() % size == 0 and dst_w.data_ptr() % size == 0:
            return src_w, dst_w
    return src_i, dst_i


def _page_copy_triton(
    src: torch.Tensor, dst: torch.Tensor, src_pages: torch.Tensor, dst_pages: torch.Tensor
) -> None:
    src_i, dst_i = _widest_int_views(src, dst)
    num_copies, num_chunks, chunk_elems = src_pages.shape[0], src_i.shape[1], src_i.shape[2]
    if num_copies == 0 or num_chunks == 0 or chunk_elems == 0:
        return
    block = min(triton.next_power_of_2(chunk_elems), _BLOCK_BYTES // src_i.element_size())
    grid = (
        num_copies,
        min(num_chunks, _MAX_GRID_YZ),
        min(triton.cdiv(chunk_elems, block), _MAX_GRID_YZ),
    )
    # NOTE: a pinned host side is reached through UVA; launch on the CUDA side's device.
    cuda = dst if dst.is_cuda else src
    with torch.cuda.device(cuda.device) if cuda.is_cuda else contextlib.nullcontext():
        _page_copy_kernel[grid](
            dst_i,
            src_i,
            dst_pages,
            src_pages,
            num_chunks,
            chunk_elems,
            dst_i.stride(0),
            dst_i.stride(1),
            src_i.stride(0),
            src_i.stride(1),
            BLOCK=block,
        )


def page_copy_reference(
    src: torch.Tensor, dst: torch.Tensor, src_pages: torch.Tensor, dst_pages: torch.Tensor
) -> None:
    """Torch reference of :func:`page_copy` (same signature, no checks); mutates ``dst``."""
    pages = _int_view(src)[src_pages.to(src.device)]  # gathered first: src may be dst
    _int_view(dst)[dst_pages.to(dst.device)] = pages.to(dst.device)


def _check_pool(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D [num_pages, num_chunks, chunk_elems], got {t.shape}")
    if t.element_size() not in _INT_OF_SIZE or t.is_complex():
        raise ValueError(f"{name} must have a 1, 2, 4 or 8-byte real dtype, got {t.dtype}")
    if t.shape[2] > 1 and t.stride(2) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got {t.stride()}")
    return t


def _copy_device(src: torch.Tensor, dst: torch.Tensor) -> torch.device:
    """The device that runs the copy (and holds the page indices)."""
    if src.device == dst.device:
        return src.device
    for dev, host in ((src, dst), (dst, src)):
        if dev.is_cuda and host.device.type == "cpu" and host.is_pinned():
            return dev.device
    raise ValueError(
        f"dst must be on src's device ({src.device}), or one of src and dst pinned host memory "
        f"and the other CUDA; got dst on {dst.device}"
    )


def _check_pages(name: str, pages: torch.Tensor, num_pages: int) -> None:
    if pages.numel() and bool(((pages < 0) | (pages >= num_pages)).any()):
        raise ValueError(f"{name} must lie in [0, {num_pages})")


def page_copy(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Copy page ``src_pages[i]`` of ``src`` to page ``dst_pages[i]`` of ``dst``, for every ``i``.

    Args:
        src, dst: ``[num_pages, num_chunks, chunk_elems]`` views of one dtype (any 1, 2, 4 or
            8-byte dtype) and equal ``shape[1:]``; the last dim has stride 1, the others any
            stride (pass a layer-first pool as ``buf.transpose(0, 1)``). Same device, or one
            CUDA and the other pinned host memory (the copy then runs on the CUDA device).
            ``src`` may be ``dst`` when no page is both read and written.
        src_pages, dst_pages: int64 ``[num_copies]`` on the copying device, in range of
            ``src.shape[0]`` and ``dst.shape[0]``; ``dst_pages`` distinct. May be empty.

    Mutates ``dst`` only (bit-exact copies); returns nothing. One Triton launch with grid
    ``(num_copies, num_chunks, chunk_elems / BLOCK)``. The launcher never waits for the
    device outside debug mode (which range-checks the pages), so a copy queued on a side
    stream overlaps whatever the host queues next.
    """
    _check_pool("src", src)
    _check_pool("dst", dst)
    if dst.dtype != src.dtype:
        raise ValueError(f"dst must have src's dtype {src.dtype}, got {dst.dtype}")
    if dst.shape[1:] != src.shape[1:]:
        raise ValueError(f"dst must have src's shape[1:] {tuple(src.shape[1:])}, got {dst.shape}")
    device = _copy_device(src, dst)
    check_tensor("src_pages", src_pages, dtype=torch.int64, ndim=1, device=device)
    check_tensor("dst_pages", dst_pages, dtype=torch.int64, ndim=1, device=device)
    check_same_len(("src_pages", "dst_pages"), src_pages, dst_pages)
    backend = resolve_backend(backend, device)
    if debug_enabled():
        _check_pages("src_pages", src_pages, src.shape[0])
        _check_pages("dst_pages", dst_pages, dst.shape[0])
    if backend == "torch":
        page_copy_reference(src, dst, src_pages, dst_pages)
    else:
        _page_copy_triton(src, dst, src_pages, dst_pages)
