"""Admission of waiting requests (and the chunked one): match, budget, load back, allocate."""

from __future__ import annotations

import torch

from hybridkv import kernels
from hybridkv.scheduler.adder import PrefillAdder
from hybridkv.scheduler.cost import NO_LOAD, Cost, cost, decode_reserve, swa_steady
from hybridkv.scheduler.plan import ScheduledReq, StepPlan
from hybridkv.scheduler.records import (
    Admitted,
    ReqState,
)
from hybridkv.tree import MatchResult


class PrefillMixin:
    """The prefill half of :class:`MemoryManager` (its state, its helpers)."""

    def _rooms(self) -> Cost:
        """Each pool's available + evictable tokens (state: slots and unpinned snapshots)."""
        tree, alloc = self.tree, self.allocator
        state = 0
        if self.states is not None:
            pinned = sum(1 for n in tree._nodes() if n.state is not None and n.state_lock)
            state = self.states.available + tree.cached_states - pinned
        return Cost(
            alloc.full_available + tree.evictable_full,
            alloc.swa_available + tree.evictable_swa,
            state,
        )

    def _swa_held(self, req: ReqState) -> int:
        """SWA tokens a request keeps alive: the window of its prefix its lock pins in the
        tree, and (once running) its own SWA tokens not yet released. A new request's chunk
        is charged only for what it adds to them."""
        if self.config.window is None:
            return 0
        pinned = max(0, req.lock.node.end - req.lock.swa_start)
        if req.row < 0:
            return pinned
        return pinned + req.alloc_len - max(req.cached_len, int(self.released_lens[req.row]))

    def _running_reservation(self) -> Cost:
        """Full tokens held back for running decodes; SWA tokens they may still grow by."""
        full = swa = 0
        steady = swa_steady(self.config)
        released = self.released_lens.tolist()
        for req in self._running.values():
            full += decode_reserve(req.remaining_new_tokens, self.new_token_ratio)
            own = req.alloc_len - max(req.cached_len, released[req.row])
            swa += max(0, steady - own)
        return Cost(full, swa if self.config.has_swa else 0)

    def _window_start(self, end: int) -> int:
        """First position of the last window before ``end``, on a page boundary."""
        start = max(0, end - (self.config.window or 0))
        return start - start % self.config.page_size

    def _decode_reserve(self, req: ReqState, admitted: list[Admitted]) -> int:
        """The decode reservation of a request being admitted: none when nothing else runs
        (a lone request always fits, and reserving for it could block it forever)."""
        if not self._running and not any(a.req is not req for a in admitted):
            return 0
        return decode_reserve(req.remaining_new_tokens, self.new_token_ratio)

    def _schedule_prefill(self) -> StepPlan | None:
        if self._chunked is None and not self._waiting:
            return None
        adder = PrefillAdder(self.config, self._running_reservation())
        admitted: list[Admitted] = []
        chunked = self._chunked
        if chunked is not None:
            self._release_swa([chunked])
            held = self._swa_held(chunked)
            chunk = adder.admit(
                self._rooms(),
                chunked.kv_len,
                len(chunked.fill_ids) - chunked.kv_len,
                self._decode_reserve(chunked, admitted),
                held,
            )
            if chunk == 0:
                return None
            admitted.append(Admitted(chunked, chunk, held, None))
        for req in self._waiting:
            if len(admitted) - (chunked is not None) == len(self._free_rows):
                break
            if admitted and not admitted[-1].completes:
                break  # a partial chunk took what was left
            match = self._match(req)
            lock = self.tree.inc_lock(match.last_node, self._window_start(match.last_host_node.end))
            load_start = match.load_start
            self.tree.pin_host(match.last_host_node, load_start, +1)
            load = Cost(
                match.host_hit_length, match.swa_host_hit_length, int(match.state_from_host)
            )
            prefix_len = match.length + match.host_hit_length
            req.lock, req.kv_len = lock, prefix_len
            held = self._swa_held(req)
            seed = match.last_host_node if self.states is not None else None
            if seed is not None:
                seed.state_lock += 1  # its snapshot seeds the working state
            chunk = adder.admit(
                self._rooms(),
                prefix_len,
                len(req.fill_ids) - prefix_len,
                self._decode_reserve(req, admitted),
                held,
                load,
                new=True,
            )
            if chunk == 0:
                if seed is not None:
                    seed.state_lock -= 1
                self.tree.pin_host(match.last_host_node, load_start, -1)
                self.tree.dec_lock(lock)
                req.lock, req.kv_len = None, 0
                break
            admitted.append(Admitted(req, chunk, held, match, load, load_start))
        if not admitted:
            return None
        for a in admitted:
            if a.match is not None:
                self._waiting.popleft()
                a.req.row = self._free_rows.pop()
        plan = self._extend(admitted)
        self._chunked = None
        for a in admitted:
            if a.completes:
                self._running[a.req.rid] = a.req
            else:
                self._chunked = a.req
        return plan

    def _extend(self, admitted: list[Admitted]) -> StepPlan:
        """Evict what the batch lacks, load back matched host KV, allocate the new tokens in one
        call per pool, and fill req_to_token."""
        cfg, ps = self.config, self.config.page_size
        prefix_lens = torch.tensor([a.req.kv_len for a in admitted], dtype=torch.int64)
        seq_lens = prefix_lens + torch.tensor([a.chunk for a in admitted], dtype=torch.int64)
        pages = (seq_lens + ps - 1) // ps - (prefix_lens + ps - 1) // ps
        for n, a in zip(pages.tolist(), admitted, strict=True):
            # NOTE: allocation never takes more than admission charged (one cost function);
            # both pools take n pages (SWA pages are paired with full pages).
            end = a.req.kv_len + a.chunk
            charged = cost(cfg, a.chunk, a.swa_held, a.load, chunk_end=end, new=a.match is not None)
            assert n * ps + a.load.full <= charged.full, "full allocation exceeds the cost"
            assert cfg.window is None or n * ps + a.load.swa <= charged.swa, "SWA exceeds the cost"
            takes = int(a.match is not None) + a.load.state + int(end % ps == 0)
            assert self.states is None or takes <= charged.state, "state exceeds the cost"
        load = sum((a.load for a in admitted), NO_LOAD)
        self._make_room(int(pages.sum()) * ps + load.full, int(pages.sum()) * ps + load.swa)
        if self.states is not None:
            new = sum(1 for a in admitted if a.match is not None)
            self.tree.evict_states(new + load.state - self.states.available)
        prefixes = self._take_prefixes([a for a in admitted if a.match is not None])
        rows = torch.tensor([a.req.row for a in admitted], dtype=torch.int64, device=self.device)
        prefix_dev = prefix_lens.to(self.device)
        last_loc = self.req_to_token[rows, (prefix_dev - 1).clamp(min=0)].long()
        out = self.allocator.alloc_extend(prefix_lens, seq_lens, last_loc)
        assert out is not None, "admitted batch does not fit after eviction"
        write_lens = [a.req.kv_len if a.match is not None else 0 for a in admitted]
        kernels.write_req_to_token(
            self.req_to_token,
            rows,
            torch.cat(prefixes) if prefixes else out[:0],
            torch.tensor(write_lens, dtype=torch.int64, device=self.device),
            out,
            prefix_dev,
            seq_lens.to(self.device) - prefix_dev,
            backend=cfg.backend,
        )
        sreqs = []
        for a in admitted:
            start = a.req.kv_len
            a.req.alloc_len = start + a.chunk
            sreqs.append(
                ScheduledReq(
                    rid=a.req.rid,
                    req_pool_index=a.req.row,
                    extend_start=start,
                    extend_len=a.chunk,
                    is_decode=False,
                    produces_token=a.completes,
                    cached_len=a.match.length if a.match is not None else 0,
                    loaded_len=a.load.full,
                    state_slot=a.req.state_slot,
                )
            )
        return self._plan(sreqs, out, rows, prefix_dev, seq_lens.to(self.device))

    def _match(self, req: ReqState) -> MatchResult:
        """Prefetch from storage, then match: the same result on every TP rank.

        Every rank makes the same collective calls whatever its local state: one MIN
        reduction for the prefetch, one for the match lengths; a rank that matched more than
        another (its trees drifted) re-matches to the common length.
        """
        limit = len(req.fill_ids) - 1
        self.counters["storage_hit_tokens"] += self.tree.prefetch(
            req.fill_ids, limit, self.tp.reduce_min
        )
        match = self.tree.match_prefix(req.fill_ids, limit)
        local = [match.length, match.host_hit_length, match.swa_host_hit_length]
        common = self.tp.reduce_min(local)
        if common != local:
            match = self.tree.match_prefix(req.fill_ids, common[0] + common[1])
        return match

    def _take_prefixes(self, new: list[Admitted]) -> list[torch.Tensor]:
        """Load the new requests' host hits back (one call per pool), move each lock to the end
        of its whole prefix, and return each prefix's device slots."""
        ends = [a.match.last_host_node for a in new if a.load.full or a.load.swa]
        if ends:
            self.counters["loaded_tokens"] += self.tree.load_back(ends)
        if self.states is not None:
            self._seed_states(new)
        prefixes = []
        for a in new:
            req, match = a.req, a.match
            if a.load.full or a.load.swa:
                lock = self.tree.inc_lock(match.last_host_node)
                self.tree.dec_lock(req.lock)
                req.lock = lock
            self.tree.pin_host(match.last_host_node, a.load_start, -1)
            req.cached_len = req.kv_len
            self.released_lens[req.row] = req.cached_len
            self.counters["device_hit_tokens"] += match.length
            self.counters["host_hit_tokens"] += a.load.full
            prefixes.append(self.tree.prefix_slots(req.lock.node))
        return prefixes

    def _seed_states(self, new: list[Admitted]) -> None:
        """Give each new request a working state slot: a copy of the snapshot its prefix ends
        at (loaded back from host first if need be; one copy for the batch), or zeros."""
        slots = self.states.allocator.alloc_pages(len(new))
        assert slots is not None, "admitted working states do not fit"
        src, dst, fresh = [], [], []
        for a, slot in zip(new, slots.tolist(), strict=True):
            a.req.state_slot = slot
            end = a.match.last_host_node
            if end is not self.tree.root:
                assert self.tree.load_state(end), "admitted state load back does not fit"
                src.append(end.state)
                dst.append(slot)
            else:
                fresh.append(slot)
            end.state_lock -= 1
        device = self.states.buf.device
        if self.tree.host is not None:
            # NOTE: snapshots just loaded back, and freed slots just backed up, are read and
            # overwritten on this stream: after those side-stream copies.
            self.tree.host.transfers.wait()
        if src:
            self.states.copy(torch.tensor(src, device=device), torch.tensor(dst, device=device))
        if fresh:
            self.states.zero(torch.tensor(fresh, device=device))
