"""Admission of waiting requests (and the chunked one): match, budget, load back, allocate."""

from __future__ import annotations

import itertools
from dataclasses import astuple, replace

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
from hybridkv.scheduler.records import Admitted, ReqState, Reservation, prefix_load
from hybridkv.scheduler.swa_slide import SWASlide
from hybridkv.scheduler.table import RequestTable
from hybridkv.scheduler.tp import TPSync
from hybridkv.tree import Node, RadixTree
from hybridkv.undo import UndoLog

# Waiting requests matched in a step's first round of admission; each further round (taken
# only when every candidate of the last one was admitted whole) matches twice as many.
FIRST_ROUND = 4
NO_GRANT = Reservation(0, NO_LOAD)  # a matched candidate's placeholder until it is admitted


class Prefill:
    """Plans prefill steps: the chunked request's next chunk, then waiting requests in order
    while every pool has room for what they cost (the one cost function).

    Under TP every decision comes from figures reduced across the ranks, in rounds of three
    collectives each (:meth:`_reach`, :meth:`_admit_round`): whether a step makes another
    round depends only on reduced figures, so every rank makes the same calls.
    """

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
        """The step's prefill plan, or ``None`` when nothing fits. With an arena, admitting
        nothing is pressure: the arena takes back free chunks (evicting when nothing runs)
        and admission tries again while that frees any (whether admission refused a request
        and whether relief freed a chunk are the same on every TP rank)."""
        if self.queues.chunked is None and not self.queues.waiting:
            return None
        while True:
            adder = PrefillAdder(self.config, self.admission.running_reservation())
            plan = self._schedule(adder)
            if plan is not None or not (self.config.arena and adder.refused):
                return plan
            if not self.admission.relieve():
                return None

    def _schedule(self, adder: PrefillAdder) -> StepPlan | None:
        q, t = self.queues, self.table
        admitted: list[Admitted] = []
        chunked = q.chunked
        if chunked is not None:
            self.slide.release(np.array([chunked.row], dtype=np.int64))
        size = FIRST_ROUND
        while True:
            new = sum(a.match is not None for a in admitted)
            count = min(size, t.free_rows - new, len(q.waiting) - new)
            cands = list(itertools.islice(q.waiting, new, new + max(count, 0)))
            first = chunked is not None and not admitted
            if not first and not cands:
                break
            rooms, reach = self._reach(cands, first)
            if first:
                granted = self._admit_chunked(chunked, adder, rooms)
                if granted is None:
                    return None
                admitted.append(granted)
                if not granted.completes:
                    break
            if not cands:
                break
            got = self._admit_round(cands, reach, adder, bool(admitted))
            admitted += got
            if len(got) < len(cands) or not got[-1].completes:
                break
            size *= 2
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

    def _admit_chunked(self, req: ReqState, adder: PrefillAdder, rooms: Cost) -> Admitted | None:
        """The chunked request's next chunk, from the rooms every rank has."""
        t, adm = self.table, self.admission
        row = req.row
        start, fill_len = int(t.kv_len[row]), int(t.fill_len[row])
        reserve = adm.decode_reserve(req, False)
        granted = adder.admit(rooms, start, fill_len - start, reserve, adm.swa_held(req))
        return None if granted is None else Admitted(req, start, fill_len, granted)

    def _reach(self, cands: list[ReqState], chunked: bool) -> tuple[Cost, list[tuple[int, int]]]:
        """The round's first collective: the rooms (when the chunked request asks for its next
        chunk) and, per candidate, how far the tree reaches into its ids and how far storage
        continues from there. Returns the MIN over ranks: rooms and ``(tree, storage)`` ends.
        """
        local = list(astuple(self.admission.rooms())) if chunked else []
        for req in cands:
            limit = len(req.fill_ids) - 1
            _, end = self.tree.reach(req.fill_ids, limit)
            local += [end, self.tree.storage_reach(req.fill_ids, end, limit)]
        common = self.tp.reduce_min(local)
        n = len(local) - 2 * len(cands)
        rooms = Cost(*common[:n]) if chunked else Cost()
        ends = common[n:]
        return rooms, list(zip(ends[::2], ends[1::2], strict=True))

    def _admit_round(
        self,
        cands: list[ReqState],
        reach: list[tuple[int, int]],
        adder: PrefillAdder,
        others: bool,
    ) -> list[Admitted]:
        """Prefetch, match and admit ``cands`` in order, up to the first that does not fit,
        from figures every rank shares; the rest are left as they were (their prefetches
        stay on host). Two collectives, whatever the local state:

        1. per candidate, which prefix lengths this rank can serve (after prefetching from
           storage up to the common storage end), and whether every prefetch arrived: each
           takes the longest length every rank can serve (and if a prefetch failed anywhere,
           every rank drops this round's prefetches and serves what it had before);
        2. per candidate, the rooms after locking it and what loading its prefix back takes:
           admission uses the smallest rooms and the largest loads of any rank.

        What a round counts on stays pinned on host meanwhile: the paths the tree reached
        before it and what it prefetched (a prefetch's host eviction could drop them).
        """
        tree, ps = self.tree, self.config.page_size
        pins = []
        for req in cands:
            node, _ = tree.reach(req.fill_ids, len(req.fill_ids) - 1)
            tree.pin_host(node, 0, +1)
            pins.append((node, 0))
        fetched: list[tuple[ReqState, Node, int, int]] = []  # (req, last node, start, tokens)
        arrived = 1
        for req, (_, end) in zip(cands, reach, strict=True):
            nodes = tree.prefetch(req.fill_ids, end)
            if nodes:
                start = nodes[0].start
                tree.pin_host(nodes[-1], start, +1)
                fetched.append((req, nodes[-1], start, end - start))
            arrived &= int(tree.reach(req.fill_ids, end)[1] == end)
        local = [arrived]
        for req, (_, end) in zip(cands, reach, strict=True):
            local += map(int, tree.usable_ends(req.fill_ids, end))
        common = self.tp.reduce_min(local)
        for _, node, start, _ in fetched:
            tree.pin_host(node, start, -1)
        if common[0]:
            for req, _, _, tokens in fetched:
                self.undo.save(req, "prefetched")
                req.prefetched += tokens
        else:
            tree.release_prefetched([(node, start) for _, node, start, _ in fetched])
        lengths, offset = [], 1
        for before, end in reach:
            usable = common[offset : offset + end // ps]
            offset += end // ps
            top = end if common[0] else min(before, end)
            lengths.append(_longest(usable, top // ps) * ps)
        return self._admit_matched(cands, lengths, pins, adder, others)

    def _admit_matched(
        self,
        cands: list[ReqState],
        lengths: list[int],
        pins: list[tuple[Node, int]],
        adder: PrefillAdder,
        others: bool,
    ) -> list[Admitted]:
        """Match each candidate to its common length and pin what its admission counts on,
        reduce the rooms and loads, and admit in order up to the first that does not fit or
        gets a partial chunk (everything of those after it undone). ``pins``: the round's host pins,
        dropped once every candidate holds its own.

        Pinned until the step uses them: the device prefix and its window's SWA (the lock),
        the host copies to load back and, with recurrent layers, the snapshot that seeds the
        working state (on device, and its host copy when it comes back from there: a backup
        during this step's eviction could otherwise drop it to make host room).
        """
        tree, adm = self.tree, self.admission
        held: list[Admitted] = []
        local: list[int] = []
        for req, length in zip(cands, lengths, strict=True):
            match = tree.match_prefix(req.fill_ids, length)
            ensure(
                match.length + match.host_hit_length == length,
                f"{req.rid!r}: matched {match.length + match.host_hit_length} tokens, "
                f"not the {length} every TP rank can serve",
            )
            end = match.last_host_node
            self.table.set_lock(req, tree.inc_lock(match.last_node, adm.window_start(end.end)))
            load_start = match.load_start
            if match.state_from_host:
                load_start = min(load_start, end.start)
            tree.pin_host(end, load_start, +1)
            if self.states is not None:
                tree.pin_state(end, +1)  # its snapshot seeds the working state
            load = prefix_load(match)
            local += [*astuple(adm.rooms()), -load.full, -load.swa, -load.state]
            held.append(Admitted(req, length, len(req.fill_ids), NO_GRANT, match, load, load_start))
        for node, start in pins:
            tree.pin_host(node, start, -1)
        common = self.tp.reduce_min(local)
        admitted: list[Admitted] = []
        n = len(astuple(NO_LOAD))
        for i, a in enumerate(held):
            figures = common[(n + 3) * i : (n + 3) * (i + 1)]
            load = Cost(-figures[n], -figures[n + 1], -figures[n + 2])
            granted = adder.admit(
                Cost(*figures[:n]),
                a.start,
                a.fill_len - a.start,
                adm.decode_reserve(a.req, others or bool(admitted)),
                adm.prefix_swa_held(a.start, load.swa),
                load,
                new=True,
            )
            if granted is None:
                break
            admitted.append(replace(a, reservation=granted))
            if not admitted[-1].completes:
                break  # a partial chunk took what was left
        for a in held[len(admitted) :]:
            end = a.match.last_host_node
            if self.states is not None:
                tree.pin_state(end, -1)
            tree.pin_host(end, a.load_start, -1)
            tree.dec_lock(a.req.lock)
            self.table.set_lock(a.req, None)
        return admitted

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
        states = 0
        if self.states is not None:
            states = sum(1 for a in admitted if a.match is not None) + load.state
        self.admission.make_room(
            new_tokens + load.full, new_tokens + load.swa if swa else 0, states
        )
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
        device = self.states.device
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


def _longest(usable: list[int], pages: int) -> int:
    """The most leading pages, at most ``pages``, whose end every rank can serve (0: none)."""
    return next((k + 1 for k in range(pages - 1, -1, -1) if usable[k]), 0)
