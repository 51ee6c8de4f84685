"""TPSync: one packed MIN all-reduce per decision, the same number of calls on every rank.

Two gloo ranks run in spawned processes; each puts what it saw on a queue. A hang fails
the test: the process group has a short timeout and the parent joins with one.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from helpers import run_ranks

from hybridkv.scheduler.tp import TPSync

WORLD = 2
PG_TIMEOUT_S = 20
JOIN_TIMEOUT_S = 60


def _script(rank: int, sync: TPSync) -> dict:
    """What every rank runs: results in order, so the parent can compare ranks."""
    out: dict = {"world_size": sync.world_size}
    out["basic"] = sync.reduce_min([5, 9, 0] if rank == 0 else [7, 3, 0])
    out["empty"] = sync.reduce_min([])
    # Rank 1 found nothing anywhere (its storage misses, its prefetch has not landed): a
    # naive rank would skip the reduce here and leave rank 0 blocked in it.
    steps = [[4, 2], [0], [16, 8, 1]]
    out["early"] = [sync.reduce_min(v if rank == 0 else [0] * len(v)) for v in steps]
    out["after"] = sync.reduce_min([10 + rank])  # still paired with the other rank's call
    out["calls"] = sync.calls
    # Last, as it breaks the group: rank 0 passes fewer values than rank 1, a bug that must
    # not pass silently. The longer rank's reduce ends when rank 0 leaves the group.
    try:
        out["mismatch"] = sync.reduce_min([1, 2] if rank == 0 else [1, 2, 3])
    except RuntimeError as exc:
        out["mismatch"] = str(exc)
    return out


def _rank(rank: int) -> dict:
    return _script(rank, TPSync(dist.group.WORLD))


def _run() -> dict[int, dict]:
    return run_ranks(_rank, [(), ()], JOIN_TIMEOUT_S, PG_TIMEOUT_S)


@pytest.fixture(scope="module")
def two_ranks() -> dict[int, dict]:
    """Run _script once on two gloo ranks; every test below reads its results."""
    got = _run()
    for rank, res in got.items():
        assert "error" not in res, f"rank {rank}: {res.get('tb')}"
    return got


def test_two_ranks_get_elementwise_min(two_ranks: dict[int, dict]) -> None:
    """Rank 0 [5, 9, 0] and rank 1 [7, 3, 0] both get [5, 3, 0]."""
    assert [two_ranks[r]["basic"] for r in range(WORLD)] == [[5, 3, 0]] * WORLD
    assert [two_ranks[r]["world_size"] for r in range(WORLD)] == [WORLD] * WORLD


def test_empty_input_is_a_call_on_every_rank(two_ranks: dict[int, dict]) -> None:
    """An empty list comes back empty on both ranks, and still counts as a call."""
    assert [two_ranks[r]["empty"] for r in range(WORLD)] == [[]] * WORLD


def test_rank_with_nothing_found_still_reduces(two_ranks: dict[int, dict]) -> None:
    """A rank whose values are all 0 (would 'return early') makes every call; no deadlock."""
    for r in range(WORLD):
        assert two_ranks[r]["early"] == [[0, 0], [0], [0, 0, 0]]
        assert two_ranks[r]["after"] == [10]


def test_call_counters_agree(two_ranks: dict[int, dict]) -> None:
    """Both ranks count the same number of collective calls: one per reduce_min."""
    assert [two_ranks[r]["calls"] for r in range(WORLD)] == [6] * WORLD


def test_mismatched_lengths_raise_on_the_shorter_rank(two_ranks: dict[int, dict]) -> None:
    """Rank 0 passing fewer values than rank 1 raises there instead of diverging silently."""
    assert "different numbers of values to reduce_min: 2 here, 3 on" in str(
        two_ranks[0]["mismatch"]
    )
    assert isinstance(two_ranks[1]["mismatch"], str)  # gloo fails the longer rank's call


def test_single_rank_is_a_no_op() -> None:
    """TPSync(None) returns its input as Python ints and makes no collective call."""
    sync = TPSync(None)
    values = [3, 0, 7]
    assert sync.reduce_min(values) == [3, 0, 7]
    assert sync.reduce_min([]) == []
    assert values == [3, 0, 7]
    assert (sync.world_size, sync.calls) == (1, 0)


@pytest.mark.parametrize("group", [0, "tp", object(), [0, 1]])
def test_bad_group_raises(group: object) -> None:
    """A group that is neither a ProcessGroup nor None is refused, naming tp_group."""
    with pytest.raises(ValueError, match="tp_group"):
        TPSync(group)


def test_non_int_values_raise() -> None:
    """A float would be truncated silently in the int64 pack, so it is refused."""
    with pytest.raises(TypeError):
        TPSync(None).reduce_min([1.5])
