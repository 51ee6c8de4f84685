"""The unified radix tree: a compact prefix tree keyed by pages of token ids.

Each node caches whole pages: an unaligned tail is never cached. A node's full KV is its
``full`` slots; its SWA KV is what the allocator's map gives for them (a node is either
all present or all tombstoned: splits keep it so). Memory work is batched: a match or an
insert frees with one allocator call, an eviction with one call per pool.

The tree holds the structure; what is cached lives in its parts (:mod:`hybridkv.tree.parts`),
one per kind of data the model has, each with its own counters and LRU heaps.

SWA usability of a match (window ``w``)::

    positions: 0 ....... L-w ....... L
    SWA:       [tomb ][ present ........]   usable: [L-w, L) all present
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from hybridkv.allocator import StatePool, SWAAllocator
from hybridkv.errors import CheckError, ensure
from hybridkv.tree.full import FullPart
from hybridkv.tree.host import HostPart
from hybridkv.tree.node import Node
from hybridkv.tree.parts import LockHandle, Part
from hybridkv.tree.state import StatePart
from hybridkv.tree.swa import SWA_EVICTION_POLICIES, SWAPart
from hybridkv.tree.tier import HostTier
from hybridkv.undo import UndoLog


@dataclass(frozen=True, slots=True)
class EvictParams:
    """Tokens to free in each pool."""

    full: int = 0
    swa: int = 0


@dataclass(frozen=True, slots=True)
class EvictResult:
    """Tokens freed in each pool (dropping a node's device KV frees both)."""

    full: int
    swa: int


@dataclass(frozen=True, slots=True)
class MatchResult:
    """A cached prefix: on device, the full slots of ``length`` tokens ending at
    ``last_node``; then ``host_nodes``, cached on host only, to load back; ``swa_nodes``
    are the nodes of the prefix's last window whose SWA KV must be loaded back."""

    prefix_slots: torch.Tensor
    last_node: Node
    host_nodes: tuple[Node, ...] = ()
    swa_nodes: tuple[Node, ...] = ()
    state_from_host: bool = False

    @property
    def length(self) -> int:
        return self.prefix_slots.numel()

    @property
    def last_host_node(self) -> Node:
        return self.host_nodes[-1] if self.host_nodes else self.last_node

    @property
    def host_hit_length(self) -> int:
        """Full KV tokens to load back from host."""
        return sum(len(n) for n in self.host_nodes)

    @property
    def swa_host_hit_length(self) -> int:
        """SWA KV tokens of the last window to load back from host."""
        return sum(len(n) for n in self.swa_nodes)

    @property
    def mamba_host_hit_length(self) -> int:
        """Tokens whose recurrent state comes back from host (the prefix's snapshot)."""
        return self.last_host_node.end if self.state_from_host else 0

    @property
    def load_start(self) -> int:
        """First position whose KV (full or SWA) comes back from host."""
        start = self.length
        return min(start, self.swa_nodes[0].start) if self.swa_nodes else start


class RadixTree:
    """Prefix cache over a :class:`SWAAllocator`, composed of one part per kind of data.

    Args:
        allocator: the device pools; the tree frees into them.
        page_size: tokens per page; keys are whole pages.
        window: sliding window in tokens, or ``None`` for a model without SWA layers (no
            SWA part).
        swa_eviction: ``"window"`` keeps each cached branch's last window whole as long as
            anything of the branch is cached; ``"lru"`` tombstones in plain LRU order.
        host: the host tier (pools and write policy), or ``None`` for device only (no host
            part).
        states: the recurrent-state pool for snapshots, or ``None`` for a model without
            recurrent layers (no state part).
        undo: the undo log of the manager's steps (every change a step makes to a node, a
            part or a heap is kept in it); ``None``: a tree on its own.
    """

    def __init__(
        self,
        allocator: SWAAllocator,
        page_size: int,
        window: int | None,
        swa_eviction: str = "window",
        host: HostTier | None = None,
        states: StatePool | None = None,
        undo: UndoLog | None = None,
    ) -> None:
        if swa_eviction not in SWA_EVICTION_POLICIES:
            raise ValueError(f"swa_eviction must be one of {SWA_EVICTION_POLICIES}")
        self.allocator = allocator
        self.page_size = page_size
        self.window = window
        self.host = host
        self.undo = undo or UndoLog()
        empty = torch.empty(0, dtype=torch.int64, device=allocator.device)
        self._uids = itertools.count()
        self.root = Node(uid=next(self._uids), key=[], start=0, parent=None, full=empty)
        self.root.full_lock = 1  # never evicted
        self._clock = 0
        self._live = 0  # nodes in the tree but the root
        self._dead = 0  # nodes detached since the heaps were last compacted
        self.full_part = FullPart(self)
        self.swa_part = None if window is None else SWAPart(self, window, swa_eviction)
        self.state_part = None if states is None else StatePart(self, states)
        self.host_part = None if host is None else HostPart(self, host)
        parts: list[Part | None] = [self.full_part, self.swa_part, self.state_part, self.host_part]
        self.parts: list[Part] = [p for p in parts if p is not None]

    # ---------------------------------------------------------------- counters

    @property
    def cached_full(self) -> int:
        """Tokens with device full KV."""
        return self.full_part.cached

    @property
    def evictable_full(self) -> int:
        """Of those, in nodes without a full lock."""
        return self.full_part.evictable

    @property
    def cached_swa(self) -> int:
        """Tokens with device SWA KV."""
        return 0 if self.swa_part is None else self.swa_part.cached

    @property
    def evictable_swa(self) -> int:
        """Of those, in nodes without an SWA lock."""
        return 0 if self.swa_part is None else self.swa_part.evictable

    @property
    def cached_states(self) -> int:
        """Device state snapshots."""
        return 0 if self.state_part is None else self.state_part.cached

    @property
    def pinned_states(self) -> int:
        """Of those, pinned (``state_lock``): not evictable."""
        return 0 if self.state_part is None else self.state_part.pinned

    @property
    def host_cached_full(self) -> int:
        """Tokens with host full KV."""
        return 0 if self.host_part is None else self.host_part.cached_full

    @property
    def host_cached_swa(self) -> int:
        """Tokens with host SWA KV."""
        return 0 if self.host_part is None else self.host_part.cached_swa

    @property
    def backed_up_tokens(self) -> int:
        """Counter: tokens copied to host."""
        return 0 if self.host_part is None else self.host_part.backed_up_tokens

    @property
    def loaded_swa_tokens(self) -> int:
        """Counter: SWA KV tokens loaded back from host."""
        return 0 if self.host_part is None else self.host_part.loaded_swa_tokens

    # ---------------------------------------------------------------- match

    def match_prefix(self, tokens: list[int], max_len: int | None = None) -> MatchResult:
        """Longest cached prefix of ``tokens[:max_len]`` usable by every layer kind.

        Walks through host-only nodes too: their KV (and the window's SWA KV that is only on
        host) is reported for load back. Splits the node the match ends in, so it ends
        exactly at the prefix. Updates LRU order and hit counts; under
        ``write_through_selective`` backs up what is hit a second time. Locks nothing.
        """
        limit = len(tokens) if max_len is None else min(max_len, len(tokens))
        limit -= limit % self.page_size
        nodes = self.walk(tokens, limit)
        nodes = nodes[: self._usable(nodes)]
        swa_nodes: list[Node] = []
        if self.swa_part is not None and nodes:
            nodes, swa_nodes = self.swa_part.window_to_load(nodes)
        self._clock += 1
        for node in nodes:
            self.undo.save(node, "last_access", "hit_count")
            node.last_access = self._clock
            node.hit_count += 1
        on_device = 0
        while on_device < len(nodes) and nodes[on_device].on_device:
            on_device += 1
        device, host = nodes[:on_device], nodes[on_device:]
        for part in self.parts:
            part.on_match(device)
        last = device[-1] if device else self.root
        slots = torch.cat([n.full for n in device]) if device else self.root.full
        state_from_host = self.state_part is not None and bool(nodes) and nodes[-1].state is None
        return MatchResult(slots, last, tuple(host), tuple(swa_nodes), state_from_host)

    def reach(self, tokens: list[int], limit: int) -> tuple[Node, int]:
        """How far ``tokens[:limit]`` runs into the tree (device or host), without splitting
        or touching anything: the last node it enters (perhaps only partly) and the position
        reached, a page multiple."""
        node, pos, ps = self.root, 0, self.page_size
        limit -= limit % ps
        while pos < limit:
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None:
                break
            node = child
            pos += self._common_len(child.key, tokens, pos, limit)
            if pos < child.end:
                break
        return node, pos

    def usable_ends(self, tokens: list[int], end: int) -> list[bool]:
        """For each page boundary ``p`` in ``(0, end]`` (``end`` a page multiple), whether
        ``match_prefix(tokens, p)`` would match exactly ``p`` tokens (device and host), by
        every part's rule. Read only: no split, no LRU or hit-count update."""
        ps = self.page_size
        pages: list[Node] = []  # one stand-in per page, as a split at its end would leave it
        node = self.root
        while len(pages) * ps < end:
            pos = len(pages) * ps
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None:
                break
            reached = pos + self._common_len(child.key, tokens, pos, end)
            for p in range(pos + ps, reached + 1, ps):
                at_end = p == child.end
                pages.append(
                    Node(
                        uid=-1,
                        key=tokens[p - ps : p],
                        start=p - ps,
                        parent=None,
                        full=child.full,
                        swa=child.swa,
                        host_full=child.host_full,
                        host_swa=child.host_swa,
                        state=child.state if at_end else None,
                        host_state=child.host_state if at_end else None,
                    )
                )
            if reached < child.end:
                break
            node = child
        ok = self._usable_mask(pages)
        return ok + [False] * (end // ps - len(ok))

    def path_tokens(self, node: Node) -> list[int]:
        """The token ids of the whole path to ``node``."""
        return [t for n in reversed(node.path()) for t in n.key]

    def prefix_slots(self, node: Node) -> torch.Tensor:
        """Device full slots of the whole path to ``node`` (every node on it on device)."""
        path = node.path()
        return torch.cat([n.full for n in reversed(path)]) if path else self.root.full

    def walk(self, tokens: list[int], limit: int) -> list[Node]:
        """Nodes with KV (device or host) along ``tokens[:limit]``, the last split to end there."""
        nodes: list[Node] = []
        node, pos, ps = self.root, 0, self.page_size
        while pos < limit:
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None:
                break
            m = self._common_len(child.key, tokens, pos, limit)
            if m < len(child):
                child = self.split(child, m)
            nodes.append(child)
            pos += m
            node = child
        return nodes

    def _usable(self, nodes: list[Node]) -> int:
        """How many of ``nodes`` form the longest prefix every part can use (for SWA: its last
        window has SWA KV on device or host; for recurrent layers: it ends at a snapshot)."""
        ok = self._usable_mask(nodes)
        usable = len(ok)
        while usable and not ok[usable - 1]:
            usable -= 1
        return usable

    def _usable_mask(self, nodes: list[Node]) -> list[bool]:
        """Per node of a matched path: may a prefix end there for every part."""
        ok = [True] * len(nodes)
        for part in self.parts:
            mask = part.usable(nodes)
            if mask is not None:
                ok = [a and b for a, b in zip(ok, mask, strict=True)]
        return ok

    def _common_len(self, key: list[int], tokens: list[int], pos: int, limit: int) -> int:
        """Whole pages of ``key`` equal to ``tokens[pos:limit]`` (the first page is known equal)."""
        ps = self.page_size
        n = min(len(key), limit - pos)
        n -= n % ps
        if key[:n] == tokens[pos : pos + n]:
            return n
        lo, hi = 1, n // ps  # pages: lo match, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if key[: mid * ps] == tokens[pos : pos + mid * ps]:
                lo = mid
            else:
                hi = mid
        return lo * ps

    def begin_step(self) -> None:
        """Keep the tree's and its parts' counters for the running step's undo (nodes and
        heaps are kept as they change)."""
        self.undo.save(self, "_clock", "_live", "_dead")
        for part in self.parts:
            if part.COUNTERS:
                self.undo.save(part, *part.COUNTERS)

    def split(self, node: Node, k: int) -> Node:
        """Split ``node`` after ``k`` tokens; return the new upper part (``node`` keeps the rest).

        Both parts inherit the lock counts: a lock on the node is a lock on both parts; the
        SWA part shares out the SWA pins that start inside the node.
        """
        ps, parent = self.page_size, node.parent
        ensure(parent is not None and 0 < k < len(node), "a split outside a node")
        upper = Node(
            uid=next(self._uids),
            key=node.key[:k],
            start=node.start,
            parent=parent,
            full_lock=node.full_lock,
            last_access=node.last_access,
            hit_count=node.hit_count,
        )
        self.undo.save(parent, "children")
        self.undo.save(node)
        for part in self.parts:
            part.on_split(upper, node, k)
        parent.children[tuple(node.key[:ps])] = upper
        node.key = node.key[k:]
        node.start += k
        node.parent = upper
        upper.children[tuple(node.key[:ps])] = node
        self._live += 1
        return upper

    def split_at(self, node: Node, pos: int) -> None:
        """Make ``pos`` a node boundary on the path to ``node``."""
        for n in node.path():
            if n.start < pos < n.end:
                self.split(n, pos - n.start)
                return

    # ---------------------------------------------------------------- locks

    def inc_lock(self, node: Node, swa_start: int | None = None) -> LockHandle:
        """Pin the full KV of the path to ``node`` and the SWA KV of its nodes from position
        ``swa_start`` on (default: the node's last window; a request sliding past its prefix
        pins less, one whose prefix is still to be loaded back pins the final window), which
        may lie inside a node (no split). A tombstone in that range is pinned too: it is
        about to get its SWA KV back."""
        if self.swa_part is None or node is self.root:
            swa_start = node.end
        else:
            swa_start = self.swa_part.lock_start(node, swa_start)
        handle = LockHandle(node, swa_start)
        path = node.path()
        locked = [n for n in path if n.full_lock == 0]
        for n in path:
            self.undo.save(n, "full_lock")
            n.full_lock += 1
        for part in self.parts:
            part.on_lock(handle, locked)
        return handle

    def dec_lock(self, handle: LockHandle) -> None:
        """Undo :meth:`inc_lock`."""
        path = handle.node.path()
        # NOTE: a path's lock counts only grow upward: its first node has the smallest.
        ensure(not path or path[0].full_lock > 0, "unlocking an unlocked node")
        for n in path:
            self.undo.save(n, "full_lock")
            n.full_lock -= 1
        unlocked = [n for n in path if n.full_lock == 0]
        for part in self.parts:
            part.on_unlock(handle, unlocked)

    def slide_swa_locks(self, handles: list[LockHandle], starts: list[int]) -> list[LockHandle]:
        """Move each lock's SWA pin forward to ``starts[i]`` (at most its node's end), in one
        pass: unpin the SWA KV of ``[old start, new start)`` on each path; full pins stay.

        Equivalent to ``inc_lock(node, start)`` then ``dec_lock(handle)``, without walking
        each path twice or touching its full locks, and without splitting a node (only the
        nodes between the two starts change). Returns the new handles.
        """
        ensure(self.swa_part is not None, "sliding SWA locks of a model without SWA")
        return self.swa_part.slide_locks(handles, starts)

    # ---------------------------------------------------------------- insert

    def insert(
        self, tokens: list[int], slots: torch.Tensor, own_from: int, swa_from: int
    ) -> tuple[Node, torch.Tensor]:
        """Cache ``tokens`` (a whole number of pages) whose full KV is at ``slots``.

        ``slots[:own_from]`` are the tree's own (the caller's locked, matched prefix);
        the rest are the caller's and pass to the tree: as new nodes, or freed as duplicates
        where the tree already holds the tokens. Positions ``>= swa_from`` still have the
        caller's SWA KV (it released the rest): a new node before ``swa_from`` is a tombstone,
        and a tombstoned cached node adopts the caller's SWA KV instead of dropping it.

        Returns the node ending at ``len(tokens)`` and the tree's full slots of ``tokens``
        (where duplicates were freed, they differ from ``slots``).
        """
        ps, n = self.page_size, len(tokens)
        ensure(
            n % ps == 0 and slots.numel() == n and own_from % ps == 0 and swa_from % ps == 0,
            "an insert of partial pages",
        )
        self._clock += 1
        node, pos = self.root, 0
        dups: list[torch.Tensor] = []
        while pos < n:
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None:
                node = self._add_path(node, tokens, slots, pos, swa_from)
                break
            m = self._common_len(child.key, tokens, pos, n)
            if m < len(child):
                child = self.split(child, m)
            lo = max(pos, own_from)
            if lo < child.end:
                adopted = not child.on_device
                # A host-only copy of these tokens: the caller's slots become its device copy.
                ensure(not adopted or lo == child.start, "a host-only node in a locked prefix")
                cached = [child]
                if self.swa_part is not None:
                    upper = self.swa_part.cut(child, max(lo, swa_from))
                    if upper is not None:
                        self.undo.save(upper, "last_access")
                        upper.last_access = self._clock
                        if adopted:
                            cached.insert(0, upper)
                if not adopted:
                    dups.append(slots[lo : child.end])
                for c in cached:
                    for part in self.parts:
                        part.on_cache(c, slots, swa_from, adopted)
            self.undo.save(child, "last_access")
            child.last_access = self._clock
            node, pos = child, child.end
        if dups:
            self.allocator.free(torch.cat(dups))
        for part in self.parts:
            part.on_inserted(node)
        return node, self.prefix_slots(node)

    def _add_path(
        self, parent: Node, tokens: list[int], slots: torch.Tensor, pos: int, swa_from: int
    ) -> Node:
        """Hang ``tokens[pos:]`` under ``parent`` (with SWA: a tombstone up to ``swa_from``,
        then present)."""
        end = len(tokens)
        cuts = {pos, end}
        if self.swa_part is not None:
            cuts.add(min(max(swa_from, pos), end))
        grew = parent if not parent.children else None
        self.undo.save(parent, "children")
        added = []
        for a, b in itertools.pairwise(sorted(cuts)):
            child = self.new_node(tokens[a:b], a, parent)
            parent.children[tuple(tokens[a : a + self.page_size])] = child
            added.append(child)
            parent = child
        self._live += len(added)
        for child in added:
            for part in self.parts:
                part.on_cache(child, slots, swa_from, True)
        if grew is not None:
            self._branch_grew(grew)
        return parent

    # ---------------------------------------------------------------- nodes

    def add_host_node(self, parent: Node, node: Node) -> None:
        """Hang a new host-only ``node`` (its host values set) under ``parent``."""
        grew = parent if not parent.children else None
        self.undo.save(parent, "children")
        parent.children[tuple(node.key[: self.page_size])] = node
        self._live += 1
        if grew is not None:
            self._branch_grew(grew)

    def new_node(self, key: list[int], start: int, parent: Node) -> Node:
        """A node (not yet linked) accessed now."""
        return Node(
            uid=next(self._uids), key=key, start=start, parent=parent, last_access=self._clock
        )

    def touch(self) -> None:
        """Advance the LRU clock (an access that is not a match or an insert)."""
        self._clock += 1

    # ---------------------------------------------------------------- drop

    def drop(self, victims: list[Node], dropped: list[torch.Tensor]) -> None:
        """Drop the device KV of unlocked device leaves ``victims`` (their full slots are
        queued on ``dropped`` for freeing); a node left without KV anywhere leaves the tree.

        A part may refuse (``CheckError``, e.g. a pinned snapshot): then nothing changed, and
        the victims are queued as eviction candidates again."""
        try:
            for part in self.parts:
                part.before_drop(victims)
        except CheckError:
            for node in victims:
                self.full_part.lru.push(node)
                if self.swa_part is not None:
                    self.swa_part.queue(node)
            raise
        for node in victims:
            ensure(node.on_device and node.full_lock == 0, "dropping a locked or host-only node")
            dropped.append(node.full)
            self.undo.save(node)
            for part in self.parts:
                part.on_drop(node)
            parent = node.parent
            if not node.on_host:
                ensure(not node.children, "a node without KV anywhere has children")
                self.detach(node)
            self.full_part.queue(parent)

    def detach(self, node: Node) -> None:
        """Remove a node with no KV anywhere (and no children) from the tree."""
        parent = node.parent
        ensure(parent is not None and not node.children, "detaching an inner node")
        self.undo.save(parent, "children")
        self.undo.save(node, "parent")
        del parent.children[tuple(node.key[: self.page_size])]
        node.parent = None
        self._live -= 1
        self._dead += 1
        if self._dead > self._live + 64:
            # NOTE: entries of detached nodes could outnumber the live ones: drop them.
            for part in self.parts:
                for heap in part.heaps():
                    heap.compact()
            self._dead = 0
        if len(parent.children) == 1:
            self._branch_grew(parent)

    def _branch_grew(self, node: Node) -> None:
        for part in self.parts:
            part.on_branch_grew(node)

    # ---------------------------------------------------------------- evict

    def evict(self, params: EvictParams) -> EvictResult:
        """Free at least ``params.full`` / ``params.swa`` device tokens if that many are evictable.

        Full eviction drops unlocked device leaves in LRU order, cascading to parents that
        become leaves (:class:`FullPart`); SWA eviction then tombstones or drops by the SWA
        policy (:class:`SWAPart`). A dropped node with a host copy stays, host-only; under
        ``write_back`` victims are backed up first. All victims are freed with one call per
        pool; candidates come from the parts' LRU heaps, no scan of the tree.
        """
        full0, swa0 = self.cached_full, self.cached_swa
        dropped: list[torch.Tensor] = []
        tombstoned: list[Node] = []
        self.full_part.evict(params.full, dropped)
        if self.swa_part is not None:
            self.swa_part.evict(params.swa - (swa0 - self.cached_swa), dropped, tombstoned)
        if tombstoned:
            for part in self.parts:
                part.on_tombstone(tombstoned)
            self.allocator.free_swa(torch.cat([n.full for n in tombstoned]), whole_pages=True)
        if dropped:
            self.allocator.free(torch.cat(dropped), whole_pages=True)
        return EvictResult(full0 - self.cached_full, swa0 - self.cached_swa)

    # ---------------------------------------------------------------- states

    def attach_state(self, node: Node, slot: int, owned: bool = False) -> bool:
        """Give ``node`` a snapshot of the state in ``slot``: a copy, or the slot itself when
        ``owned`` (the caller hands it over). False when no slot can be had (it is a cache).
        """
        ensure(self.state_part is not None, "a snapshot in a tree without recurrent state")
        attached = self.state_part.attach(node, slot, owned)
        if attached and self.host_part is not None:
            self.host_part.on_snapshot(node)
        return attached

    def alloc_state(self) -> int | None:
        """One state slot, evicting the least recently used snapshot if none is free."""
        ensure(self.state_part is not None, "a snapshot in a tree without recurrent state")
        if self.state_part.free_count == 0 and self.evict_states(1) and self.host is not None:
            # NOTE: the victim may have been backed up on the side stream just now: the slot
            # is overwritten on the engine's stream, after that copy.
            self.host.transfers.wait_backups()
        return self.state_part.alloc()

    def evict_states(self, count: int) -> int:
        """Drop at least ``count`` unpinned snapshots, least recently used first (backing them
        up first under write-back). Returns how many were dropped."""
        if count <= 0 or self.state_part is None:
            return 0
        victims = self.state_part.pick(count)
        if self.host_part is not None:
            self.host_part.before_state_drop(victims)
        self.state_part.free(victims)
        return len(victims)

    def pin_state(self, node: Node, delta: int) -> None:
        """Pin (``+1``) or unpin (``-1``) ``node``'s snapshot: a copy from it is pending."""
        if self.state_part is not None:
            self.state_part.pin(node, delta)

    def load_state(self, node: Node) -> bool:
        """Bring ``node``'s snapshot back from host if it is only there; False if no slot."""
        if node.state is not None:
            return True
        return self.host_part is not None and self.host_part.load_state(node)

    def state_slots(self) -> list[int]:
        """The device state slots the tree holds (for the manager's conservation check)."""
        return [] if self.state_part is None else self.state_part.held()

    # ---------------------------------------------------------------- host

    def load_back(self, ends: list[Node]) -> int:
        """Copy what the prefixes ending at ``ends`` lack on device back from host (see
        :meth:`HostPart.load_back`). Returns the full tokens loaded."""
        ensure(self.host_part is not None, "a load back without a host tier")
        return self.host_part.load_back(ends)

    def storage_reach(self, tokens: list[int], start: int, limit: int) -> int:
        """Where the pages of ``tokens[:limit]`` that storage holds from ``start`` end (see
        :meth:`HostPart.storage_reach`); ``start`` without storage."""
        if self.host_part is None:
            return start
        return self.host_part.storage_reach(tokens, start, limit)

    def prefetch(self, tokens: list[int], end: int) -> list[Node]:
        """Read what storage holds of ``tokens[:end]`` beyond the tree into host memory, all
        or nothing (see :meth:`HostPart.prefetch`). Returns the nodes hung, parent first."""
        if self.host_part is None:
            return []
        return self.host_part.prefetch(tokens, end)

    def release_prefetched(self, prefetches: list[tuple[Node, int]]) -> int:
        """Drop what prefetches kept (see :meth:`HostPart.release_prefetched`)."""
        ensure(self.host_part is not None, "releasing a prefetch without a host tier")
        return self.host_part.release_prefetched(prefetches)

    def pin_host(self, end: Node, start: int, delta: int) -> None:
        """Pin (``+1``) or unpin (``-1``) the host copies of positions ``[start, end.end)`` on
        the path to ``end`` (see :meth:`HostPart.pin`)."""
        if self.host_part is not None:
            self.host_part.pin(end, start, delta)

    def evict_host(self, full: int, swa: int = 0) -> int:
        """Free at least ``full`` host tokens (and ``swa`` host SWA tokens) if evictable.
        Returns host full tokens freed."""
        return 0 if self.host_part is None else self.host_part.evict(full, swa)

    # ---------------------------------------------------------------- check

    def nodes(self) -> list[Node]:
        """Every node but the root, parents before children."""
        out: list[Node] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def cached_slots(self) -> torch.Tensor:
        """Full slots of every cached token (for the manager's conservation check)."""
        slots = [n.full for n in self.nodes() if n.full is not None]
        return torch.cat(slots) if slots else self.root.full

    def check(self) -> None:
        """Verify the tree's structure and locks, then every part's invariants.

        Raises :class:`CheckError` on the first violation.
        """
        ps = self.page_size
        nodes = self.nodes()
        ensure(self._live == len(nodes), "live node count")
        for node in nodes:
            parent = node.parent
            ensure(
                parent is not None and parent.children.get(tuple(node.key[:ps])) is node,
                "a node not under its parent",
            )
            ensure(len(node) > 0 and len(node) % ps == 0, "a node of partial pages")
            ensure(node.start == parent.end, "a node not starting at its parent's end")
            ensure(node.on_device or node.on_host, "a node with no KV anywhere")
            ensure(node.full_lock >= 0, "a negative full lock")
            ensure(parent is self.root or parent.full_lock >= node.full_lock, "lock not on a path")
            ensure(node.on_device or node.full_lock == 0, "a locked host-only node")
        for part in self.parts:
            part.check(nodes)
