"""Backend resolution, the debug switch and argument checks shared by every kernel launcher.

Checks come in two kinds. Metadata checks (dtype, device, rank, contiguity, lengths, Python
ints) read no tensor data and always run. Value checks (ranges, distinct rows, sums) need a
device->host sync, which drains the stream on a GPU; they run only in debug mode, which
``HYBRIDKV_DEBUG`` (anything but ``""``/``"0"``) turns on at import and :func:`set_debug`
flips at run time. The test suite runs in debug mode.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from hybridkv.kernels._triton import HAS_TRITON, triton

BACKENDS = ("triton", "torch")

_debug = os.environ.get("HYBRIDKV_DEBUG", "") not in ("", "0")


def debug_enabled() -> bool:
    """True when launchers run their sync-needing value checks."""
    return _debug


def set_debug(on: bool) -> None:
    """Turn the sync-needing value checks of every launcher on or off."""
    global _debug
    _debug = bool(on)


# CUDA caps grid axes 1 and 2 at 65535 programs; kernels grid-stride past them.
MAX_GRID_YZ = 65535

_HAS_ALIGNMENT_OPT = "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters


def kernel_jit(*, sizes: Iterable[str] = (), unaligned: Iterable[str] = ()) -> Callable[..., Any]:
    """``triton.jit`` that compiles one variant whatever the per-call values.

    Triton specializes an int argument on ``== 1`` and on divisibility by 16, and a pointer
    on 16-byte alignment: per-call sizes (``sizes``: batch, counts) and index tensors that may
    be views at any offset (``unaligned``) would each compile new variants mid-serving. Both
    are turned off for the names given (the alignment switch, ``do_not_specialize_on_alignment``
    in Triton 3.6 and 3.9, is skipped on a Triton without it: ``do_not_specialize`` then
    covers the pointers too). Fixed sizes (table strides, pool geometry) stay specialized.
    """
    sizes, unaligned = list(sizes), list(unaligned)
    if _HAS_ALIGNMENT_OPT:
        return triton.jit(do_not_specialize=sizes, do_not_specialize_on_alignment=unaligned)
    return triton.jit(do_not_specialize=sizes + unaligned)


def grid_blocks(work: int, batch: int, block: int) -> int:
    """Axis 1 of a ``(batch, blocks)`` grid: the mean blocks of ``block`` items per request
    over ``work`` items (1 to 65535).

    Programs are in proportion to the work: a batch of equal requests gets one program per
    block, one long request as many as it has blocks, and a request longer than the mean
    grid-strides over its blocks while the programs past a short request's count exit at once.
    """
    return max(1, min(triton.cdiv(work, max(batch, 1) * block), MAX_GRID_YZ))


def interpreter_on() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``, and
    Triton installed)."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Pick the backend for tensors on ``device``.

    ``None`` means Triton when it is installed and the tensors are on CUDA or the interpreter
    is on, else torch. Asking for Triton without it installed, or on CPU tensors without the
    interpreter, is a ``ValueError``.
    """
    if backend is None:
        return "triton" if HAS_TRITON and (device.type == "cuda" or interpreter_on()) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and not HAS_TRITON:
        raise ValueError("backend='triton' needs Triton installed (pip install triton, Linux)")
    if backend == "triton" and device.type != "cuda" and not interpreter_on():
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before Triton is "
            "imported"
        )
    return backend


def check_tensor(
    name: str,
    t: object,
    *,
    dtype: torch.dtype | tuple[torch.dtype, ...],
    ndim: int,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Raise ``ValueError`` naming ``name`` unless ``t`` is a tensor of that dtype, rank, device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def check_same_len(names: tuple[str, ...], *tensors: torch.Tensor) -> int:
    """Raise ``ValueError`` unless all 1-D tensors have one length; return it."""
    n = tensors[0].shape[0]
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.shape[0] != n:
            raise ValueError(f"{name} has length {t.shape[0]}, expected {n} (as {names[0]})")
    return n


def check_rows(req_pool_indices: torch.Tensor, rows: int, *, distinct: bool) -> None:
    """Raise ``ValueError`` unless every index is a row of a ``rows``-row table (and, for a
    kernel that writes rows, no row appears twice). Debug mode only: it syncs."""
    if not _debug or not req_pool_indices.numel():
        return
    if bool(((req_pool_indices < 0) | (req_pool_indices >= rows)).any()):
        raise ValueError(f"req_pool_indices must lie in [0, {rows})")
    if distinct and torch.unique(req_pool_indices).numel() != req_pool_indices.numel():
        raise ValueError("req_pool_indices must be distinct")


def check_page_size(page_size: object) -> int:
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    return page_size


def check_nonnegative(name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if any element is negative (debug mode only)."""
    if _debug and t.numel() and bool((t < 0).any()):
        raise ValueError(f"{name} must be non-negative")


def check_count(name: str, count: object) -> int | None:
    """``None``, or ``count`` as a non-negative Python int (else ``ValueError``)."""
    if count is None:
        return None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {count!r}")
    return count


def host_count(name: str, given: int | None, total: torch.Tensor) -> int:
    """The host-side value of the 0-D tensor ``total``.

    ``given`` (a caller's host-known count) is returned without reading ``total``, except in
    debug mode, where a mismatch is a ``ValueError`` naming ``name``. ``None`` reads
    ``total``: one device->host sync.
    """
    if given is None:
        return int(total)
    if _debug and int(total) != given:
        raise ValueError(f"{name} = {given} does not match the inputs, which give {int(total)}")
    return given


def exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """``[0, x0, x0+x1, ...]`` without the total: each element's start offset."""
    return torch.cumsum(x, 0) - x


def ceil_div(a: torch.Tensor | int, b: int) -> torch.Tensor | int:
    return (a + b - 1) // b
