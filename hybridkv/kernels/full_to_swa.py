"""full_to_swa: translate full-pool slots to SWA-pool slots.

Sliding-window layers keep their KV in a smaller pool; ``full_to_swa_map[full_slot]`` is the
SWA slot of a token, or 0 when it has none (tombstoned, or slid out of the window)::

    full_slots:      3  1  2  4  0
    full_to_swa_map: [0 5 0 7 3]
    swa_slots:       7  5  0  3  0
"""

from __future__ import annotations

import torch

from hybridkv.kernels._common import check_tensor, debug_enabled, kernel_jit, resolve_backend
from hybridkv.kernels._triton import tl, triton


@kernel_jit(sizes=["num_slots"], unaligned=["full_slots_ptr"])
def _full_to_swa_kernel(
    swa_slots_ptr,
    full_slots_ptr,
    full_to_swa_map_ptr,
    num_slots,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    mask = i < num_slots
    full = tl.load(full_slots_ptr + i, mask=mask, other=0)
    swa = tl.load(full_to_swa_map_ptr + full, mask=mask, other=0)
    tl.store(swa_slots_ptr + i, swa, mask=mask)


def _full_to_swa_triton(full_slots: torch.Tensor, full_to_swa_map: torch.Tensor) -> torch.Tensor:
    n = full_slots.shape[0]
    out = torch.empty(n, dtype=full_to_swa_map.dtype, device=full_slots.device)
    if n:
        block = 1024
        _full_to_swa_kernel[(triton.cdiv(n, block),)](
            out, full_slots, full_to_swa_map, n, BLOCK=block
        )
    return out


def full_to_swa_reference(full_slots: torch.Tensor, full_to_swa_map: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`full_to_swa` (same signature, no checks)."""
    return full_to_swa_map[full_slots]


def full_to_swa(
    full_slots: torch.Tensor,
    full_to_swa_map: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Gather ``full_to_swa_map[full_slots]``.

    Args:
        full_slots: int64 ``[n]``, each in ``[0, full_to_swa_map.numel())``; may be empty.
        full_to_swa_map: int64 ``[full_pool_slots]``; 0 means no SWA slot.

    Returns:
        int64 ``[n]``: the SWA slot of each full slot, 0 where it has none. Nothing is mutated.

    No device->host sync outside debug mode (which range-checks ``full_slots``).
    """
    check_tensor("full_slots", full_slots, dtype=torch.int64, ndim=1)
    device = full_slots.device
    check_tensor("full_to_swa_map", full_to_swa_map, dtype=torch.int64, ndim=1, device=device)
    backend = resolve_backend(backend, device)
    size = full_to_swa_map.numel()
    if debug_enabled() and full_slots.numel():
        if bool(((full_slots < 0) | (full_slots >= size)).any()):
            raise ValueError(f"full_slots must lie in [0, full_to_swa_map.numel() = {size})")
    if backend == "torch":
        return full_to_swa_reference(full_slots, full_to_swa_map)
    return _full_to_swa_triton(full_slots, full_to_swa_map)
