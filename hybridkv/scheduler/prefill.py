"""Admission of waiting requests (and the chunked one): match, budget, load back, allocate."""

from __future__ import annotations

import numpy as np
import torch

from hybridkv import kernels
from hybridkv.allocator import StatePool, SWAAllocator
from hybridkv.errors import ensure
from hybridkv.scheduler.adder import PrefillAdder
from hybridkv.scheduler.admission import Admission
from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.cost import NO_LOAD, Cost
from hybridkv.scheduler.pages import PlanBuilder
from hybridkv.scheduler.plan import StepBatch, StepPlan
from hybridkv.scheduler.queues import Queues
from hybridkv.scheduler.records import Admitted, ReqState, prefix_load
from hybridkv.scheduler.swa_slide import SWASlide
from hybridkv.scheduler.table import RequestTable
from hybridkv.scheduler.tp import TPSync
from hybridkv.tree import MatchResult, RadixTree
from hybridkv.undo import UndoLog


class Prefill:
    """Plans prefill steps: the chunked request's next chunk, then waiting requests in order
    while every pool has room for what they cost (the one cost function)."""

    def __init__(
        self,
        config: CacheConfig,
        table: RequestTable,
        queues: Queues,
        tree: RadixTree,
        allocator: SWAAllocator,
        states: StatePool | None,
        admission: Admission,
        slide: SWASlide,
        pages: PlanBuilder,
        tp: TPSync,
        counters: dict[str, int],
        undo: UndoLog,
    ) -> None:
        self.config = config
        self.table = table
        self.queues = queues
        self.tree = tree
        self.allocator = allocator
        self.states = states
        self.admission = admission
        self.slide = slide
        self.pages = pages
        self.tp = tp
        self.counters = counters
        self.undo = undo

    def schedule(self) -> StepPlan | None:
        q, t, adm = self.queues, self.table, self.admission
        if q.chunked is None and not q.waiting:
            return None
        adder = PrefillAdder(self.config, adm.running_reservation())
        admitted: list[Admitted] = []
        chunked = q.chunked
        if chunked is not None:
            row = chunked.row
            self.slide.release(np.array([row], dtype=np.int64))
            held = adm.swa_held(chunked)
            start, fill_len = int(t.kv_len[row]), int(t.fill_len[row])
            granted = adder.admit(
                adm.rooms(), start, fill_len - start, adm.decode_reserve(chunked, False), held
            )
            if granted is None:
                return None
            admitted.append(Admitted(chunked, start, fill_len, granted))
        for req in q.waiting:
            if len(admitted) - (chunked is not None) == t.free_rows:
                break
            if admitted and not admitted[-1].completes:
                break  # a partial chunk took what was left
            a = self._admit_new(req, adder, bool(admitted))
            if a is None:
                break
            admitted.append(a)
        if not admitted:
            return None
        for a in admitted:
            if a.match is not None:
                q.pop_waiting()
                t.take(a.req, a.start)
        plan = self._extend(admitted)
        q.set_chunked(None)
        for a in admitted:
            if a.completes:
                q.start(a.req)
            else:
                q.set_chunked(a.req)
        return plan

    def _admit_new(self, req: ReqState, adder: PrefillAdder, others: bool) -> Admitted | None:
        """Match a waiting request, pin what its admission counts on and offer its first chunk
        to ``adder``; ``None`` (everything undone) when it does not fit.

        Pinned until the step uses them: the device prefix and its window's SWA (the lock),
        the host copies to load back and, with recurrent layers, the snapshot that seeds the
        working state (on device, and its host copy when it comes back from there: a backup
        during this step's eviction could otherwise drop it to make host room).
        """
        adm = self.admission
        match = self._match(req)
        lock = self.tree.inc_lock(match.last_node, adm.window_start(match.last_host_node.end))
        seed = match.last_host_node if self.states is not None else None
        load_start = match.load_start
        if match.state_from_host:
            load_start = min(load_start, seed.start)
        self.tree.pin_host(match.last_host_node, load_start, +1)
        load = prefix_load(match)
        prefix_len = match.length + match.host_hit_length
        self.table.set_lock(req, lock)
        if seed is not None:
            self.tree.pin_state(seed, +1)  # its snapshot seeds the working state
        fill_len = len(req.fill_ids)
        granted = adder.admit(
            adm.rooms(),
            prefix_len,
            fill_len - prefix_len,
            adm.decode_reserve(req, others),
            adm.swa_held(req, match),
            load,
            new=True,
        )
        if granted is None:
            if seed is not None:
                self.tree.pin_state(seed, -1)
            self.tree.pin_host(match.last_host_node, load_start, -1)
            self.tree.dec_lock(lock)
            self.table.set_lock(req, None)
            return None
        return Admitted(req, prefix_len, fill_len, granted, match, load, load_start)

    def _extend(self, admitted: list[Admitted]) -> StepPlan:
        """Evict what the batch lacks, load back matched host KV, allocate the new tokens in one
        call per pool, and fill req_to_token. Each of those draws what it takes from its
        request's reservation (admission's figures, not a recomputation)."""
        cfg, ps, t = self.config, self.config.page_size, self.table
        starts = np.array([a.start for a in admitted], dtype=np.int64)
        chunks = np.array([a.chunk for a in admitted], dtype=np.int64)
        seq_lens = starts + chunks
        pages = (seq_lens + ps - 1) // ps - (starts + ps - 1) // ps
        swa = cfg.window is not None
        for n, a in zip(pages.tolist(), admitted, strict=True):
            # NOTE: both pools take n pages (SWA pages are paired with full pages); drawn
            # before the pools are touched.
            a.reservation.draw(Cost(n * ps, n * ps if swa else 0), f"alloc_extend of {a.req.rid!r}")
        load = sum((a.load for a in admitted), NO_LOAD)
        new_pages = int(pages.sum())
        new_tokens = new_pages * ps
        self.admission.make_room(new_tokens + load.full, new_tokens + load.swa if swa else 0)
        if self.states is not None:
            new = sum(1 for a in admitted if a.match is not None)
            self.tree.evict_states(new + load.state - self.states.available)
        new = [a for a in admitted if a.match is not None]
        prefixes = self._take_prefixes(new)
        rows = np.array([a.req.row for a in admitted], dtype=np.int64)
        write_lens = np.array([a.start if a.match is not None else 0 for a in admitted])
        batch = StepBatch(
            rids=[a.req.rid for a in admitted],
            rows=rows,
            extend_starts=starts,
            extend_lens=chunks,
            qo_indptr=np.concatenate(([0], np.cumsum(chunks))),
            is_decode=False,
            produces_token=np.array([a.completes for a in admitted], dtype=bool),
            cached_lens=np.array([a.match.length if a.match else 0 for a in admitted]),
            loaded_lens=np.array([a.load.full for a in admitted], dtype=np.int64),
            state_slots=np.array([a.req.state_slot for a in admitted], dtype=np.int64),
        )
        last = t.flat_positions(rows, np.maximum(starts - 1, 0))
        inputs = self.pages.inputs(batch, last, write_lens.astype(np.int64))
        last_dev, write_lens_dev = inputs.extra
        last_loc = t.flat.index_select(0, last_dev).long()
        out = self.allocator.alloc_extend(
            starts, seq_lens, last_loc, (inputs.extend_starts, inputs.seq_lens), new_pages
        )
        ensure(out is not None, "admitted batch does not fit after eviction")
        kernels.write_req_to_token(
            t.req_to_token,
            inputs.rows,
            torch.cat(prefixes) if prefixes else out[:0],
            write_lens_dev,
            out,
            inputs.extend_starts,
            inputs.seq_lens - inputs.extend_starts,
            backend=cfg.backend,
        )
        t.alloc_len[rows] = seq_lens
        return self.pages.build(batch, out, inputs)

    def _match(self, req: ReqState) -> MatchResult:
        """Prefetch from storage, then match: the same result on every TP rank.

        Every rank makes the same collective calls whatever its local state: one MIN
        reduction for the prefetch, one for the match lengths; a rank that matched more than
        another (its trees drifted) re-matches to the common length.
        """
        limit = len(req.fill_ids) - 1
        self.undo.save(req, "prefetched")
        req.prefetched += self.tree.prefetch(req.fill_ids, limit, self.tp.reduce_min)
        match = self.tree.match_prefix(req.fill_ids, limit)
        local = [match.length, match.host_hit_length, match.swa_host_hit_length]
        common = self.tp.reduce_min(local)
        if common != local:
            match = self.tree.match_prefix(req.fill_ids, common[0] + common[1])
        return match

    def _take_prefixes(self, new: list[Admitted]) -> list[torch.Tensor]:
        """Load the new requests' host hits back (one call per pool), move each lock to the end
        of its whole prefix, and return each prefix's device slots."""
        t = self.table
        loading = [a for a in new if a.load.full or a.load.swa]
        if loading:
            self._load_back(loading)
        if self.states is not None:
            self._seed_states(new)
        prefixes = []
        for a in new:
            req, match = a.req, a.match
            if a.load.full or a.load.swa:
                lock = self.tree.inc_lock(match.last_host_node)
                self.tree.dec_lock(req.lock)
                t.set_lock(req, lock)
            self.tree.pin_host(match.last_host_node, a.load_start, -1)
            t.cached_len[req.row] = t.released[req.row] = a.start
            # NOTE: the tiers partition the prompt: what its prefetches read from storage is
            # a storage hit, not a host hit too (it reaches the device through the host).
            from_storage = min(req.prefetched, a.load.full)
            self.undo.save(req, "prefetched")
            req.prefetched = 0
            self.counters["device_hit_tokens"] += match.length
            self.counters["host_hit_tokens"] += a.load.full - from_storage
            self.counters["storage_hit_tokens"] += from_storage
            prefixes.append(self.tree.prefix_slots(req.lock.node))
        return prefixes

    def _load_back(self, loading: list[Admitted]) -> None:
        """Load the host hits of ``loading`` back in one call per pool, and draw what it took
        from their load reservations, in batch order (a node that two prefixes share is
        loaded once, for the first)."""
        alloc = self.allocator
        before = Cost(alloc.full_available, alloc.swa_available)
        ends = [a.match.last_host_node for a in loading]
        self.counters["loaded_tokens"] += self.tree.load_back(ends)
        left = before - Cost(alloc.full_available, alloc.swa_available)
        for i, a in enumerate(loading):
            last = i == len(loading) - 1
            share = left if last else Cost(min(left.full, a.load.full), min(left.swa, a.load.swa))
            a.reservation.draw_load(share, f"the load back of {a.req.rid!r}")
            left = left - share

    def _seed_states(self, new: list[Admitted]) -> None:
        """Give each new request a working state slot: a copy of the snapshot its prefix ends
        at (loaded back from host first if need be; one copy for the batch), or zeros."""
        for a in new:
            a.reservation.draw(Cost(state=1), f"the working state of {a.req.rid!r}")
        slots = self.states.allocator.alloc_pages(len(new))
        ensure(slots is not None, "admitted working states do not fit")
        src, dst, fresh = [], [], []
        loaded: set[int] = set()
        for a, slot in zip(new, slots.tolist(), strict=True):
            self.table.set_state_slot(a.req, slot)
            end = a.match.last_host_node
            if a.match.state_from_host and id(end) not in loaded:
                loaded.add(id(end))
                a.reservation.draw_load(Cost(state=1), f"the state load back of {a.req.rid!r}")
            if end is not self.tree.root:
                self.counters["loaded_states"] += int(end.state is None)
                ensure(self.tree.load_state(end), "admitted state load back does not fit")
                src.append(end.state)
                dst.append(slot)
            else:
                fresh.append(slot)
        device = self.states.buf.device
        if self.tree.host is not None:
            # NOTE: snapshots just loaded back, and freed slots just backed up, are read and
            # overwritten on this stream: after those side-stream copies.
            self.tree.host.transfers.wait()
        if src:
            self.states.copy(torch.tensor(src, device=device), torch.tensor(dst, device=device))
        if fresh:
            self.states.zero(torch.tensor(fresh, device=device))
        # NOTE: only now, the copy issued: until then a later load back in this batch could
        # evict an unpinned seed snapshot and overwrite its slot before the copy read it.
        for a in new:
            self.tree.pin_state(a.match.last_host_node, -1)
