"""Tree nodes: a run of whole pages of tokens and, per component, its cached value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass(eq=False, slots=True)
class Node:
    """A node caches tokens ``[start, start + len(key))`` of every path through it.

    Components, each with a device and (with the host tier) a host value:
      * full: ``full`` holds the device full slots (one per token), ``None`` once evicted
        from the device; ``host_full`` the host slots of its backup.
      * swa: ``swa`` says whether the tokens' device SWA KV exists (reached through the
        allocator's full->SWA map; ``False`` is a tombstone); ``host_swa`` its backup.
      * mamba: ``state`` is the state-pool slot of a snapshot of the recurrent state after
        exactly ``end`` tokens (a split keeps it on the lower part); ``host_state`` its backup.
    Lock counts are per component: a full lock pins the node's full KV (every node on a
    locked path), an SWA lock its SWA KV (the nodes in a locked prefix's last window), a
    host lock its host values (a load back or a copy in flight), a state lock its snapshot
    (a copy from it is pending). A lock whose SWA pin starts inside the node (at a page
    boundary) is not a lock count but an entry of ``swa_pins`` (sorted, with repeats): it
    pins the SWA KV from that position on, so ``[start, swa_pins[0])`` stays evictable.

    The tree owns the structure (key, start, parent, children, full lock, LRU key); each
    value and its lock belong to the tree part of its component (``hybridkv.tree.parts``),
    the only code that changes them.
    """

    UNDO_BY_REFERENCE: ClassVar[tuple[str, ...]] = ("key",)  # replaced, never changed in place

    uid: int  # creation order in its tree: a deterministic LRU tie-break
    key: list[int]
    start: int
    parent: Node | None
    full: torch.Tensor | None = None
    swa: bool = False
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    host_full: torch.Tensor | None = None
    host_swa: torch.Tensor | None = None
    state: int | None = None
    host_state: int | None = None
    full_lock: int = 0
    swa_lock: int = 0
    swa_pins: list[int] = field(default_factory=list)
    host_lock: int = 0
    state_lock: int = 0
    last_access: int = 0
    hit_count: int = 0

    def __len__(self) -> int:
        return len(self.key)

    @property
    def end(self) -> int:
        return self.start + len(self.key)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def on_device(self) -> bool:
        return self.full is not None

    @property
    def on_host(self) -> bool:
        return self.host_full is not None

    def path(self) -> list[Node]:
        """Nodes from this one up to (not including) the root."""
        nodes = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes
