"""The host tier's records: its pools and write policy, and the ordering of its copies.

Copies run on a side CUDA stream; the main stream waits for them before anything can
overwrite a copied page or read a loaded one. On CPU they run synchronously.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from hybridkv.allocator import HostPool, KVPool
from hybridkv.tree.storage import FileStorage

WRITE_POLICIES = ("write_through", "write_back", "write_through_selective")


class Transfers:
    """Orders host<->device copies on a side stream against the engine's stream.

    Backups (device -> host) and load backs (host -> device) are told apart: the engine's
    stream waits for backups before anything can overwrite a page they read, and for a
    layer's load back only before that layer's attention reads it. On CUDA a load back goes
    layer by layer (``per_layer``), so attention can start while later layers still load;
    on CPU copies are synchronous and one copy per pool does.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.per_layer = self.stream is not None
        self._backed_up: torch.cuda.Event | None = None  # the last device->host copy
        self._loaded: dict[int, torch.cuda.Event] = {}  # per layer: its last load back
        self._last: torch.cuda.Event | None = None  # the last copy of any kind

    @contextmanager
    def side_stream(self, backup: bool) -> Iterator[None]:
        """Run the block's copies after everything already queued, on the side stream."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield
            self._last = self._record()
            if backup:
                self._backed_up = self._last

    def layer_loaded(self, layer_id: int) -> None:
        """Inside a load back's ``side_stream``: every copy issued so far loads ``layer_id``."""
        if self.stream is not None:
            self._loaded[layer_id] = self._record()

    def wait_backups(self) -> None:
        """Make the engine's stream wait for every backup issued so far."""
        if self._backed_up is not None:
            torch.cuda.current_stream().wait_event(self._backed_up)

    def wait(self, layer_id: int | None = None) -> None:
        """Make the engine's stream wait for ``layer_id``'s load back (None: every copy)."""
        event = self._last if layer_id is None else self._loaded.get(layer_id, self._last)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def flush(self) -> None:
        """Block the host until every copy issued so far has landed."""
        if self.stream is not None:
            self.stream.synchronize()

    @staticmethod
    def _record() -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record()
        return event


@dataclass
class HostTier:
    """The host pools mirroring the device KV pools, the write policy, and the storage
    tier (L3) behind them: pages are written there after their host backup and prefetched
    from there into host memory."""

    kv: KVPool
    full: HostPool
    swa: HostPool | None
    write_policy: str
    storage: FileStorage | None = None
    state: HostPool | None = None
    transfers: Transfers = field(init=False)

    def __post_init__(self) -> None:
        if self.write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy must be one of {WRITE_POLICIES}")
        self.transfers = Transfers(self.kv.device)
