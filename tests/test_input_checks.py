"""Bad input at the manager's boundary: token ids (int64, vocab_size), and the config of a
model without SWA layers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers import assert_refused_unchanged
from workloads import Driver, chat_sessions, small_config

from hybridkv import MemoryManager, Request
from hybridkv.scheduler.hf_config import from_hf_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ token ids


def test_token_ids_past_int64_are_refused_with_storage_on(tmp_path: Path) -> None:
    """With storage on (page keys pack ids as int64), ids >= 2**63 are refused at
    add_request and commit, nothing changes, and the queue runs on."""
    cfg = small_config(host_tokens=64, storage=str(tmp_path))
    d = Driver(MemoryManager(cfg))
    mm = d.mm
    d.add(Request("a", list(range(9)), 3))
    for ids in ([1, 2**63], [2**64], [2**63 - 1, -1]):
        assert_refused_unchanged(
            mm, lambda ids=ids: mm.add_request(Request("x", ids, 2)), "input_ids"
        )
    plan = mm.schedule()
    assert plan is not None
    for ids in ([2**63], [2**64], torch.tensor([-1])):
        assert_refused_unchanged(mm, lambda ids=ids: mm.commit(plan, ids), "next_token_ids")
    d.step(plan)
    d.add(Request("b", [2**63 - 1] * 9, 2))  # the largest id works, storage keys included
    d.run()
    assert sorted(d.finished) == ["a", "b"]


def test_vocab_size_bounds_token_ids() -> None:
    """With vocab_size set, an id >= vocab_size is refused at add_request and commit,
    naming the field; vocab_size - 1 is accepted."""
    d = Driver(MemoryManager(small_config(vocab_size=50)))
    mm = d.mm
    assert_refused_unchanged(
        mm, lambda: mm.add_request(Request("x", [1, 50], 2)), r"input_ids.*vocab_size"
    )
    d.add(Request("a", [49] * 6, 3))
    plan = mm.schedule()
    assert plan is not None
    assert_refused_unchanged(mm, lambda: mm.commit(plan, [50]), r"next_token_ids.*vocab_size")
    d.step(plan)  # the engine's ids lie below 50
    d.run()
    assert d.finished == ["a"]


def test_from_hf_config_maps_vocab_size() -> None:
    """A config's vocab_size bounds the ids; without one there is no bound."""
    hf = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000)
    assert from_hf_config(hf, device="cpu").vocab_size == 1000
    del hf["vocab_size"]
    assert from_hf_config(hf, device="cpu").vocab_size is None
    with pytest.raises(ValueError, match="'vocab_size'"):
        from_hf_config(hf | dict(vocab_size=0), device="cpu")


# ------------------------------------------------------------------ models without SWA


def test_full_attention_model_without_swa_pool_settings_runs() -> None:
    """A model without SWA layers takes swa_tokens=0 and sliding_window=None, builds no SWA
    pool, and serves multi-turn chats with intact KV."""
    cfg = small_config(swa_layer_ids=(), swa_tokens=0, sliding_window=None, full_tokens=512)
    assert cfg.window is None and cfg.min_swa_tokens == 0
    mm = MemoryManager(cfg)
    assert not mm.allocator.has_swa and mm.kv.swa_buf.numel() == 0
    sessions = chat_sessions(random.Random(5), 4, turns=(2, 3), system_len=(8, 24))
    stats = Driver(mm).run(sessions=sessions)
    assert stats["device_hit_tokens"] > 0 and stats["swa_free"] == 0


@pytest.mark.parametrize("field,value", [("sliding_window", None), ("swa_tokens", 0)])
def test_swa_model_still_needs_its_window_and_pool(field: str, value: object) -> None:
    """With SWA layers, sliding_window=None or swa_tokens=0 is a ValueError naming it."""
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


def test_numpy_integer_ids_are_accepted_as_python_ints() -> None:
    """A tokenizer's numpy ids are ids (stored as Python ints); bools and floats are not."""
    import numpy as np

    mm = MemoryManager(small_config())
    mm.add_request(Request("a", [np.int64(3), np.int32(4), np.uint16(5), 6], 2))
    assert [type(t) for t in mm.queues.reqs["a"].fill_ids] == [int] * 4
    for bad in ([True, 1], [1.0, 2], [np.float32(1)]):
        with pytest.raises(ValueError, match="input_ids"):
            mm.add_request(Request("b", bad, 2))
    plan = mm.schedule()
    mm.commit(plan, [1])
    mm.check()
