"""What ``schedule()`` hands the engine: the requests of a step and their page tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

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
    recurrent state after exactly ``extend_start`` tokens (zeros when that is 0). (A
    NamedTuple: a step builds one per running request, three times cheaper than a frozen
    dataclass.)
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
class StepPlan:
    """A step: ``reqs`` in the order of ``out_cache_loc`` (int64 full slots of every token
    computed). ``full_pages`` covers each request's whole context; ``swa_pages`` (``None``
    without SWA layers) its trailing window from ``extend_start - window``, in SWA pages."""

    reqs: list[ScheduledReq]
    out_cache_loc: torch.Tensor
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    full_pages: PageTable
    swa_pages: PageTable | None
    transfers: Transfers | None = None

    def wait(self, layer_id: int | None = None) -> None:
        """Make the engine's stream wait until this plan's load-backs (of ``layer_id``, or
        all) have landed; call it before attention reads the prefix.

        On CUDA a load back goes layer by layer, so attention of early layers can overlap the
        copies of later ones; on CPU copies are synchronous and there is nothing to wait for.
        """
        if self.transfers is not None:
            self.transfers.wait(layer_id)
