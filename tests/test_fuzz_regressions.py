"""Regressions the MemoryManager state machine (test_fuzz.py) found, each minimised."""

from __future__ import annotations

from pathlib import Path

import pytest
from workloads import Arrival, Driver, small_config

from hybridkv import MemoryManager, Request

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_storage_of_a_model_without_full_layers(tmp_path: Path) -> None:
    """Every layer slides: a stored page has no full KV (zero bytes), which storage wrote
    through a memoryview cast that refuses empty views (TypeError on the first backup)."""
    cfg = small_config(
        page_size=1,
        swa_layer_ids=(0, 1, 2, 3),
        sliding_window=1,
        swa_tokens=3,
        full_tokens=4,
        host_tokens=4,
        write_policy="write_through",
        storage=str(tmp_path / "kv"),
    )
    Driver(MemoryManager(cfg)).run([Arrival(0, Request("a", [0, 1], 1))], max_steps=20)
    second = Driver(MemoryManager(cfg))
    second.run([Arrival(0, Request("b", [0, 1, 2], 1))], max_steps=20)
    assert second.mm.stats()["storage_hit_tokens"] > 0
