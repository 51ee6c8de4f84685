"""Step inputs on the device and the plan's page tables, one kernel call per pool."""

from __future__ import annotations

import numpy as np
import torch

from hybridkv import kernels
from hybridkv.allocator import SWAAllocator
from hybridkv.allocator.upload import upload_many
from hybridkv.scheduler.config import CacheConfig
from hybridkv.scheduler.plan import PageTable, StepBatch, StepPlan
from hybridkv.scheduler.table import RequestTable
from hybridkv.tree import Transfers


class StepInputs:
    """A step's per-request arrays on the device: one int64 upload (rows, starts, lengths,
    the caller's ``extra`` arrays and, on the torch path, the page tables' positions) and,
    on the torch path, one int32 upload (the tables' ``kv_indptr`` and last page lengths)."""

    __slots__ = ("rows", "extend_starts", "seq_lens", "kv_starts", "swa_starts", "extra", "tables")

    def __init__(
        self,
        table: RequestTable,
        batch: StepBatch,
        window: int | None,
        page_size: int,
        host_tables: bool,
        extra: tuple[np.ndarray, ...],
    ) -> None:
        starts, rows = batch.extend_starts, batch.rows
        seq = starts + batch.extend_lens
        # the first key each request's SWA table lists: its window's first page
        self.swa_starts = None
        kv_starts = [np.zeros_like(seq)]
        if window is not None:
            self.swa_starts = np.maximum(starts - window, 0) // page_size * page_size
            kv_starts.append(self.swa_starts)
        layouts = []
        if host_tables:
            layouts = [HostPageTable(table, rows, k, seq, page_size) for k in kv_starts]
            arrays = (rows, starts, seq, *extra, *(h.positions for h in layouts))
        else:
            arrays = (rows, starts, seq, *extra, *kv_starts)
        views = upload_many(table.device, *arrays)
        self.rows, self.extend_starts, self.seq_lens = views[:3]
        self.extra = views[3 : 3 + len(extra)]
        rest = views[3 + len(extra) :]
        self.kv_starts = [] if host_tables else rest
        self.tables: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if layouts:
            small = [a for h in layouts for a in (h.kv_indptr, h.kv_last_page_len)]
            small = upload_many(table.device, *small, dtype=np.int32)
            self.tables = [(p, *small[2 * k : 2 * k + 2]) for k, p in enumerate(rest)]


def ceil_pages(tokens: np.ndarray, page_size: int) -> np.ndarray:
    return (tokens + page_size - 1) // page_size


class HostPageTable:
    """A page table's CSR layout worked out on the host: ``kv_indptr``, ``kv_last_page_len``
    and the ``req_to_token`` position of each listed page's first token (flat index)."""

    __slots__ = ("kv_indptr", "kv_last_page_len", "positions")

    def __init__(
        self,
        table: RequestTable,
        rows: np.ndarray,
        kv_starts: np.ndarray,
        seq_lens: np.ndarray,
        page_size: int,
    ) -> None:
        first = kv_starts // page_size
        end = ceil_pages(seq_lens, page_size)
        counts = end - first
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        # page j of request i is at rows[i] * ctx + (first[i] + j) * ps; its index in the
        # table is indptr[i] + j, hence a per-request base plus a global stride.
        base = table.flat_positions(rows, (first - indptr[:-1]) * page_size)
        self.positions = np.repeat(base, counts) + np.arange(indptr[-1]) * page_size
        self.kv_indptr = indptr
        self.kv_last_page_len = np.where(counts > 0, seq_lens - (end - 1) * page_size, 0)


class PlanBuilder:
    """Builds a :class:`StepPlan`: the full page table over each request's context and the
    SWA one over its trailing window (page counts known on the host, so nothing syncs).

    NOTE: with the Triton backend each table is one ``page_table`` launch over the uploaded
    rows and lengths. With the torch backend (the CPU path) the CSR layout is worked out
    in numpy and the device does one gather per table: the torch reference of
    ``page_table`` takes ~25 small ops per table, which on a CPU costs more than the rest
    of a decode step together. Both give the same tables (tests compare them).
    """

    def __init__(
        self,
        config: CacheConfig,
        table: RequestTable,
        allocator: SWAAllocator,
        transfers: Transfers | None,
    ) -> None:
        self.config = config
        self.table = table
        self.allocator = allocator
        self.transfers = transfers
        self.host_tables = kernels.resolve_backend(config.backend, table.device) == "torch"

    def inputs(self, batch: StepBatch, *extra: np.ndarray) -> StepInputs:
        """Upload ``batch``'s rows, starts and lengths (and ``extra`` int64 arrays)."""
        cfg = self.config
        return StepInputs(self.table, batch, cfg.window, cfg.page_size, self.host_tables, extra)

    def build(self, batch: StepBatch, out: torch.Tensor, inputs: StepInputs) -> StepPlan:
        if self.host_tables:
            full, swa = self._host_tables(inputs)
        else:
            full, swa = self._device_tables(batch, inputs)
        return StepPlan(
            batch=batch,
            out_cache_loc=out,
            req_pool_indices=inputs.rows,
            seq_lens=inputs.seq_lens,
            full_pages=full,
            swa_pages=swa,
            transfers=self.transfers,
            swa_table_starts=inputs.swa_starts,
        )

    def _host_tables(self, inputs: StepInputs) -> tuple[PageTable, PageTable | None]:
        ps, t = self.config.page_size, self.table
        shift = ps.bit_length() - 1 if ps & (ps - 1) == 0 else None
        tables = []
        for k, (positions, indptr, last) in enumerate(inputs.tables):
            first_slots = t.flat.index_select(0, positions)
            if k == 1:
                first_slots = self.allocator.full_to_swa.index_select(0, first_slots)
            # NOTE: a shift, not a division, for power-of-two pages: integer division
            # costs ~5 ns per element on a CPU.
            if shift is not None:
                pages = first_slots >> shift
            else:
                pages = torch.div(first_slots, ps, rounding_mode="floor")
            tables.append(PageTable(indptr, pages.to(torch.int32), last))
        return tables[0], (tables[1] if len(tables) > 1 else None)

    def _device_tables(
        self, batch: StepBatch, inputs: StepInputs
    ) -> tuple[PageTable, PageTable | None]:
        cfg, ps = self.config, self.config.page_size
        seq = batch.extend_starts + batch.extend_lens
        end_pages = ceil_pages(seq, ps)
        full = kernels.page_table(
            self.table.req_to_token,
            inputs.rows,
            inputs.kv_starts[0],
            inputs.seq_lens,
            ps,
            num_pages=int(end_pages.sum()),
            backend=cfg.backend,
        )
        swa = None
        if inputs.swa_starts is not None:
            first = inputs.swa_starts // ps
            swa = kernels.page_table(
                self.table.req_to_token,
                inputs.rows,
                inputs.kv_starts[1],
                inputs.seq_lens,
                ps,
                full_to_swa_map=self.allocator.full_to_swa,
                num_pages=int((end_pages - first).sum()),
                backend=cfg.backend,
            )
        return PageTable(*full), (None if swa is None else PageTable(*swa))
