"""The host tier part (L2) of the radix tree: backup, load back, host eviction, prefetch.

Host values mirror device values by pages in pinned host pools: ``host_full`` and
``host_swa`` a node's host slots, ``host_state`` the host slot of its snapshot. Backed-up
nodes form a rooted subtree (a node's parent is backed up before it), so walking a prefix
never meets a hole. Copies are ordered by the tier's :class:`Transfers`. Only a tree with
a host tier has this part; it reads and refills the device parts it mirrors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hybridkv import kernels
from hybridkv.allocator import HostPool
from hybridkv.errors import CheckError, ensure
from hybridkv.tree.lru import LazyHeap, pop_unheld
from hybridkv.tree.node import Node
from hybridkv.tree.parts import LockHandle, Part
from hybridkv.tree.tier import HostTier

if TYPE_CHECKING:
    from hybridkv.tree.radix import RadixTree


def _pages(slots: torch.Tensor, page_size: int) -> torch.Tensor:
    """The pages of whole-page ``slots``."""
    return slots[::page_size] // page_size


def _slots(pages: torch.Tensor, page_size: int) -> torch.Tensor:
    return (pages[:, None] * page_size + torch.arange(page_size, device=pages.device)).flatten()


class HostPart(Part):
    """Host copies of a tree's device values in the pools of ``host``, and storage (L3)."""

    COUNTERS = ("backed_up_tokens", "cached_full", "cached_swa", "loaded_swa_tokens")

    def __init__(self, tree: RadixTree, host: HostTier) -> None:
        self.tree = tree
        self.host = host
        self.page_size = tree.page_size
        self.cached_full = 0  # tokens with host full KV
        self.cached_swa = 0  # tokens with host SWA KV
        self.backed_up_tokens = 0  # counter: tokens copied to host
        self.loaded_swa_tokens = 0  # counter: SWA KV tokens loaded back from host
        self.lru = LazyHeap(tree.undo)  # host leaves (host-pinned ones are skipped on pop)
        self.state_lru = LazyHeap(tree.undo)  # host state snapshots

    def heaps(self) -> tuple[LazyHeap, ...]:
        return (self.lru, self.state_lru)

    # ---------------------------------------------------------------- hooks

    def on_split(self, upper: Node, lower: Node, k: int) -> None:
        upper.host_lock = lower.host_lock
        if lower.host_full is not None:
            upper.host_full, lower.host_full = lower.host_full[:k], lower.host_full[k:]
        if lower.host_swa is not None:
            upper.host_swa, lower.host_swa = lower.host_swa[:k], lower.host_swa[k:]

    def on_match(self, device: list[Node]) -> None:
        if self.host.write_policy == "write_through_selective":
            self.backup([n for n in device if n.hit_count >= 2][-1:])

    def on_inserted(self, node: Node) -> None:
        if self.host.write_policy == "write_through":
            self.backup([node])

    def on_unlock(self, handle: LockHandle, unlocked: list[Node]) -> None:
        for n in unlocked:
            if n.host_full is not None:
                self.queue(n)

    def before_drop(self, victims: list[Node]) -> None:
        if self.host.write_policy == "write_back":
            self.backup([n for n in victims if not n.on_host])

    def on_tombstone(self, nodes: list[Node]) -> None:
        """Under write-back, copy the SWA KV of tombstoned ``nodes`` to host while it is
        still mapped (with their full KV where they have no host copy: host copies stay
        rooted), so that a later host hit can load the window back. Best effort, as every
        backup: what the host cannot take even after host eviction is not copied."""
        if self.host.write_policy != "write_back" or self.host.swa is None:
            return
        tombstoned = {n.uid for n in nodes}
        self.backup([n for n in nodes if not n.on_host], tombstoned)
        self._backup_swa([n for n in nodes if n.on_host and n.host_swa is None])

    def on_snapshot(self, node: Node) -> None:
        """``node`` got a device snapshot: under a write-through policy, back it up if the
        node is backed up."""
        if self.host.write_policy != "write_back" and node.on_host:
            self.backup_states([node])

    def before_state_drop(self, victims: list[Node]) -> None:
        """The snapshots of ``victims`` are about to be freed: under write-back, back them up."""
        if self.host.write_policy == "write_back":
            self.backup_states([n for n in victims if n.on_host])

    # ---------------------------------------------------------------- backup

    def backup(self, nodes: list[Node], tombstoned: set[int] | None = None) -> int:
        """Copy the device KV of ``nodes`` and of their un-backed ancestors to host.

        Parents go first (SGLang PR 25065 skipped a child whose parent had no host copy,
        and dropped it at eviction). Stops at the first node the host pool cannot take
        even after host eviction, which keeps the backed-up set rooted. One copy per pool.
        ``tombstoned``: uids of nodes just tombstoned whose SWA KV, still mapped, is copied
        too. Returns the tokens backed up.
        """
        host, ps = self.host, self.page_size
        just = tombstoned or set()

        def has_swa(n: Node) -> bool:
            return n.swa or n.uid in just

        todo: list[Node] = []
        seen: set[int] = set()
        for node in nodes:
            for n in reversed(node.path()):
                if not n.on_host and n.uid not in seen:
                    seen.add(n.uid)
                    todo.append(n)
        if not todo:
            return 0
        # NOTE: host eviction below must not take the backed-up ancestors we build on.
        pinned = [n for node in nodes for n in node.path()]
        for n in pinned:
            self.tree.undo.save(n)
            n.host_lock += 1
        need = sum(len(n) for n in todo)
        need_swa = sum(len(n) for n in todo if has_swa(n))
        self.evict(need - host.full.available, need_swa - self._swa_available())
        for n in pinned:
            self.tree.undo.save(n)
            n.host_lock -= 1
        fits, full_left, swa_left = [], host.full.available, self._swa_available()
        for n in todo:
            swa_n = len(n) if has_swa(n) else 0
            if len(n) > full_left or swa_n > swa_left:
                break
            fits.append(n)
            full_left, swa_left = full_left - len(n), swa_left - swa_n
        if not fits:
            return 0
        with host.transfers.side_stream(backup=True):
            dev_pages = torch.cat([_pages(n.full, ps) for n in fits])
            host_pages = host.full.backup(host.kv.page_view(False), dev_pages)
            ensure(host_pages is not None, "a host backup without room")
            with_swa = [n for n in fits if has_swa(n)]
            swa_pages = self._copy_swa(with_swa) if with_swa else None
        offset = swa_offset = 0
        for n in fits:
            k = len(n) // ps
            self.tree.undo.save(n)
            n.host_full = _slots(host_pages[offset : offset + k], ps)
            offset += k
            if has_swa(n):
                self.tree.undo.save(n)
                n.host_swa = _slots(swa_pages[swa_offset : swa_offset + k], ps)
                swa_offset += k
                self.cached_swa += len(n)
            self.cached_full += len(n)
            self.queue(n)
        self.backup_states(fits)
        tokens = sum(len(n) for n in fits)
        self.backed_up_tokens += tokens
        if host.storage is not None:
            self._write_storage(fits)
        return tokens

    def _copy_swa(self, nodes: list[Node]) -> torch.Tensor:
        """Copy the (mapped) device SWA KV of ``nodes`` to new host SWA pages (on the side
        stream already entered); the host pages, in order. The caller made room."""
        ps = self.page_size
        dev_swa = torch.cat([_pages(self.tree.allocator.translate(n.full), ps) for n in nodes])
        pages = self.host.swa.backup(self.host.kv.page_view(True), dev_swa)
        ensure(pages is not None, "a host SWA backup without room")
        return pages

    def _backup_swa(self, nodes: list[Node]) -> None:
        """Copy the device SWA KV of backed-up ``nodes`` without a host SWA copy to host, as
        many as the host SWA pool can take after host eviction (one copy)."""
        if not nodes:
            return
        ps = self.page_size
        pinned = [n for node in nodes for n in node.path()]
        for n in pinned:
            self.tree.undo.save(n)
            n.host_lock += 1
        self.evict(0, sum(len(n) for n in nodes) - self._swa_available())
        for n in pinned:
            self.tree.undo.save(n)
            n.host_lock -= 1
        fits, left = [], self._swa_available()
        for n in nodes:
            if len(n) > left:
                break
            fits.append(n)
            left -= len(n)
        if not fits:
            return
        with self.host.transfers.side_stream(backup=True):
            pages = self._copy_swa(fits)
        offset = 0
        for n in fits:
            k = len(n) // ps
            self.tree.undo.save(n)
            n.host_swa = _slots(pages[offset : offset + k], ps)
            offset += k
            self.cached_swa += len(n)

    def _write_storage(self, nodes: list[Node]) -> None:
        """Write freshly backed-up nodes' host pages to storage (after their copy lands)."""
        host, ps = self.host, self.page_size
        host.transfers.flush()
        for node in nodes:
            keys = host.storage.keys(self.tree.path_tokens(node), ps)[node.start // ps :]
            full = host.full.buf[_pages(node.host_full, ps)]
            swa = None
            if node.host_swa is not None:
                swa = host.swa.buf[_pages(node.host_swa, ps)]
            host.storage.write(keys, full, swa)

    def backup_states(self, nodes: list[Node]) -> None:
        """Copy the snapshots of backed-up ``nodes`` to the host state pool (one copy)."""
        host, states = self.host, self.tree.state_part
        if host.state is None or states is None:
            return
        nodes = [n for n in nodes if n.state is not None and n.host_state is None and n.on_host]
        if not nodes:
            return
        self._evict_states(len(nodes) - host.state.allocator.free_page_count, nodes)
        if host.state.allocator.free_page_count < len(nodes):
            nodes = nodes[: host.state.allocator.free_page_count]
        if not nodes:
            return
        device = states.pool.device
        with host.transfers.side_stream(backup=True):
            got = host.state.backup(states.pool.slot_view(), _t([n.state for n in nodes], device))
        for n, slot in zip(nodes, got.tolist(), strict=True):
            self.tree.undo.save(n)
            n.host_state = slot
            self.state_lru.push(n)

    def _evict_states(self, count: int, keep: list[Node]) -> None:
        """Drop at least ``count`` host snapshots, least recently used first (their nodes keep
        their KV), never one pinned or in ``keep``."""
        if count <= 0:
            return
        skip = {n.uid for n in keep}
        victims = pop_unheld(
            self.state_lru, count, _has_host_state, lambda n: n.host_lock or n.uid in skip
        )
        if victims:
            self.host.state.free(torch.tensor([n.host_state for n in victims]))
        for n in victims:
            self.tree.undo.save(n)
            n.host_state = None

    # ---------------------------------------------------------------- storage

    def storage_reach(self, tokens: list[int], start: int, limit: int) -> int:
        """Where the run of pages of ``tokens[:limit]`` that storage holds from ``start`` (a page
        boundary the tree reaches) ends; ``start`` without storage. Stat only: a corrupt page
        still counts until a read finds it out."""
        host, ps = self.host, self.page_size
        if host.storage is None:
            return start
        limit -= limit % ps
        keys = host.storage.keys(tokens[:limit], ps)[start // ps :]
        return start + host.storage.contains(keys) * ps

    def prefetch(self, tokens: list[int], end: int) -> list[Node]:
        """Read the pages of ``tokens[:end]`` beyond the tree from storage into host memory,
        as host-only nodes a match then loads back. Returns the nodes hung (parent first;
        none when the tree reaches ``end`` already, or the read failed).

        All or nothing: unless every page arrived, with SWA data for the window before
        ``end`` (SGLang PR 27264), and the host pools had room, nothing is kept. Local only:
        the caller agrees ``end`` across TP ranks and drops what one rank kept with
        :meth:`release_prefetched` when another's read failed.
        """
        host, ps, tree = self.host, self.page_size, self.tree
        if host.storage is None or tree.reach(tokens, end)[1] >= end:
            return []
        nodes = tree.walk(tokens, end)
        parent = nodes[-1] if nodes else tree.root
        start = parent.end
        count = (end - start) // ps
        keys = host.storage.keys(tokens[:end], ps)[start // ps :]
        window_start = end
        if tree.swa_part is not None:
            window_start = max(start, tree.swa_part.window_start(end))
        full_pages, swa_pages = self._room(parent, count, (end - window_start) // ps)
        full_buf = torch.empty(count, *host.full.buf.shape[1:], dtype=host.full.buf.dtype)
        swa_buf = (
            None
            if host.swa is None
            else torch.empty(count, *host.swa.buf.shape[1:], dtype=host.swa.buf.dtype)
        )
        read, has_swa = host.storage.read(keys, full_buf, swa_buf)
        first_window_page = (window_start - start) // ps
        arrived = read == count and all(has_swa[first_window_page:read])
        if not arrived or full_pages is None or swa_pages is None:
            if full_pages is not None:
                host.full.free(full_pages)
            if swa_pages is not None and swa_pages.numel():
                host.swa.free(swa_pages)
            return []
        host.full.buf[full_pages] = full_buf
        if swa_pages.numel():
            host.swa.buf[swa_pages] = swa_buf[first_window_page:]
        return self._add_path(parent, tokens, start, window_start, end, full_pages, swa_pages)

    def release_prefetched(self, prefetches: list[tuple[Node, int]]) -> int:
        """Drop what prefetches kept: for each ``(node, start)``, the host-only nodes on the
        path to ``node`` from position ``start`` (what :meth:`prefetch` hung there, however
        later walks split it). Nothing else may hang below them or pin them. Returns the
        host tokens freed."""
        host, ps = self.host, self.page_size
        drop: dict[int, Node] = {}
        for end, start in prefetches:
            for n in end.path():
                if n.start < start:
                    break
                drop[n.uid] = n
        full, swa = [], []
        for n in sorted(drop.values(), key=lambda n: -n.start):
            ensure(
                not n.on_device and not n.host_lock and n.host_state is None,
                "releasing a prefetched node that is on device, pinned or has a snapshot",
            )
            full.append(_pages(n.host_full, ps))
            self.cached_full -= len(n)
            if n.host_swa is not None:
                swa.append(_pages(n.host_swa, ps))
                self.cached_swa -= len(n)
            self.tree.undo.save(n)
            n.host_full = n.host_swa = None
            parent = n.parent
            self.tree.detach(n)
            self.queue(parent)
        if full:
            host.full.free(torch.cat(full))
        if swa:
            host.swa.free(torch.cat(swa))
        return sum(len(n) for n in drop.values())

    def _room(
        self, parent: Node, full_pages: int, swa_pages: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Host pages for a prefetch under ``parent`` (backed up first, so the backed-up set
        stays rooted); ``None`` where a pool is short even after host eviction."""
        host, ps = self.host, self.page_size
        self.backup([parent])
        if parent is not self.tree.root and not parent.on_host:
            return None, None
        pinned = parent.path()
        for n in pinned:
            self.tree.undo.save(n)
            n.host_lock += 1
        self.evict(full_pages * ps - host.full.available, swa_pages * ps - self._swa_available())
        for n in pinned:
            self.tree.undo.save(n)
            n.host_lock -= 1
        full = host.full.allocator.alloc_pages(full_pages)
        if host.swa is None:
            return full, torch.empty(0, dtype=torch.int64)
        return full, host.swa.allocator.alloc_pages(swa_pages)

    def _add_path(
        self,
        parent: Node,
        tokens: list[int],
        start: int,
        window_start: int,
        end: int,
        full_pages: torch.Tensor,
        swa_pages: torch.Tensor,
    ) -> list[Node]:
        """Hang prefetched host-only nodes under ``parent``: SWA KV only in the last window.
        Returns them, parent first."""
        ps, tree = self.page_size, self.tree
        tree.touch()
        added: list[Node] = []
        for a, b in ((start, window_start), (window_start, end)):
            if a == b:
                continue
            node = tree.new_node(tokens[a:b], a, parent)
            self.tree.undo.save(node)
            node.host_full = _slots(full_pages[(a - start) // ps : (b - start) // ps], ps)
            if a == window_start and tree.swa_part is not None:
                self.tree.undo.save(node)
                node.host_swa = _slots(swa_pages, ps)
                self.cached_swa += b - a
            self.cached_full += b - a
            tree.add_host_node(parent, node)
            added.append(node)
            parent = node
        self.queue(parent)
        return added

    # ---------------------------------------------------------------- load back

    def load_back(self, ends: list[Node]) -> int:
        """Copy what the prefixes ending at ``ends`` lack on device back from host: the full
        KV of host-only nodes, and the SWA KV of each prefix's last window. One page copy per
        pool; the map is rebuilt for the loaded SWA.

        The caller made room on the device (admission counted it). Returns tokens loaded.
        """
        host, ps, tree = self.host, self.page_size, self.tree
        alloc, swa = tree.allocator, tree.swa_part
        full_nodes: dict[int, Node] = {}
        swa_nodes: dict[int, Node] = {}
        for end in ends:
            start = end.end if swa is None else swa.window_start(end.end)
            for n in reversed(end.path()):
                if not n.on_device:
                    full_nodes[n.uid] = n
                if n.start >= start and not n.swa:
                    swa_nodes[n.uid] = n
        full_nodes, swa_nodes = list(full_nodes.values()), list(swa_nodes.values())
        n_full = sum(len(n) for n in full_nodes) // ps
        n_swa = sum(len(n) for n in swa_nodes) // ps
        dev_pages, swa_pages = self._take_device_pages(n_full, n_swa)
        host_full = torch.cat([_pages(n.host_full, ps) for n in full_nodes]) if n_full else None
        host_swa = torch.cat([_pages(n.host_swa, ps) for n in swa_nodes]) if n_swa else None
        views = {False: host.kv.page_view(False), True: host.kv.page_view(True)}
        alloc = self.tree.allocator
        alloc.full.keep_contents(views[False], dev_pages)
        if alloc.has_swa:
            alloc.swa.keep_contents(views[True], swa_pages)
        loads = {False: (host.full, host_full, dev_pages), True: (host.swa, host_swa, swa_pages)}
        with host.transfers.side_stream(backup=False):
            if host.transfers.per_layer:
                self._load_by_layer(views, loads)
            else:
                for is_swa, (pool, src, dst) in loads.items():
                    if src is not None:
                        pool.load(views[is_swa], src, dst)
        offset = 0
        for n in full_nodes:
            k = len(n) // ps
            tree.full_part.attach(n, _slots(dev_pages[offset : offset + k], ps))
            offset += k
        offset = 0
        for n in swa_nodes:
            k = len(n) // ps
            alloc.map_swa(n.full, _slots(swa_pages[offset : offset + k], ps))
            offset += k
            swa.restore(n)
        self.loaded_swa_tokens += n_swa * ps
        return n_full * ps

    def _take_device_pages(self, n_full: int, n_swa: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_full`` full and ``n_swa`` SWA device pages for a load back, all or nothing:
        when a pool is short, what was taken goes back and ``CheckError`` is raised (the
        caller made room: admission counted it), nothing else changed."""
        alloc = self.tree.allocator
        full = alloc.full.alloc_pages(n_full)
        swa = None
        if full is not None:
            swa = alloc.swa.alloc_pages(n_swa) if alloc.has_swa else full[:0]
            if swa is None:
                alloc.full.free_pages(full)
        if full is None or swa is None:
            raise CheckError(f"load back without room: {n_full} full, {n_swa} SWA pages")
        return full, swa

    def _load_by_layer(
        self,
        views: dict[bool, torch.Tensor],
        loads: dict[bool, tuple[HostPool, torch.Tensor | None, torch.Tensor]],
    ) -> None:
        """One page copy per layer, each followed by its layer's event (on the side stream).

        NOTE: nothing here waits for the device: the host pages are moved to the device
        once (pinned, ``non_blocking``), the device pages come from the allocator, and
        ``page_copy`` checks values (which would block the host on the side stream once per
        layer) only in debug mode.
        """
        moved = {}
        for swa, (pool, src, dst) in loads.items():
            if src is None:
                continue
            if dst.is_cuda:
                src = src.pin_memory().to(dst.device, non_blocking=True)
            moved[swa] = (pool, src, dst)
        transfers = self.host.transfers
        for layer_id, swa, j in self.host.kv.layers():
            if swa in moved:
                pool, src, dst = moved[swa]
                chunks = slice(2 * j, 2 * j + 2)
                kernels.page_copy(
                    pool.buf[:, chunks], views[swa][:, chunks], src, dst, backend=pool.backend
                )
            transfers.layer_loaded(layer_id)

    def load_state(self, node: Node) -> bool:
        """Bring ``node``'s snapshot back from host (it has none on device); False if it is
        not on host or no slot can be had."""
        states = self.tree.state_part
        if node.host_state is None or states is None:
            return False
        got = self.tree.alloc_state()
        if got is None:
            return False
        device = states.pool.device
        states.pool.allocator.keep_contents(states.pool.slot_view(), _t([got], device))
        with self.host.transfers.side_stream(backup=False):
            self.host.state.load(
                states.pool.slot_view(), _t([node.host_state], "cpu"), _t([got], device)
            )
        states.set(node, got)
        return True

    # ---------------------------------------------------------------- host eviction

    def evict(self, full: int, swa: int = 0) -> int:
        """Free at least ``full`` host tokens (and ``swa`` host SWA tokens) if evictable.

        Host leaves go first, least recently used first; never a locked node or one whose
        host copy is pinned (in flight, or about to be loaded back). A node left with no KV
        anywhere leaves the tree. Returns host full tokens freed.
        """
        host, ps = self.host, self.page_size
        if full <= 0 and swa <= 0:
            return 0
        freed = freed_swa = 0
        full_pages, swa_pages = [], []
        pinned: list[Node] = []  # host leaves whose copy is pinned: skipped, queued again
        while freed < full or freed_swa < swa:
            node = self.lru.pop(self._leaf)
            if node is None:
                break
            if node.host_lock:
                pinned.append(node)
                continue
            parent = node.parent
            full_pages.append(_pages(node.host_full, ps))
            freed += len(node)
            self.cached_full -= len(node)
            if node.host_swa is not None:
                swa_pages.append(_pages(node.host_swa, ps))
                freed_swa += len(node)
                self.cached_swa -= len(node)
            self.tree.undo.save(node)
            node.host_full = node.host_swa = None
            if node.host_state is not None:
                host.state.free(torch.tensor([node.host_state]))
                self.tree.undo.save(node)
                node.host_state = None
            if not node.on_device:
                self.tree.detach(node)
            self.queue(parent)
        for node in pinned:
            self.lru.push(node)
        if full_pages:
            host.full.free(torch.cat(full_pages))
        if swa_pages:
            host.swa.free(torch.cat(swa_pages))
        return freed

    def pin(self, end: Node, start: int, delta: int) -> None:
        """Pin (``+1``) or unpin (``-1``) the host copies of positions ``[start, end.end)`` on
        the path to ``end`` (what a match will load back).

        Walks the path by position, not a list of nodes: a node split in between (by another
        request's match) leaves both halves pinned, and both are on the path. Unpin with the
        same ``start``.
        """
        for node in end.path():
            if node.end <= start:
                break
            self.tree.undo.save(node)
            node.host_lock += delta

    def _leaf(self, node: Node) -> bool:
        """Host-evictable but for a host pin: an unlocked host node with no child on host."""
        if node.parent is None or node.host_full is None or node.full_lock:
            return False
        return not any(c.host_full is not None for c in node.children.values())

    def queue(self, node: Node) -> None:
        """Queue ``node`` for host eviction if it is a host leaf."""
        if self._leaf(node):
            self.lru.push(node)

    def _swa_available(self) -> int:
        return self.host.swa.available if self.host.swa is not None else 0

    # ---------------------------------------------------------------- check

    def check(self, nodes: list[Node]) -> None:
        root = self.tree.root
        host_full = host_swa = 0
        for node in nodes:
            ensure(node.host_lock >= 0, "a negative host lock")
            if node.on_host:
                ensure(node.host_full.numel() == len(node), "a node's host slots")
                ensure(node.parent is root or node.parent.on_host, "a backup whose parent has none")
                host_full += len(node)
            if node.host_swa is not None:
                ensure(node.on_host and node.host_swa.numel() == len(node), "host SWA slots")
                host_swa += len(node)
            ensure(node.host_state is None or node.on_host, "a host snapshot of a node not on host")
        ensure((host_full, host_swa) == (self.cached_full, self.cached_swa), "host counters")
        self._check_pages(nodes)
        self.lru.check([n for n in nodes if self._leaf(n)], "host")
        self.state_lru.check([n for n in nodes if n.host_state is not None], "host state")

    def _check_pages(self, nodes: list[Node]) -> None:
        """Every host page (and host state slot) is free or held by exactly one node."""
        host, ps = self.host, self.page_size
        pools = [(host.full, [_pages(n.host_full, ps) for n in nodes if n.on_host])]
        if host.swa is not None:
            swa = [_pages(n.host_swa, ps) for n in nodes if n.host_swa is not None]
            pools.append((host.swa, swa))
        if host.state is not None:
            held = [n.host_state for n in nodes if n.host_state is not None]
            pools.append((host.state, [torch.tensor(held, dtype=torch.int64)]))
        for pool, pages in pools:
            pages = [pool.allocator.free_pages_view(), *pages]
            count = torch.bincount(torch.cat(pages), minlength=pool.allocator.num_pages)
            ensure(int(count[0]) == 0 and bool((count[1:] == 1).all()), "host pages lost or shared")


def _t(slots: list[int], device: torch.device | str) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.int64, device=device)


def _has_host_state(node: Node) -> bool:
    return node.host_state is not None and node.parent is not None
