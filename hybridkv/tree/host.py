"""The host tier (L2) of the radix tree: backup, load back and host eviction.

Host values mirror device values by pages in pinned host pools. Backed-up nodes form a
rooted subtree (a node's parent is backed up before it), so walking a prefix never meets
a hole. Copies run on a side CUDA stream; the main stream waits for them before anything
can overwrite a copied page or read a loaded one. On CPU they run synchronously.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from hybridkv import kernels
from hybridkv.allocator import HostPool, KVPool
from hybridkv.tree.node import Node
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
        self.transfers = Transfers(self.kv.full_buf.device)


def _pages(slots: torch.Tensor, page_size: int) -> torch.Tensor:
    """The pages of whole-page ``slots``."""
    return slots[::page_size] // page_size


def _slots(pages: torch.Tensor, page_size: int) -> torch.Tensor:
    return (pages[:, None] * page_size + torch.arange(page_size, device=pages.device)).flatten()


class HostMixin:
    """Host-tier operations; part of :class:`RadixTree` (uses its state and helpers)."""

    def _backup(self, nodes: list[Node]) -> int:
        """Copy the device KV of ``nodes`` and of their un-backed ancestors to host.

        Parents go first (SGLang PR 25065 skipped a child whose parent had no host copy,
        and dropped it at eviction). Stops at the first node the host pool cannot take
        even after host eviction, which keeps the backed-up set rooted. One copy per pool.
        Returns the tokens backed up.
        """
        host, ps = self.host, self.page_size
        if host is None:
            return 0
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
            n.host_lock += 1
        need = sum(len(n) for n in todo)
        need_swa = sum(len(n) for n in todo if n.swa)
        self.evict_host(need - host.full.available, need_swa - self._host_swa_available())
        for n in pinned:
            n.host_lock -= 1
        fits, full_left, swa_left = [], host.full.available, self._host_swa_available()
        for n in todo:
            swa_n = len(n) if n.swa else 0
            if len(n) > full_left or swa_n > swa_left:
                break
            fits.append(n)
            full_left, swa_left = full_left - len(n), swa_left - swa_n
        if not fits:
            return 0
        with host.transfers.side_stream(backup=True):
            dev_pages = torch.cat([_pages(n.full, ps) for n in fits])
            host_pages = host.full.backup(host.kv.page_view(False), dev_pages)
            assert host_pages is not None
            with_swa = [n for n in fits if n.swa]
            swa_pages = None
            if with_swa:
                dev_swa = torch.cat(
                    [_pages(self.allocator.translate(n.full), ps) for n in with_swa]
                )
                swa_pages = host.swa.backup(host.kv.page_view(True), dev_swa)
                assert swa_pages is not None
        offset = swa_offset = 0
        for n in fits:
            k = len(n) // ps
            n.host_full = _slots(host_pages[offset : offset + k], ps)
            offset += k
            if n.swa:
                n.host_swa = _slots(swa_pages[swa_offset : swa_offset + k], ps)
                swa_offset += k
                self.host_cached_swa += len(n)
            self.host_cached_full += len(n)
            self._queue_host(n)
        if self.states is not None:
            self._backup_states(fits)
        tokens = sum(len(n) for n in fits)
        self.backed_up_tokens += tokens
        if host.storage is not None:
            self._write_storage(fits)
        return tokens

    def _write_storage(self, nodes: list[Node]) -> None:
        """Write freshly backed-up nodes' host pages to storage (after their copy lands)."""
        host, ps = self.host, self.page_size
        host.transfers.flush()
        for node in nodes:
            keys = host.storage.keys(self.path_tokens(node), ps)[node.start // ps :]
            full = host.full.buf[_pages(node.host_full, ps)]
            swa = None
            if node.host_swa is not None:
                swa = host.swa.buf[_pages(node.host_swa, ps)]
            host.storage.write(keys, full, swa)

    def prefetch(
        self, tokens: list[int], limit: int, reduce_min: Callable[[list[int]], list[int]]
    ) -> int:
        """Read the pages of ``tokens[:limit]`` that storage holds beyond the tree into host
        memory, as host-only nodes a match then loads back. Returns the tokens prefetched.

        ``reduce_min`` reduces across TP ranks: how many pages to read, then whether all of
        them arrived. The window's SWA pages are all or nothing (SGLang PR 27264): unless
        every page and the window's SWA arrived on every rank, the whole prefetch is released.
        """
        host, ps = self.host, self.page_size
        if host is None or host.storage is None:
            return 0
        limit -= limit % ps
        nodes = self._walk(tokens, limit)
        parent = nodes[-1] if nodes else self.root
        keys = host.storage.keys(tokens[:limit], ps)[parent.end // ps :]
        (count,) = reduce_min([host.storage.contains(keys)])
        if count == 0:
            return 0
        start, end = parent.end, parent.end + count * ps
        window_start = end
        if self.window is not None:
            window_start = max(start, end - self.window)
            window_start -= window_start % ps
        full_pages, swa_pages = self._host_room(parent, count, (end - window_start) // ps)
        full_buf = torch.empty(count, *host.full.buf.shape[1:], dtype=host.full.buf.dtype)
        swa_buf = (
            None
            if host.swa is None
            else torch.empty(count, *host.swa.buf.shape[1:], dtype=host.swa.buf.dtype)
        )
        read, has_swa = host.storage.read(keys[:count], full_buf, swa_buf)
        first_window_page = (window_start - start) // ps
        arrived = int(read == count and all(has_swa[first_window_page:read]))
        if full_pages is None or swa_pages is None:
            arrived = 0
        (arrived,) = reduce_min([arrived])
        if not arrived:
            if full_pages is not None:
                host.full.free(full_pages)
            if swa_pages is not None and swa_pages.numel():
                host.swa.free(swa_pages)
            return 0
        host.full.buf[full_pages] = full_buf
        if swa_pages.numel():
            host.swa.buf[swa_pages] = swa_buf[first_window_page:]
        self._add_host_path(parent, tokens, start, window_start, end, full_pages, swa_pages)
        return count * ps

    def _host_room(
        self, parent: Node, full_pages: int, swa_pages: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Host pages for a prefetch under ``parent`` (backed up first, so the backed-up set
        stays rooted); ``None`` where a pool is short even after host eviction."""
        host, ps = self.host, self.page_size
        self._backup([parent])
        if parent is not self.root and not parent.on_host:
            return None, None
        pinned = parent.path()
        for n in pinned:
            n.host_lock += 1
        self.evict_host(
            full_pages * ps - host.full.available, swa_pages * ps - self._host_swa_available()
        )
        for n in pinned:
            n.host_lock -= 1
        full = host.full.allocator.alloc_pages(full_pages)
        if host.swa is None:
            return full, torch.empty(0, dtype=torch.int64)
        return full, host.swa.allocator.alloc_pages(swa_pages)

    def _add_host_path(
        self,
        parent: Node,
        tokens: list[int],
        start: int,
        window_start: int,
        end: int,
        full_pages: torch.Tensor,
        swa_pages: torch.Tensor,
    ) -> None:
        """Hang prefetched host-only nodes under ``parent``: SWA KV only in the last window."""
        ps = self.page_size
        self._clock += 1
        grew = parent if not parent.children else None
        for a, b in ((start, window_start), (window_start, end)):
            if a == b:
                continue
            node = Node(
                uid=next(self._uids),
                key=tokens[a:b],
                start=a,
                parent=parent,
                full=None,
                swa=False,
                host_full=_slots(full_pages[(a - start) // ps : (b - start) // ps], ps),
                last_access=self._clock,
            )
            if a == window_start and self.window is not None:
                node.host_swa = _slots(swa_pages, ps)
                self.host_cached_swa += b - a
            parent.children[tuple(tokens[a : a + ps])] = node
            self.host_cached_full += b - a
            self._live += 1
            parent = node
        self._queue_host(parent)
        if grew is not None:
            self._on_branch_grew(grew)

    def load_back(self, ends: list[Node]) -> int:
        """Copy what the prefixes ending at ``ends`` lack on device back from host: the full
        KV of host-only nodes, and the SWA KV of each prefix's last window. One page copy per
        pool; the map is rebuilt for the loaded SWA.

        The caller made room on the device (admission counted it). Returns tokens loaded.
        """
        host, ps, alloc = self.host, self.page_size, self.allocator
        assert host is not None
        full_nodes: dict[int, Node] = {}
        swa_nodes: dict[int, Node] = {}
        for end in ends:
            start = 0 if self.window is None else max(0, end.end - self.window)
            for n in reversed(end.path()):
                if not n.on_device:
                    full_nodes[n.uid] = n
                if self.window is not None and n.start >= start - start % ps and not n.swa:
                    swa_nodes[n.uid] = n
        full_nodes, swa_nodes = list(full_nodes.values()), list(swa_nodes.values())
        n_full = sum(len(n) for n in full_nodes) // ps
        n_swa = sum(len(n) for n in swa_nodes) // ps
        dev_pages = alloc.full.alloc_pages(n_full)
        swa_pages = alloc.swa.alloc_pages(n_swa) if alloc.has_swa else dev_pages[:0]
        assert dev_pages is not None and swa_pages is not None, "load back without room"
        host_full = torch.cat([_pages(n.host_full, ps) for n in full_nodes]) if n_full else None
        host_swa = torch.cat([_pages(n.host_swa, ps) for n in swa_nodes]) if n_swa else None
        views = {False: host.kv.page_view(False), True: host.kv.page_view(True)}
        loads = {False: (host.full, host_full, dev_pages), True: (host.swa, host_swa, swa_pages)}
        with host.transfers.side_stream(backup=False):
            if host.transfers.per_layer:
                self._load_by_layer(views, loads)
            else:
                for swa, (pool, src, dst) in loads.items():
                    if src is not None:
                        pool.load(views[swa], src, dst)
        offset = 0
        for n in full_nodes:
            k = len(n) // ps
            n.full = _slots(dev_pages[offset : offset + k], ps)
            offset += k
            self.cached_full += len(n)
            self.evictable_full += len(n) if n.full_lock == 0 else 0
            self._queue_full(n)
        offset = 0
        for n in swa_nodes:
            k = len(n) // ps
            alloc.full_to_swa[n.full] = _slots(swa_pages[offset : offset + k], ps)
            offset += k
            n.swa = True
            self.cached_swa += len(n)
            self.evictable_swa += len(n) if n.swa_lock == 0 else 0
            self._queue_swa(n)
        self.loaded_swa_tokens += n_swa * ps
        return n_full * ps

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

    def evict_host(self, full: int, swa: int = 0) -> int:
        """Free at least ``full`` host tokens (and ``swa`` host SWA tokens) if evictable.

        Host leaves go first, least recently used first; never a locked node or one whose
        host copy is pinned (in flight, or about to be loaded back). A node left with no KV
        anywhere leaves the tree. Returns host full tokens freed.
        """
        host, ps = self.host, self.page_size
        if host is None or (full <= 0 and swa <= 0):
            return 0
        freed = freed_swa = 0
        full_pages, swa_pages = [], []
        pinned: list[Node] = []  # host leaves whose copy is pinned: skipped, queued again
        while freed < full or freed_swa < swa:
            node = self._host_lru.pop(self._host_leaf)
            if node is None:
                break
            if node.host_lock:
                pinned.append(node)
                continue
            parent = node.parent
            full_pages.append(_pages(node.host_full, ps))
            freed += len(node)
            self.host_cached_full -= len(node)
            if node.host_swa is not None:
                swa_pages.append(_pages(node.host_swa, ps))
                freed_swa += len(node)
                self.host_cached_swa -= len(node)
            node.host_full = node.host_swa = None
            if node.host_state is not None:
                host.state.free(torch.tensor([node.host_state]))
                node.host_state = None
            if not node.on_device:
                self._detach(node)
            self._queue_host(parent)
        for node in pinned:
            self._host_lru.push(node)
        if full_pages:
            host.full.free(torch.cat(full_pages))
        if swa_pages:
            host.swa.free(torch.cat(swa_pages))
        return freed

    def pin_host(self, end: Node, start: int, delta: int) -> None:
        """Pin (``+1``) or unpin (``-1``) the host copies of positions ``[start, end.end)`` on
        the path to ``end`` (what a match will load back).

        Walks the path by position, not a list of nodes: a node split in between (by another
        request's match) leaves both halves pinned, and both are on the path. Unpin with the
        same ``start``.
        """
        for node in end.path():
            if node.end <= start:
                break
            node.host_lock += delta

    def _host_leaf(self, node: Node) -> bool:
        """Host-evictable but for a host pin: an unlocked host node with no child on host."""
        if node.parent is None or node.host_full is None or node.full_lock:
            return False
        return not any(c.host_full is not None for c in node.children.values())

    def _queue_host(self, node: Node) -> None:
        """Queue ``node`` for host eviction if it is a host leaf."""
        if self.host is not None and self._host_leaf(node):
            self._host_lru.push(node)

    def _host_swa_available(self) -> int:
        return self.host.swa.available if self.host.swa is not None else 0
