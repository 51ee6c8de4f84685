"""MemoryManager under tensor parallelism: two gloo ranks whose storage directories hold
different amounts of the same prefixes schedule identical plans.

Rank 0's directory holds every page an earlier manager stored; rank 1's only the first
pages of each prefix, and one of its pages is truncated. Both ranks run the same requests
through the FakeEngine (KV verified before every step, ``mm.check()`` after every step);
prefetch and match are MIN-reduced, so both load what the poorer rank has, and make the same
number of collective calls. Each rank puts what it saw on a queue; a hang fails the test (the
process group has a timeout and the parent waits with one).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks

from hybridkv import CacheConfig, MemoryManager, Request
from hybridkv.sim.engine import FakeEngine
from hybridkv.tree.storage import FileStorage

WORLD = 2
PG_TIMEOUT_S = 30
RESULT_TIMEOUT_S = 120
VOCAB = 50
PAGE = 4


def _config(storage: Path) -> CacheConfig:
    return CacheConfig(
        num_layers=4,
        swa_layer_ids=(1, 3),
        num_kv_heads=1,
        head_dim=4,
        page_size=PAGE,
        dtype=torch.bfloat16,
        full_tokens=160,
        swa_tokens=64,
        sliding_window=16,
        host_tokens=512,
        write_policy="write_through",
        storage=str(storage),
        chunked_prefill_size=64,
        max_context_len=256,
        device="cpu",
        backend="torch",
    )


def _prefixes() -> list[list[int]]:
    """Four shared prefixes, longer than the window, whole pages."""
    rng = random.Random(11)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in (40, 48, 32, 56)]


def _requests() -> list[tuple[int, Request]]:
    """(arrival step, request): turns on the stored prefixes among fresh prompts that push
    them out of the device, so later turns hit host or storage."""
    rng = random.Random(12)
    prefixes = _prefixes()
    out = []
    for i in range(24):
        if i % 3 == 2:
            ids = [rng.randrange(VOCAB) for _ in range(rng.randint(30, 56))]
        else:
            ids = prefixes[i % 4] + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))]
        out.append((2 * i, Request(f"q{i}", ids, rng.randint(1, 6))))
    return out


def _run_rank(rank: int, storage: Path) -> dict:
    """Everything a rank does; returns what it saw, in order."""
    contains: list[int] = []
    real_contains = FileStorage.contains

    def spy(self: FileStorage, keys: list[str]) -> int:
        n = real_contains(self, keys)
        contains.append(n)
        return n

    reads: list[tuple[int, int]] = []
    real_read = FileStorage.read

    def read_spy(self: FileStorage, keys: list[str], *args: object) -> tuple[int, list[bool]]:
        n, flags = real_read(self, keys, *args)
        reads.append((len(keys), n))
        return n, flags

    FileStorage.contains = spy
    FileStorage.read = read_spy
    mm = MemoryManager(_config(storage), tp_group=dist.group.WORLD)
    eng = FakeEngine(mm, vocab=VOCAB)
    pending = _requests()
    plans, finished, step = [], [], 0
    while pending or eng.seqs:
        while pending and pending[0][0] <= step:
            eng.add(pending.pop(0)[1])
        plan, done = eng.step()
        mm.check()
        finished.extend(done)
        if plan is not None:
            reqs = [
                (r.rid, r.extend_start, r.extend_len, r.cached_len, r.loaded_len, r.is_decode)
                for r in plan.reqs
            ]
            plans.append((step, reqs, plan.out_cache_loc.tolist()))
        step += 1
        if step > 2000:
            raise RuntimeError("did not finish")
    stats = mm.stats()
    calls = mm.tp.calls
    mm.close()
    return {
        "plans": plans,
        "finished": sorted(finished),
        "stats": stats,
        "calls": calls,
        "contains": contains,
        "reads": reads,
    }


def _populate(root: Path) -> tuple[Path, Path, int]:
    """Rank 0's directory: every page of every prefix, stored by an earlier manager. Rank 1's:
    the first half of each prefix's pages, one of them truncated. Returns both and how many
    pages rank 1 lacks."""
    rich, poor = root / "rank0", root / "rank1"
    mm = MemoryManager(_config(rich))
    eng = FakeEngine(mm, vocab=VOCAB)
    for i, prefix in enumerate(_prefixes()):
        eng.add(Request(f"warm{i}", list(prefix), 1))
        while eng.step()[0] is not None:
            mm.check()
    store = mm.tree.host.storage
    mm.close()
    missing = 0
    for i, prefix in enumerate(_prefixes()):
        keys = store.keys(prefix, PAGE)
        assert all(store.path(k).is_file() for k in keys), "the warm-up stored every page"
        keep = len(keys) // 2
        for j, key in enumerate(keys[:keep]):
            src = store.path(key)
            dst = poor / src.relative_to(rich)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            if i == 1 and j == keep - 1:
                dst.write_bytes(dst.read_bytes()[:-3])  # truncated on rank 1 only
        missing += len(keys) - keep
    return rich, poor, missing


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """Run the same requests on two gloo ranks with unequal storage; every test reads it."""
    rich, poor, missing = _populate(tmp_path_factory.mktemp("tp"))
    assert missing > 0
    got = run_ranks(_run_rank, [(rich,), (poor,)], RESULT_TIMEOUT_S, PG_TIMEOUT_S)
    for rank, res in got.items():
        assert "error" not in res, f"rank {rank}: {res['error']}\n{res['tb']}"
    return got


def test_every_request_finishes_on_both_ranks(two_ranks: dict[int, dict]) -> None:
    """Both ranks finish every request (KV verified by the engine, check() every step)."""
    want = sorted(r.rid for _, r in _requests())
    assert two_ranks[0]["finished"] == two_ranks[1]["finished"] == want


def test_ranks_saw_different_storage(two_ranks: dict[int, dict]) -> None:
    """The precondition: locally, rank 0's storage held more of the prefixes than rank 1's."""
    c0, c1 = two_ranks[0]["contains"], two_ranks[1]["contains"]
    assert len(c0) == len(c1), "every prefetch asks storage on every rank"
    assert all(a >= b for a, b in zip(c0, c1, strict=True)) and sum(c0) > sum(c1)


def test_a_read_that_failed_on_one_rank_is_released_on_both(two_ranks: dict[int, dict]) -> None:
    """Rank 1's truncated page: its read came up short while rank 0's was whole, and the
    prefetch was dropped on both (the plans below stay identical)."""
    r0, r1 = two_ranks[0]["reads"], two_ranks[1]["reads"]
    assert [asked for asked, _ in r0] == [asked for asked, _ in r1]
    short = [i for i, (asked, got) in enumerate(r1) if got < asked]
    assert short and all(r0[i][1] == r0[i][0] for i in short)


def test_ranks_schedule_identical_plans(two_ranks: dict[int, dict]) -> None:
    """Same steps, same requests, same extend/cached/loaded lengths, same slots."""
    p0, p1 = two_ranks[0]["plans"], two_ranks[1]["plans"]
    assert len(p0) == len(p1)
    for a, b in zip(p0, p1, strict=True):
        assert a == b
    loaded = [r[4] for _, reqs, _ in p0 for r in reqs]
    assert any(loaded), "some prefix came back from host or storage"


def test_ranks_make_the_same_collective_calls(two_ranks: dict[int, dict]) -> None:
    """Every rank makes the same number of all-reduces, whatever its local storage."""
    assert two_ranks[0]["calls"] == two_ranks[1]["calls"] > 0


def test_ranks_agree_on_counters(two_ranks: dict[int, dict]) -> None:
    """Decisions were the poorer rank's: identical hit and load counters, storage hits on both."""
    s0, s1 = two_ranks[0]["stats"], two_ranks[1]["stats"]
    assert s0 == s1
    assert s0["storage_hit_tokens"] > 0 and s0["loaded_tokens"] > 0
