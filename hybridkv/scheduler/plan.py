"""What ``schedule()`` hands the engine: the requests of a step and their page tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from hybridkv.allocator.upload import upload
from hybridkv.tree import Transfers


@dataclass(frozen=True, slots=True)
class Request:
    """A generation request as the engine submits it."""

    rid: str
    input_ids: list[int]
    max_new_tokens: int


class ScheduledReq(NamedTuple):
    """One request's part of a step: positions ``[extend_start, extend_start + extend_len)``.

    ``cached_len`` (prefix found on device) and ``loaded_len`` (prefix loaded back) are set on
    a request's first chunk and 0 on later chunks. ``state_slot`` holds the request's
    recurrent state after exactly ``extend_start`` tokens (zeros when that is 0).
    """

    rid: str
    req_pool_index: int
    extend_start: int
    extend_len: int
    is_decode: bool
    produces_token: bool
    cached_len: int = 0
    loaded_len: int = 0
    state_slot: int = -1  # recurrent-state slot (mamba models), else -1


class PageTable(NamedTuple):
    """FlashInfer CSR page table, int32: request ``i`` reads pages
    ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``, its last page holding ``kv_last_page_len[i]``."""

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor


@dataclass(frozen=True, slots=True)
class StepBatch:
    """The step's requests as host arrays (struct of arrays, in ``out_cache_loc`` order).

    ``qo_indptr`` (``[n + 1]``) is each request's range in ``out_cache_loc``; the rest are
    ``[n]``. A decode step shares ``rids`` with the manager's running set: never mutate it.
    """

    rids: list[str]
    rows: np.ndarray
    extend_starts: np.ndarray
    extend_lens: np.ndarray
    qo_indptr: np.ndarray
    is_decode: bool  # a step is all decode or all prefill
    produces_token: np.ndarray  # bool
    cached_lens: np.ndarray
    loaded_lens: np.ndarray
    state_slots: np.ndarray

    def __len__(self) -> int:
        return len(self.rids)


class StepPlan:
    """A step: ``reqs`` in the order of ``out_cache_loc`` (int64 full slots of every token
    computed). ``full_pages`` covers each request's whole context; ``swa_pages`` (``None``
    without SWA layers) its trailing window, from the page holding
    ``max(0, extend_start - window)`` (``swa_kv_starts``), in SWA pages.

    Device tensors: ``out_cache_loc``, ``req_pool_indices`` and ``seq_lens`` (int64 ``[n]``),
    the page tables, and (built on first use) ``qo_indptr`` (int32 ``[n + 1]``),
    ``extend_starts`` / ``extend_lens`` (int64 ``[n]``). ``batch`` holds the same on the
    host; ``reqs`` (one :class:`ScheduledReq` each) is built from it on first use.
    ``swa_table_starts`` (host int64 ``[n]``, ``None`` without SWA layers) is the position of
    the first token of each request's SWA table: key ``j`` of that table is position
    ``swa_table_starts[i] + j``, and a query at position ``p`` attends to keys at positions
    ``> p - window`` (FlashInfer: ``window_left = window - 1`` over that table).
    """

    __slots__ = (
        "batch",
        "out_cache_loc",
        "req_pool_indices",
        "seq_lens",
        "full_pages",
        "swa_pages",
        "transfers",
        "swa_table_starts",
        "_reqs",
        "_device",
    )

    def __init__(
        self,
        batch: StepBatch,
        out_cache_loc: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        full_pages: PageTable,
        swa_pages: PageTable | None,
        transfers: Transfers | None = None,
        swa_table_starts: np.ndarray | None = None,
    ) -> None:
        self.batch = batch
        self.out_cache_loc = out_cache_loc
        self.req_pool_indices = req_pool_indices
        self.seq_lens = seq_lens
        self.full_pages = full_pages
        self.swa_pages = swa_pages
        self.transfers = transfers
        self.swa_table_starts = swa_table_starts
        self._reqs: list[ScheduledReq] | None = None
        self._device: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        """Requests in the step."""
        return len(self.batch)

    @property
    def reqs(self) -> list[ScheduledReq]:
        if self._reqs is None:
            b = self.batch
            columns = zip(
                b.rids,
                b.rows.tolist(),
                b.extend_starts.tolist(),
                b.extend_lens.tolist(),
                [b.is_decode] * len(b),
                b.produces_token.tolist(),
                b.cached_lens.tolist(),
                b.loaded_lens.tolist(),
                b.state_slots.tolist(),
                strict=True,
            )
            self._reqs = [ScheduledReq(*c) for c in columns]
        return self._reqs

    def _on_device(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if name not in self._device:
            array = getattr(self.batch, name)
            self._device[name] = upload(np.ascontiguousarray(array), self.seq_lens.device).to(dtype)
        return self._device[name]

    @property
    def qo_indptr(self) -> torch.Tensor:
        """int32 ``[n + 1]``: request ``i`` computes its tokens at ``out_cache_loc[a:b]``, with
        ``a, b = qo_indptr[i], qo_indptr[i + 1]`` (the same ranges as ``batch.qo_indptr``)."""
        return self._on_device("qo_indptr", torch.int32)

    @property
    def extend_starts(self) -> torch.Tensor:
        """int64 ``[n]``: each request's first position computed this step."""
        return self._on_device("extend_starts", torch.int64)

    @property
    def extend_lens(self) -> torch.Tensor:
        """int64 ``[n]``: tokens each request computes this step."""
        return self._on_device("extend_lens", torch.int64)

    def wait(self, layer_id: int | None = None) -> None:
        """Make the engine's stream wait until this plan's load-backs (of ``layer_id``, or
        all) have landed; call it before attention reads the prefix.

        On CUDA a load back goes layer by layer, so attention of early layers can overlap the
        copies of later ones; on CPU copies are synchronous and there is nothing to wait for.
        """
        if self.transfers is not None:
            self.transfers.wait(layer_id)
