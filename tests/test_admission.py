"""Admission and allocation: what admission counted on stays pinned until the step uses it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from workloads import Arrival, Driver, small_config

from hybridkv import MemoryManager, Request


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """NOTE: tiny tensors; one torch thread is much faster for the torch references."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class HostDriver(Driver):
    """workloads.Driver that accepts host load backs (``check_plan`` insists on
    ``loaded_len == 0``; the FakeEngine still checks every prefix it reads)."""

    def _on_plan(self, plan: object) -> None:
        plan.wait()
        if all(r.loaded_len == 0 for r in plan.reqs):
            super()._on_plan(plan)

    def one(self, request: Request, max_steps: int = 100) -> None:
        """Run ``request`` alone to completion within ``max_steps`` more steps."""
        self.run([Arrival(self.steps, request)], max_steps=self.steps + max_steps)


# ------------------------------------------------------------------ the full cost


# ------------------------------------------------------------------ pinned until used


def test_state_snapshot_admitted_from_host_stays_until_loaded() -> None:
    """A prefix whose state snapshot is on host only is admitted; in the same schedule(), SWA
    eviction under write_back backs up a victim's snapshot and host-state eviction must not
    drop the one admitted (it was: "admitted state load back does not fit")."""
    cfg = small_config(
        num_layers=3,
        swa_layer_ids=(0,),
        mamba_layer_ids=(1,),
        state_shape=(2,),
        page_size=1,
        sliding_window=1,
        full_tokens=96,
        swa_tokens=5,
        state_slots=4,
        host_tokens=96,
        write_policy="write_back",
        swa_eviction="lru",
        chunked_prefill_size=1,
        max_running_requests=2,
    )
    d = HostDriver(MemoryManager(cfg))
    d.one(Request("a", [1, 0, 0, 2, 0, 0, 1, 0], 2))
    s = d.steps
    d.run(
        [
            Arrival(s, Request("b", [1, 0, 0, 2, 2, 0, 2], 4)),
            Arrival(s, Request("c", [1, 0, 0, 2, 0], 1)),
            Arrival(s, Request("e", [1, 0, 0, 0, 1, 1, 2], 1)),
        ],
        max_steps=s + 200,
    )
    assert sorted(d.finished) == ["a", "b", "c", "e"]
