"""The interface between the radix tree and its parts.

The tree (:mod:`hybridkv.tree.radix`) owns the structure: nodes, keys, splits, the path
(full) locks and the LRU clock. Each kind of cached data is a *part* that owns its node
fields, its counters and its LRU heaps:

* :class:`~hybridkv.tree.full.FullPart`: device full KV (always present);
* :class:`~hybridkv.tree.swa.SWAPart`: device SWA KV, tombstones, SWA locks (models with
  sliding-window layers);
* :class:`~hybridkv.tree.state.StatePart`: recurrent-state snapshots (models with
  recurrent layers);
* :class:`~hybridkv.tree.host.HostPart`: host copies of all of the above, storage
  (with a host tier).

A model gets only the parts it needs, so the tree never asks which kind of model it
serves: it calls every part's hooks, and a part ignores the events it has no stake in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hybridkv.tree.lru import LazyHeap
from hybridkv.tree.node import Node


@dataclass(frozen=True, slots=True)
class LockHandle:
    """What ``inc_lock`` locked: the path to ``node``, SWA from position ``swa_start``."""

    node: Node
    swa_start: int


class Part(Protocol):
    """Hooks the tree calls on its parts (each defaults to doing nothing)."""

    # The counters the part changes in place; the tree keeps them for the step's undo.
    COUNTERS: tuple[str, ...] = ()

    def heaps(self) -> tuple[LazyHeap, ...]:
        """The part's LRU heaps (the tree compacts them once detached nodes pile up)."""
        return ()

    def usable(self, nodes: list[Node]) -> list[bool] | None:
        """Per node of a matched path: may a prefix end there for this part (None: anywhere)."""
        return None

    def on_split(self, upper: Node, lower: Node, k: int) -> None:
        """``upper`` (new) takes the first ``k`` tokens of ``lower``: give it its share."""

    def on_cache(self, node: Node, slots: torch.Tensor, swa_from: int, adopted: bool) -> None:
        """An insert gives ``node`` the caller's KV at ``slots[node.start:node.end]`` (SWA
        KV from position ``swa_from`` on); ``adopted``: the node had no device KV before."""

    def on_inserted(self, node: Node) -> None:
        """An insert ended at ``node``."""

    def on_match(self, device: list[Node]) -> None:
        """A match hit the device nodes ``device`` (their LRU keys and hit counts are set)."""

    def on_lock(self, handle: LockHandle, locked: list[Node]) -> None:
        """``handle`` was taken; ``locked``: the nodes whose full lock went from 0 to 1."""

    def on_unlock(self, handle: LockHandle, unlocked: list[Node]) -> None:
        """``handle`` was released; ``unlocked``: the nodes whose full lock went to 0."""

    def before_drop(self, victims: list[Node]) -> None:
        """The device KV of ``victims`` (unlocked leaves) is about to be dropped; nothing
        is changed yet, so a part may refuse (``CheckError``; parts that refuse come before
        parts that copy) or copy it first."""

    def on_drop(self, node: Node) -> None:
        """``node``'s device KV is being dropped (its full slots are not freed yet)."""

    def on_tombstone(self, nodes: list[Node]) -> None:
        """``nodes`` were tombstoned; their SWA KV stays mapped until after this hook."""

    def on_branch_grew(self, node: Node) -> None:
        """``node``, a leaf or a fork, now has exactly one child."""

    def check(self, nodes: list[Node]) -> None:
        """Verify the part's invariants against ``nodes`` (every node but the root)."""
