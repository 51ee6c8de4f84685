"""KV buffers of the full-attention and sliding-window layers.

A static pool is one tensor ``[2 * layers, slots, heads, head_dim]`` (K of layer ``j`` at
``2j``, V at ``2j + 1``). A pool of an arena is page-major, ``[pages, 2 * layers, page_size,
heads, head_dim]``, a view of the arena's bytes (a page is one block the arena can hand to
another pool). Either way one page copy moves a page of every layer, K and V, and each
layer's K and V are paged views ``[pages, page_size, heads, head_dim]``.
"""

from __future__ import annotations

import torch

from hybridkv import kernels


class KVPool:
    """``set_kv`` / ``get_kv`` by full slots; SWA layers translate through the map.

    Args:
        full_layer_ids, swa_layer_ids: model layer ids of each attention kind.
        full_slots, swa_slots: slots per pool (page 0 included).
        page_size, num_kv_heads, head_dim, dtype, device: buffer geometry.
        full_to_swa: the allocator's full->SWA map (read, never written here).
        pages: page-major views ``[pages, 2 * layers, page_size, heads, head_dim]`` of
            ``(full, swa)`` to use instead of buffers of their own (an arena's; ``None``
            for a pool that has its own buffer).
    """

    def __init__(
        self,
        full_layer_ids: list[int],
        swa_layer_ids: list[int],
        full_slots: int,
        swa_slots: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        full_to_swa: torch.Tensor,
        backend: str | None,
        pages: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    ) -> None:
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.backend = backend
        self.full_to_swa = full_to_swa
        self.device = torch.device(device)
        shape = (num_kv_heads, head_dim)
        # NOTE: full_buf / swa_buf exist only for static pools (layer-first buffers).
        self.full_buf = self.swa_buf = None
        views = []
        for layers, slots, buf_name, page_major in (
            (len(full_layer_ids), full_slots, "full_buf", pages[0]),
            (len(swa_layer_ids), swa_slots, "swa_buf", pages[1]),
        ):
            if page_major is None:
                buf = torch.zeros(2 * layers, slots, *shape, dtype=dtype, device=device)
                setattr(self, buf_name, buf)
                page_major = buf.view(2 * layers, slots // page_size, page_size, *shape)
                page_major = page_major.transpose(0, 1)
            views.append(page_major)
        self._pages = views  # [pages, 2 * layers, page_size, heads, head_dim] per pool
        self._slots = [v.shape[0] * page_size for v in views]
        self._where = {lid: (False, j) for j, lid in enumerate(full_layer_ids)}
        self._where |= {lid: (True, j) for j, lid in enumerate(swa_layer_ids)}

    def _locate(
        self, layer_id: int, full_slots: torch.Tensor, read: bool
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """The pool's page-major view, layer index and pool slots of ``full_slots``.

        In debug mode (the checks sync) full slots outside the pool are a ``ValueError``, and
        so is reading an SWA layer where a slot has no SWA KV (outside the window, or
        tombstoned), which would read the padding page. Slot 0 (padding) is always allowed.
        """
        if layer_id not in self._where:
            raise ValueError(f"layer_id {layer_id} is not a full or SWA attention layer")
        if (
            not isinstance(full_slots, torch.Tensor)
            or full_slots.dtype != torch.int64
            or full_slots.dim() != 1
        ):
            raise ValueError("full_slots must be a 1-D int64 tensor")
        is_swa, j = self._where[layer_id]
        full_slots = full_slots.to(self.device)
        check = kernels.debug_enabled() and full_slots.numel() > 0
        size = self._slots[0]
        if check and bool(((full_slots < 0) | (full_slots >= size)).any()):
            raise ValueError(f"full_slots must lie in [0, {size}) (the full pool's slots)")
        if not is_swa:
            return self._pages[0], j, full_slots
        slots = kernels.full_to_swa(full_slots, self.full_to_swa, backend=self.backend)
        if read and check and bool(((slots == 0) & (full_slots != 0)).any()):
            raise ValueError(
                f"full_slots: layer {layer_id} is an SWA layer, and some slots have no SWA KV "
                "(outside the sliding window, or tombstoned)"
            )
        return self._pages[1], j, slots

    def set_kv(
        self, layer_id: int, full_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write K/V ``[n, num_kv_heads, head_dim]`` of ``layer_id`` at ``full_slots`` ``[n]``.

        Tombstoned SWA slots translate to 0, the padding page, where writes are harmless.
        """
        buf, j, slots = self._locate(layer_id, full_slots, read=False)
        want = (full_slots.shape[0], self.num_kv_heads, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape) != want:
                raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
        page, offset = slots // self.page_size, slots % self.page_size
        buf[page, 2 * j, offset] = k.to(buf.dtype)
        buf[page, 2 * j + 1, offset] = v.to(buf.dtype)

    def get_kv(self, layer_id: int, full_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[n, num_kv_heads, head_dim]`` of layer ``layer_id`` at ``full_slots``.

        An SWA layer holds KV only within the window: slots without it are refused (debug
        mode)."""
        buf, j, slots = self._locate(layer_id, full_slots, read=True)
        page, offset = slots // self.page_size, slots % self.page_size
        return buf[page, 2 * j, offset], buf[page, 2 * j + 1, offset]

    def paged(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of layer ``layer_id`` as paged views ``[pages, page_size, heads, head_dim]``.

        Page ids are those of the plan's page tables: full pages for a full-attention layer,
        SWA pages (``plan.swa_pages``) for a sliding-window one. Views: writes go to the pool.
        """
        if layer_id not in self._where:
            raise ValueError(f"layer_id {layer_id} is not a full or SWA attention layer")
        is_swa, j = self._where[layer_id]
        buf = self._pages[int(is_swa)]
        return buf[:, 2 * j], buf[:, 2 * j + 1]

    def layers(self) -> list[tuple[int, bool, int]]:
        """``(layer_id, is_swa, index)`` of every attention layer; its K and V are chunks
        ``2 * index`` and ``2 * index + 1`` of its pool's :meth:`page_view`."""
        return [(lid, swa, j) for lid, (swa, j) in sorted(self._where.items())]

    def page_view(self, swa: bool) -> torch.Tensor:
        """The pool as ``[pages, 2 * layers, page_size * heads * dim]`` for :func:`page_copy`."""
        return self._pages[int(swa)].flatten(2)
