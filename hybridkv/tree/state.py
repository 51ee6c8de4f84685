"""Recurrent-state snapshots in the radix tree (the mamba component).

A node's snapshot is the recurrent state after exactly its ``end`` tokens. A match is
usable for recurrent layers only where it ends at a snapshot; the request's working slot
is then filled by copy, so the snapshot stays intact. Snapshots are evicted by their own
target, LRU, never while pinned (``state_lock``: a copy from it is pending).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybridkv.tree.lru import LazyHeap
from hybridkv.tree.node import Node


def _t(slots: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.int64, device=device)


class StateMixin:
    """Snapshot operations; part of :class:`RadixTree` (uses its state and helpers)."""

    def attach_state(self, node: Node, slot: int, owned: bool = False) -> bool:
        """Give ``node`` a snapshot of the state in ``slot``: a copy, or the slot itself when
        ``owned`` (the caller hands it over). False when no slot can be had (it is a cache).
        """
        states = self.states
        if node.state is not None or node is self.root:
            if owned:
                states.allocator.free_pages(_t([slot], states.buf.device))
            return node.state is not None
        if not owned:
            got = self.alloc_state()
            if got is None:
                return False
            states.copy(_t([slot], states.buf.device), _t([got], states.buf.device))
            slot = got
        node.state = slot
        self.cached_states += 1
        self._state_lru.push(node)
        if self.host is not None and self.host.write_policy != "write_back" and node.on_host:
            self._backup_states([node])
        return True

    def alloc_state(self) -> int | None:
        """One state slot, evicting the least recently used snapshot if none is free."""
        states = self.states
        if states.allocator.free_page_count == 0 and self.evict_states(1) and self.host:
            # NOTE: the victim may have been backed up on the side stream just now: the slot
            # is overwritten on the engine's stream, after that copy.
            self.host.transfers.wait_backups()
        got = states.allocator.alloc_pages(1)
        return None if got is None else int(got[0])

    def evict_states(self, count: int) -> int:
        """Drop at least ``count`` unpinned snapshots, least recently used first (backing them
        up first under write-back). Returns how many were dropped."""
        if count <= 0 or self.states is None:
            return 0
        victims = self._pop_lru(self._state_lru, count, _has_state, lambda n: n.state_lock > 0)
        if self.host is not None and self.host.write_policy == "write_back":
            self._backup_states([n for n in victims if n.on_host])
        self._free_states(victims)
        return len(victims)

    def _free_states(self, nodes: list[Node]) -> None:
        nodes = [n for n in nodes if n.state is not None]
        if not nodes:
            return
        self.states.allocator.free_pages(_t([n.state for n in nodes], self.states.buf.device))
        for n in nodes:
            n.state = None
        self.cached_states -= len(nodes)

    def _backup_states(self, nodes: list[Node]) -> None:
        """Copy the snapshots of backed-up ``nodes`` to the host state pool (one copy)."""
        host = self.host
        nodes = [n for n in nodes if n.state is not None and n.host_state is None and n.on_host]
        if host is None or host.state is None or not nodes:
            return
        self._evict_host_states(len(nodes) - host.state.allocator.free_page_count, nodes)
        if host.state.allocator.free_page_count < len(nodes):
            nodes = nodes[: host.state.allocator.free_page_count]
        if not nodes:
            return
        device = self.states.buf.device
        with host.transfers.side_stream(backup=True):
            got = host.state.backup(self.states.slot_view(), _t([n.state for n in nodes], device))
        for n, slot in zip(nodes, got.tolist(), strict=True):
            n.host_state = slot
            self._host_state_lru.push(n)

    def _evict_host_states(self, count: int, keep: list[Node]) -> None:
        """Drop at least ``count`` host snapshots, least recently used first (their nodes keep
        their KV), never one pinned or in ``keep``."""
        if count <= 0:
            return
        skip = {n.uid for n in keep}
        victims = self._pop_lru(
            self._host_state_lru, count, _has_host_state, lambda n: n.host_lock or n.uid in skip
        )
        if victims:
            self.host.state.free(torch.tensor([n.host_state for n in victims]))
        for n in victims:
            n.host_state = None

    def load_state(self, node: Node) -> bool:
        """Bring ``node``'s snapshot back from host if it is only there; False if no slot."""
        if node.state is not None or node.host_state is None:
            return node.state is not None
        got = self.alloc_state()
        if got is None:
            return False
        device = self.states.buf.device
        with self.host.transfers.side_stream(backup=False):
            self.host.state.load(
                self.states.slot_view(), _t([node.host_state], "cpu"), _t([got], device)
            )
        node.state = got
        self.cached_states += 1
        self._state_lru.push(node)
        return True

    @staticmethod
    def _pop_lru(
        heap: LazyHeap, count: int, valid: Callable[[Node], bool], held: Callable[[Node], bool]
    ) -> list[Node]:
        """Pop the ``count`` least recently used ``valid`` nodes not ``held`` (held ones,
        pinned by a pending copy, are skipped and stay queued)."""
        victims: list[Node] = []
        skipped: list[Node] = []
        while len(victims) < count:
            node = heap.pop(valid)
            if node is None:
                break
            (skipped if held(node) else victims).append(node)
        for node in skipped:
            heap.push(node)
        return victims

    def _check_states(self) -> list[int]:
        """Assert snapshot invariants; return the device slots the tree holds."""
        held = [n.state for n in self._nodes() if n.state is not None]
        assert len(held) == len(set(held)) == self.cached_states, "state snapshots drifted"
        for n in self._nodes():
            assert n.state_lock >= 0
            assert n.host_state is None or n.on_host, "a host snapshot of a node not on host"
        if self.host is not None and self.host.state is not None:
            pool = self.host.state.allocator
            host_held = [n.host_state for n in self._nodes() if n.host_state is not None]
            pages = torch.cat([pool.free_pages_view(), torch.tensor(host_held, dtype=torch.int64)])
            count = torch.bincount(pages, minlength=pool.num_pages)
            assert int(count[0]) == 0 and bool((count[1:] == 1).all()), "host state slots lost"
        return held


def _has_state(node: Node) -> bool:
    return node.state is not None and node.parent is not None


def _has_host_state(node: Node) -> bool:
    return node.host_state is not None and node.parent is not None
