"""Host arrays to device tensors without blocking the host.

The scheduler keeps its bookkeeping in host arrays (numpy, indexed by request row) and
hands the kernels device tensors. On CPU an upload is a zero-copy view; on CUDA it is one
pinned, ``non_blocking`` copy per call, so a step packs everything it needs into one.
"""

from __future__ import annotations

import numpy as np
import torch


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``; the host never waits for the copy.

    NOTE: on CPU the tensor shares the array's memory, so pass a temporary the caller never
    mutates again. On CUDA the pinned staging block comes from torch's caching host
    allocator, which records the copy and does not reuse the block before it has run.
    """
    tensor = torch.from_numpy(array)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def upload_many(
    device: torch.device, *arrays: np.ndarray, dtype: type = np.int64
) -> list[torch.Tensor]:
    """1-D integer arrays on ``device`` as ``dtype``, one tensor each: on CUDA one packed
    copy and views into it; on CPU zero-copy views of the arrays themselves."""
    if device.type == "cpu":
        return [torch.from_numpy(a.astype(dtype, copy=False)) for a in arrays]
    packed = upload(np.concatenate(arrays).astype(dtype, copy=False), device)
    views, offset = [], 0
    for a in arrays:
        views.append(packed[offset : offset + a.shape[0]])
        offset += a.shape[0]
    return views


def host_ints(values: object) -> np.ndarray:
    """An int64 numpy view of host lengths (a list, a numpy array or a CPU tensor)."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError("host lengths must be on the CPU (a device tensor would sync)")
        return values.numpy().astype(np.int64, copy=False)
    return np.asarray(values, dtype=np.int64)
