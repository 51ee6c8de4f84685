"""The unified radix tree: a compact prefix tree keyed by pages of token ids.

Each node caches whole pages: an unaligned tail is never cached. A node's full KV is its
``full`` slots; its SWA KV is what the allocator's map gives for them (a node is either
all present or all tombstoned: splits keep it so). Memory work is batched: a match or an
insert frees with one allocator call, an eviction with one call per pool.

SWA usability of a match (window ``w``)::

    positions: 0 ....... L-w ....... L
    SWA:       [tomb ][ present ........]   usable: [L-w, L) all present
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from hybridkv.allocator import StatePool, SWAAllocator
from hybridkv.tree.evict import EvictionMixin
from hybridkv.tree.host import HostMixin, HostTier
from hybridkv.tree.lru import LazyHeap
from hybridkv.tree.node import Node
from hybridkv.tree.state import StateMixin

SWA_EVICTION_POLICIES = ("window", "lru")


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


@dataclass(frozen=True, slots=True)
class LockHandle:
    """What ``inc_lock`` locked: the path to ``node``, SWA from position ``swa_start``."""

    node: Node
    swa_start: int


class RadixTree(EvictionMixin, HostMixin, StateMixin):
    """Prefix cache over a :class:`SWAAllocator`.

    Args:
        allocator: the device pools; the tree frees into them.
        page_size: tokens per page; keys are whole pages.
        window: sliding window in tokens, or ``None`` for a model without SWA layers.
        swa_eviction: ``"window"`` keeps each cached branch's last window whole as long as
            anything of the branch is cached; ``"lru"`` tombstones in plain LRU order.
        host: the host tier (pools and write policy), or ``None`` for device only.
        states: the recurrent-state pool for snapshots, or ``None`` for a model without
            recurrent layers.
    """

    def __init__(
        self,
        allocator: SWAAllocator,
        page_size: int,
        window: int | None,
        swa_eviction: str = "window",
        host: HostTier | None = None,
        states: StatePool | None = None,
    ) -> None:
        if swa_eviction not in SWA_EVICTION_POLICIES:
            raise ValueError(f"swa_eviction must be one of {SWA_EVICTION_POLICIES}")
        self.allocator = allocator
        self.page_size = page_size
        self.window = window
        self.swa_eviction = swa_eviction
        self.host = host
        self.states = states
        empty = torch.empty(0, dtype=torch.int64, device=allocator.device)
        self._uids = itertools.count()
        self.root = Node(
            uid=next(self._uids), key=[], start=0, parent=None, full=empty, swa=window is not None
        )
        self.root.full_lock = self.root.swa_lock = 1  # never evicted
        self.cached_full = 0  # tokens with device full KV
        self.cached_swa = 0  # tokens with device SWA KV
        self.evictable_full = 0  # of those, in nodes without a full lock
        self.evictable_swa = 0  # of those, in nodes without an SWA lock
        self.host_cached_full = 0  # tokens with host full KV
        self.host_cached_swa = 0  # tokens with host SWA KV
        self.backed_up_tokens = 0  # counter: tokens copied to host
        self.loaded_swa_tokens = 0  # counter: SWA KV tokens loaded back from host
        self.cached_states = 0  # device state snapshots
        self._clock = 0
        # Eviction candidates by kind, LRU first (hybridkv.tree.lru): no eviction scans.
        self._full_lru = LazyHeap()  # device nodes droppable for full eviction
        self._swa_lru = LazyHeap()  # unlocked SWA nodes (window policy: maybe unprotected)
        self._swa_kept = LazyHeap()  # unlocked SWA nodes found protected (window policy)
        self._host_lru = LazyHeap()  # host leaves (host-pinned ones are skipped on pop)
        self._state_lru = LazyHeap()  # device state snapshots
        self._host_state_lru = LazyHeap()  # host state snapshots
        self._live = 0  # nodes in the tree but the root
        self._dead = 0  # nodes detached since the heaps were last compacted

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
        nodes = self._walk(tokens, limit)
        nodes = nodes[: self._usable(nodes)]
        swa_nodes: list[Node] = []
        if self.window is not None:
            if nodes:
                start = max(0, nodes[-1].end - self.window)
                start -= start % self.page_size
                if any(n.end > start and not n.swa for n in nodes):
                    # NOTE: split at the window start: only the window's SWA is loaded back.
                    self._split_at(nodes[-1], start)
                    nodes = list(reversed(nodes[-1].path()))
                    swa_nodes = [n for n in nodes if n.start >= start and not n.swa]
        self._clock += 1
        for node in nodes:
            node.last_access = self._clock
            node.hit_count += 1
        on_device = 0
        while on_device < len(nodes) and nodes[on_device].on_device:
            on_device += 1
        device, host = nodes[:on_device], nodes[on_device:]
        if self.host is not None and self.host.write_policy == "write_through_selective":
            self._backup([n for n in device if n.hit_count >= 2][-1:])
        last = device[-1] if device else self.root
        slots = torch.cat([n.full for n in device]) if device else self.root.full
        state_from_host = bool(nodes) and self.states is not None and nodes[-1].state is None
        return MatchResult(slots, last, tuple(host), tuple(swa_nodes), state_from_host)

    def path_tokens(self, node: Node) -> list[int]:
        """The token ids of the whole path to ``node``."""
        return [t for n in reversed(node.path()) for t in n.key]

    def prefix_slots(self, node: Node) -> torch.Tensor:
        """Device full slots of the whole path to ``node`` (every node on it on device)."""
        path = node.path()
        return torch.cat([n.full for n in reversed(path)]) if path else self.root.full

    def _walk(self, tokens: list[int], limit: int) -> list[Node]:
        """Nodes with KV (device or host) along ``tokens[:limit]``, the last split to end there."""
        nodes: list[Node] = []
        node, pos, ps = self.root, 0, self.page_size
        while pos < limit:
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None:
                break
            m = self._common_len(child.key, tokens, pos, limit)
            if m < len(child):
                child = self._split(child, m)
            nodes.append(child)
            pos += m
            node = child
        return nodes

    def _usable(self, nodes: list[Node]) -> int:
        """How many of ``nodes`` form the longest prefix every layer kind can use: its last
        window has SWA KV (device or host), and it ends at a recurrent-state snapshot."""
        usable, run_start = 0, 0
        for i, node in enumerate(nodes):
            swa_ok = True
            if self.window is not None:
                if not node.swa and node.host_swa is None:
                    run_start = node.end
                    continue
                swa_ok = run_start == 0 or node.end - run_start >= self.window
            state_ok = self.states is None or node.state is not None or node.host_state is not None
            if swa_ok and state_ok:
                usable = i + 1
        return usable

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

    def _split(self, node: Node, k: int) -> Node:
        """Split ``node`` after ``k`` tokens; return the new upper part (``node`` keeps the rest).

        Both parts inherit the lock counts: every lock covers whole nodes (locks split the
        node at their window start), so a lock on the node is a lock on both parts.
        """
        ps = self.page_size
        upper = Node(
            uid=next(self._uids),
            key=node.key[:k],
            start=node.start,
            parent=node.parent,
            full=None if node.full is None else node.full[:k],
            swa=node.swa,
            host_full=None if node.host_full is None else node.host_full[:k],
            host_swa=None if node.host_swa is None else node.host_swa[:k],
            full_lock=node.full_lock,
            swa_lock=node.swa_lock,
            host_lock=node.host_lock,
            last_access=node.last_access,
            hit_count=node.hit_count,
        )
        assert node.parent is not None
        node.parent.children[tuple(node.key[:ps])] = upper
        node.key = node.key[k:]
        node.full = None if node.full is None else node.full[k:]
        node.host_full = None if node.host_full is None else node.host_full[k:]
        node.host_swa = None if node.host_swa is None else node.host_swa[k:]
        node.start += k
        node.parent = upper
        upper.children[tuple(node.key[:ps])] = node
        self._live += 1
        self._queue_swa(upper)
        return upper

    # ---------------------------------------------------------------- locks

    def inc_lock(self, node: Node, swa_start: int | None = None) -> LockHandle:
        """Pin the full KV of the path to ``node`` and the SWA KV of its nodes from position
        ``swa_start`` on (default: the node's last window; a request sliding past its prefix
        pins less, one whose prefix is still to be loaded back pins the final window). A
        tombstone in that range is pinned too: it is about to get its SWA KV back."""
        if self.window is None or node is self.root:
            swa_start = node.end
        else:
            if swa_start is None:
                swa_start = max(0, node.end - self.window)
                swa_start -= swa_start % self.page_size
            swa_start = min(swa_start, node.end)
            self._split_at(node, swa_start)
        for n in node.path():
            if n.full_lock == 0:
                self.evictable_full -= len(n)
            n.full_lock += 1
            if n.start >= swa_start:
                if n.swa_lock == 0 and n.swa:
                    self.evictable_swa -= len(n)
                n.swa_lock += 1
        return LockHandle(node, swa_start)

    def dec_lock(self, handle: LockHandle) -> None:
        """Undo :meth:`inc_lock`."""
        for n in handle.node.path():
            n.full_lock -= 1
            if n.full_lock == 0:
                self.evictable_full += len(n)
                self._queue_full(n)
                if n.host_full is not None:
                    self._queue_host(n)
            if n.start >= handle.swa_start:
                n.swa_lock -= 1
                if n.swa_lock == 0 and n.swa:
                    self.evictable_swa += len(n)
                    self._swa_lru.push(n)
            assert n.full_lock >= 0 and n.swa_lock >= 0, "unlocking an unlocked node"

    def slide_swa_locks(self, handles: list[LockHandle], starts: list[int]) -> list[LockHandle]:
        """Move each lock's SWA pin forward to ``starts[i]`` (at most its node's end), in one
        pass: unpin the SWA KV of ``[old start, new start)`` on each path; full pins stay.

        Equivalent to ``inc_lock(node, start)`` then ``dec_lock(handle)``, without walking
        each path twice or touching its full locks. Returns the new handles.
        """
        moved = []
        for handle, start in zip(handles, starts, strict=True):
            node, old = handle.node, handle.swa_start
            start = min(start, node.end)
            assert start >= old, "an SWA pin only slides forward"
            self._split_at(node, start)
            for n in node.path():
                if n.start < old:
                    break
                if n.start < start:
                    n.swa_lock -= 1
                    assert n.swa_lock >= 0, "unlocking an unlocked node"
                    if n.swa_lock == 0 and n.swa:
                        self.evictable_swa += len(n)
                        self._swa_lru.push(n)
            moved.append(LockHandle(node, start))
        return moved

    def _split_at(self, node: Node, pos: int) -> None:
        """Make ``pos`` a node boundary on the path to ``node``."""
        for n in node.path():
            if n.start < pos < n.end:
                self._split(n, pos - n.start)
                return

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
        assert n % ps == 0 and slots.numel() == n and own_from % ps == 0 and swa_from % ps == 0
        windowed = self.window is not None
        self._clock += 1
        node, pos = self.root, 0
        dups: list[torch.Tensor] = []
        path: list[torch.Tensor] = [self.root.full]
        while pos < n:
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None:
                node = self._add_path(node, tokens, slots, pos, swa_from if windowed else n)
                path.append(slots[pos:])
                break
            m = self._common_len(child.key, tokens, pos, n)
            if m < len(child):
                child = self._split(child, m)
            lo = max(pos, own_from)
            if lo < child.end and not child.on_device:
                # A host-only copy of these tokens: the caller's slots become its device copy.
                assert lo == child.start, "a host-only node inside the caller's locked prefix"
                if windowed and child.start < swa_from < child.end:
                    upper = self._split(child, swa_from - child.start)
                    self._adopt_full(upper, slots, swa=False)
                    path.append(upper.full)
                self._adopt_full(child, slots, swa=windowed and child.start >= swa_from)
            elif lo < child.end:
                adopt_from = max(lo, swa_from)
                if windowed and not child.swa and adopt_from < child.end:
                    if adopt_from > child.start:
                        upper = self._split(child, adopt_from - child.start)
                        upper.last_access = self._clock
                        path.append(upper.full)
                    self.allocator.adopt_swa(child.full, slots[child.start : child.end])
                    child.swa = True
                    self.cached_swa += len(child)
                    if child.swa_lock == 0:
                        self.evictable_swa += len(child)
                        self._swa_lru.push(child)
                dups.append(slots[lo : child.end])
            child.last_access = self._clock
            path.append(child.full)
            node, pos = child, child.end
        if dups:
            self.allocator.free(torch.cat(dups))
        if self.host is not None and self.host.write_policy == "write_through":
            self._backup([node])
        return node, torch.cat(path)

    def _adopt_full(self, node: Node, slots: torch.Tensor, swa: bool) -> None:
        """Give a host-only node the caller's device slots of its tokens."""
        node.full = slots[node.start : node.end]
        node.swa = swa
        self.cached_full += len(node)
        self.evictable_full += len(node) if node.full_lock == 0 else 0
        if swa:
            self.cached_swa += len(node)
            self.evictable_swa += len(node) if node.swa_lock == 0 else 0
        self._queue_full(node)
        self._queue_swa(node)

    def _add_path(
        self, parent: Node, tokens: list[int], slots: torch.Tensor, pos: int, swa_from: int
    ) -> Node:
        """Hang ``tokens[pos:]`` under ``parent``: a tombstone up to ``swa_from``, then present."""
        cuts = sorted({pos, min(max(swa_from, pos), len(tokens)), len(tokens)})
        grew = parent if not parent.children else None
        for a, b in itertools.pairwise(cuts):
            child = Node(
                uid=next(self._uids),
                key=tokens[a:b],
                start=a,
                parent=parent,
                full=slots[a:b],
                swa=self.window is not None and a >= swa_from,
                last_access=self._clock,
            )
            parent.children[tuple(tokens[a : a + self.page_size])] = child
            self.cached_full += b - a
            self.evictable_full += b - a
            if child.swa:
                self.cached_swa += b - a
                self.evictable_swa += b - a
                self._swa_lru.push(child)
            parent = child
        self._live += len(cuts) - 1
        self._full_lru.push(parent)
        if grew is not None:
            self._on_branch_grew(grew)
        return parent

    def _detach(self, node: Node) -> None:
        """Remove a node with no KV anywhere (and no children) from the tree."""
        parent = node.parent
        assert parent is not None and not node.children
        del parent.children[tuple(node.key[: self.page_size])]
        node.parent = None
        self._live -= 1
        self._dead += 1
        if self._dead > self._live + 64:
            # NOTE: entries of detached nodes could outnumber the live ones: drop them.
            for heap in self._heaps():
                heap.compact()
            self._dead = 0
        if len(parent.children) == 1:
            self._on_branch_grew(parent)

    def _heaps(self) -> tuple[LazyHeap, ...]:
        return (
            self._full_lru,
            self._swa_lru,
            self._swa_kept,
            self._host_lru,
            self._state_lru,
            self._host_state_lru,
        )

    def _nodes(self) -> list[Node]:
        """Every node but the root, parents before children."""
        out: list[Node] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    # ---------------------------------------------------------------- check

    def cached_slots(self) -> torch.Tensor:
        """Full slots of every cached token (for the manager's conservation check)."""
        slots = [n.full for n in self._nodes() if n.full is not None]
        return torch.cat(slots) if slots else self.root.full

    def check(self) -> None:
        """Assert the tree's structure, counters, lock counts and host invariants."""
        ps = self.page_size
        cached_full = cached_swa = evictable_full = evictable_swa = host_full = host_swa = 0
        swa_map = self.allocator.full_to_swa
        for node in self._nodes():
            parent = node.parent
            assert parent is not None and parent.children[tuple(node.key[:ps])] is node
            assert len(node) > 0 and len(node) % ps == 0 and node.start == parent.end
            assert node.on_device or node.on_host, "a node with no KV anywhere"
            assert node.full_lock >= 0 and node.swa_lock >= 0 and node.host_lock >= 0
            assert parent is self.root or parent.full_lock >= node.full_lock, "lock not on a path"
            if node.on_host:
                assert node.host_full.numel() == len(node)
                assert parent is self.root or parent.on_host, "a backup whose parent has none"
                host_full += len(node)
            if node.host_swa is not None:
                assert node.on_host and node.host_swa.numel() == len(node)
                host_swa += len(node)
            if not node.on_device:
                assert not node.swa and node.full_lock == 0, "a locked or SWA host-only node"
                continue
            assert node.full.numel() == len(node)
            assert parent is self.root or parent.on_device, "a device node under a host-only one"
            cached_full += len(node)
            evictable_full += len(node) if node.full_lock == 0 else 0
            if self.window is None:
                assert not node.swa and node.swa_lock == 0 and node.host_swa is None
                continue
            mapped = swa_map[node.full] != 0
            assert bool(mapped.all()) if node.swa else not bool(mapped.any()), "SWA map mismatch"
            if node.swa:
                cached_swa += len(node)
                evictable_swa += len(node) if node.swa_lock == 0 else 0
        assert (cached_full, cached_swa) == (self.cached_full, self.cached_swa), "cached counters"
        assert (evictable_full, evictable_swa) == (self.evictable_full, self.evictable_swa), (
            "evictable counters"
        )
        assert (host_full, host_swa) == (self.host_cached_full, self.host_cached_swa), "host"
        if self.host is not None:
            self._check_host_pages()
        if self.states is not None:
            self._check_states()
        self._check_lru()

    def _check_host_pages(self) -> None:
        """Every host page is free or held by exactly one node."""
        ps = self.page_size
        pools = [(self.host.full, [n.host_full for n in self._nodes() if n.on_host])]
        if self.host.swa is not None:
            swa = [n.host_swa for n in self._nodes() if n.host_swa is not None]
            pools.append((self.host.swa, swa))
        for pool, held in pools:
            pages = [pool.allocator.free_pages_view()] + [s[::ps] // ps for s in held]
            count = torch.bincount(torch.cat(pages), minlength=pool.allocator.num_pages)
            assert int(count[0]) == 0 and bool((count[1:] == 1).all()), "host pages lost or shared"
