"""State pool: recurrent-state slots (one per running request, plus tree snapshots).

A slot holds the conv + SSM state of every recurrent layer: a static pool's buffer is
``[layers, slots, *state_shape]``, an arena's pool a slot-major view ``[slots, layers,
*state_shape]`` of the arena's bytes; either way one :func:`page_copy` (a slot is a page of
one token) copies a slot's state in every layer. Slot 0 is reserved, like page 0 of the KV
pools.
"""

from __future__ import annotations

import torch

from hybridkv import kernels
from hybridkv.allocator.paged import PagedAllocator
from hybridkv.undo import UndoLog


class StatePool:
    """``get_state`` / ``set_state`` by layer and slot; slots handed out by a paged allocator."""

    def __init__(
        self,
        layer_ids: list[int],
        num_slots: int,
        state_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        backend: str | None,
        undo: UndoLog | None = None,
        slots: torch.Tensor | None = None,
    ) -> None:
        """``slots``: an arena's slot-major view ``[slots, layers, *state_shape]`` to use
        instead of a buffer of its own (its allocator then starts empty); ``num_slots`` is
        ignored then."""
        self.state_shape = tuple(state_shape)
        self.backend = backend
        self.device = torch.device(device)
        self._index = {lid: j for j, lid in enumerate(layer_ids)}
        # NOTE: buf (layer-first) exists only for a static pool.
        self.buf = None
        if slots is None:
            self.allocator = PagedAllocator(num_slots, 1, device, backend, undo)
            self.buf = torch.zeros(
                len(layer_ids), self.allocator.num_slots, *state_shape, dtype=dtype, device=device
            )
            slots = self.buf.transpose(0, 1)
        else:
            self.allocator = PagedAllocator(slots.shape[0] - 1, 1, device, backend, undo, True)
        self._slots = slots  # [slots, layers, *state_shape]

    @property
    def available(self) -> int:
        return self.allocator.available

    def slot_view(self) -> torch.Tensor:
        """The pool as ``[slots, layers, state elements]`` for :func:`page_copy`."""
        return self._slots.flatten(2)

    def _layer(self, layer_id: int, slots: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The layer's index and ``slots`` on the pool's device; slots outside the pool are a
        ``ValueError`` in debug mode (the check syncs)."""
        if layer_id not in self._index:
            raise ValueError(f"layer_id {layer_id} is not a recurrent (mamba) layer")
        if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int64 or slots.dim() != 1:
            raise ValueError("slots must be a 1-D int64 tensor")
        slots = slots.to(self.device)
        size = self._slots.shape[0]
        if kernels.debug_enabled() and slots.numel():
            if bool(((slots < 0) | (slots >= size)).any()):
                raise ValueError(f"slots must lie in [0, {size}) (the state pool's slots)")
        return self._index[layer_id], slots

    def get_state(self, layer_id: int, slots: torch.Tensor) -> torch.Tensor:
        """The state ``[n, *state_shape]`` of layer ``layer_id`` at ``slots`` ``[n]``."""
        j, slots = self._layer(layer_id, slots)
        return self._slots[slots, j]

    def set_state(self, layer_id: int, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Write ``x`` ``[n, *state_shape]`` as layer ``layer_id``'s state at ``slots`` ``[n]``."""
        j, dev_slots = self._layer(layer_id, slots)
        want = (slots.shape[0], *self.state_shape)
        if tuple(x.shape) != want:
            raise ValueError(f"x must have shape {want}, got {tuple(x.shape)}")
        self._slots[dev_slots, j] = x.to(self._slots.dtype)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's state of slots ``src`` into slots ``dst`` (one kernel call)."""
        view = self.slot_view()
        self.allocator.keep_contents(view, dst)
        kernels.page_copy(view, view, src, dst, backend=self.backend)

    def zero(self, slots: torch.Tensor) -> None:
        """Reset ``slots`` to the initial (zero) state in every layer."""
        self._slots[slots] = 0
