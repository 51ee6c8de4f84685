"""Backend resolution and argument checks shared by every kernel launcher."""

from __future__ import annotations

import os

import torch

from hybridkv.kernels._triton import HAS_TRITON

BACKENDS = ("triton", "torch")


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
    kernel that writes rows, no row appears twice)."""
    if not req_pool_indices.numel():
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
    if t.numel() and bool((t < 0).any()):
        raise ValueError(f"{name} must be non-negative")


def exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """``[0, x0, x0+x1, ...]`` without the total: each element's start offset."""
    return torch.cumsum(x, 0) - x


def ceil_div(a: torch.Tensor | int, b: int) -> torch.Tensor | int:
    return (a + b - 1) // b
