"""TP ranks whose local state differs cannot diverge: two gloo ranks with different host
pools (and storage directories) run the same request stream (at least 200 steps, until every
request finished) and schedule the same plans, making the same collective calls every step.

Each step the ranks exchange (``all_gather_object``, outside the manager's count) what they
scheduled and how many collective calls the step made; a rank that saw a difference
records it. A rank that stopped making the manager's calls would leave the other waiting:
the process group's timeout fails it, and the parent waits with a timeout too.
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
from hybridkv.errors import CheckError
from hybridkv.scheduler.tp import TPSync
from hybridkv.sim.engine import FakeEngine

WORLD = 2
STEPS = 200
PG_TIMEOUT_S = 60
RESULT_TIMEOUT_S = 240
VOCAB = 50
PAGE = 4


def _swa_config(host_tokens: int, storage: Path | None) -> CacheConfig:
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
        host_tokens=host_tokens,
        write_policy="write_through",
        storage=None if storage is None else str(storage),
        chunked_prefill_size=32,
        max_context_len=256,
        device="cpu",
        backend="torch",
    )


def _mamba_config(host_tokens: int) -> CacheConfig:
    """Recurrent layers: a prefix is usable only at a snapshot, which may be on host only."""
    return _swa_config(host_tokens, None).replace(
        swa_layer_ids=(1,), mamba_layer_ids=(2, 3), state_shape=(2, 3), state_slots=12
    )


def _arena_config(host_tokens: int) -> CacheConfig:
    """The SWA config's bytes as one arena: the pools grow and shrink by demand."""
    static = _swa_config(host_tokens, None)
    return static.replace(memory_bytes=MemoryManager(static).stats()["memory_bytes"])


def _prefixes() -> list[list[int]]:
    rng = random.Random(21)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in (40, 48, 32, 56, 24)]


def _requests() -> list[tuple[int, Request]]:
    """(arrival step, request): bursts of turns on shared prefixes and repeated prompts among
    fresh prompts that push them out of the device, over most of the run."""
    rng = random.Random(22)
    prefixes = _prefixes()
    out = []
    step = 0
    for i in range(60):
        step += rng.choice((0, 0, 1, 3, 5))
        if i % 4 == 3:
            ids = [rng.randrange(VOCAB) for _ in range(rng.randint(20, 60))]
        elif i % 4 == 1 and out:
            # NOTE: an earlier prompt again: with recurrent layers only a whole prompt's
            # snapshot (its last page boundary) is a hit.
            ids = list(rng.choice(out)[1].input_ids)
        else:
            ids = rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))]
        out.append((step, Request(f"q{i}", ids, rng.randint(1, 8))))
    return out


def _digest(plan: object) -> tuple | None:
    """What a rank computes this step: requests, positions, lengths (the same on every rank
    by contract); and where its KV came from and went (the same while the trees agree)."""
    if plan is None:
        return None
    compute = [
        (r.rid, r.extend_start, r.extend_len, r.is_decode, r.produces_token) for r in plan.reqs
    ]
    return compute, [(r.cached_len, r.loaded_len) for r in plan.reqs]


def _run_rank(config: CacheConfig) -> dict:
    mm = MemoryManager(config, tp_group=dist.group.WORLD)
    eng = FakeEngine(mm, vocab=VOCAB)
    released: list[int] = []
    release = mm.tree.release_prefetched

    def spy(prefetches: list) -> int:
        released.append(release(prefetches))
        return released[-1]

    mm.tree.release_prefetched = spy
    pending = _requests()
    compute_diffs, source_diffs, call_diffs, per_step = [], [], [], []
    finished: list[str] = []
    step = 0
    while step < STEPS or pending or eng.seqs:
        if step > 10 * STEPS:
            raise RuntimeError("the requests did not finish")
        while pending and pending[0][0] <= step:
            eng.add(pending.pop(0)[1])
        before = mm.tp.calls
        plan, done = eng.step()
        calls = mm.tp.calls - before
        mm.check()
        finished += done
        digest = _digest(plan)
        mine = (digest, calls)
        got: list = [None] * WORLD
        dist.all_gather_object(got, mine)
        if len({repr(g[0] and g[0][0]) for g in got}) > 1:
            compute_diffs.append((step, got))
        if len({repr(g[0]) for g in got}) > 1:
            source_diffs.append(step)
        if len({g[1] for g in got}) > 1:
            call_diffs.append((step, got))
        per_step.append(calls)
        step += 1
    stats = mm.stats()
    mm.close()
    return {
        "compute_diffs": compute_diffs,
        "source_diffs": source_diffs,
        "call_diffs": call_diffs,
        "per_step": per_step,
        "finished": sorted(finished),
        "unfinished": sorted(set(r.rid for _, r in _requests()) - set(finished)),
        "stats": stats,
        "released": released,
    }


def _check_catches_a_skipped_call(rank: int) -> str:
    """A rank that counted a call the other did not make: check() raises on both."""
    sync = TPSync(dist.group.WORLD)
    sync.reduce_min([rank])
    if rank == 0:
        sync.calls += 1  # as if it had made a call that rank 1 skipped
    try:
        sync.check()
    except CheckError as exc:
        return str(exc)
    return "no error"


def _rank(rank: int, config: CacheConfig) -> dict:
    res = _run_rank(config)
    res["skipped_call"] = _check_catches_a_skipped_call(rank)
    return res


def _stored(root: Path) -> Path:
    """A directory holding every page of every prefix, stored by an earlier manager."""
    mm = MemoryManager(_swa_config(512, root))
    eng = FakeEngine(mm, vocab=VOCAB)
    for i, prefix in enumerate(_prefixes()):
        eng.add(Request(f"warm{i}", list(prefix), 1))
        while eng.step()[0] is not None:
            mm.check()
    mm.close()
    return root


def _poorer(rich: Path, poor: Path) -> int:
    """A copy of ``rich`` missing the second half of each prefix's pages, one of the kept
    ones corrupt (a flipped byte). Returns how many pages it lacks."""
    store = MemoryManager(_swa_config(512, rich)).tree.host.storage
    missing = 0
    for i, prefix in enumerate(_prefixes()):
        keys = store.keys(prefix, PAGE)
        keep = len(keys) // 2
        for j, key in enumerate(keys[:keep]):
            src = store.path(key)
            dst = poor / src.relative_to(rich)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            if i == 0 and j == keep - 1:
                data = bytearray(dst.read_bytes())
                data[-1] ^= 0xFF
                dst.write_bytes(bytes(data))
        missing += len(keys) - keep
    return missing


def _scenarios(root: Path) -> dict[str, list[CacheConfig]]:
    rich = _stored(root / "rich")
    assert _poorer(rich, root / "poor") > 0
    return {
        "storage differs": [_swa_config(512, rich), _swa_config(512, root / "poor")],
        "host and storage differ": [_swa_config(512, rich), _swa_config(96, root / "poor")],
        "host differs, recurrent layers": [_mamba_config(512), _mamba_config(192)],
        "host differs, arena": [_arena_config(512), _arena_config(96)],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, dict]]:
    out = {}
    for name, configs in _scenarios(tmp_path_factory.mktemp("tp_agree")).items():
        got = run_ranks(_rank, [(c,) for c in configs], RESULT_TIMEOUT_S, PG_TIMEOUT_S)
        for rank, res in got.items():
            assert "error" not in res, f"{name}, rank {rank}: {res['error']}\n{res['tb']}"
        out[name] = got
    return out


SCENARIOS = [
    "storage differs",
    "host and storage differ",
    "host differs, recurrent layers",
    "host differs, arena",
]


@pytest.mark.parametrize("name", SCENARIOS)
def test_ranks_compute_the_same_steps(runs: dict, name: str) -> None:
    """200 steps: every step both ranks schedule the same requests, positions and lengths,
    and every request finishes on both."""
    for rank in range(WORLD):
        assert runs[name][rank]["compute_diffs"] == [], f"rank {rank}"
    assert runs[name][0]["finished"] == runs[name][1]["finished"]
    assert runs[name][0]["unfinished"] == []


@pytest.mark.parametrize("name", SCENARIOS)
def test_collectives_per_step_agree(runs: dict, name: str) -> None:
    """Every schedule() made the same number of collective calls on both ranks, whatever each
    rank's host pool and storage held; prefill steps made some, decode steps none."""
    for rank in range(WORLD):
        assert runs[name][rank]["call_diffs"] == [], f"rank {rank}"
    per_step = runs[name][0]["per_step"]
    assert per_step == runs[name][1]["per_step"]
    assert any(per_step) and 0 in per_step


def test_storage_only_differences_keep_the_trees_identical(runs: dict) -> None:
    """With equal host pools, the poorer rank's storage decides what both load: where each
    prompt's KV came from is identical too, and so are the counters."""
    run = runs["storage differs"]
    assert run[0]["source_diffs"] == run[1]["source_diffs"] == []
    assert run[0]["stats"] == run[1]["stats"]
    assert run[0]["stats"]["storage_hit_tokens"] > 0


def test_a_prefetch_that_failed_on_one_rank_is_dropped_on_both(runs: dict) -> None:
    """Rank 1's corrupt page: its read failed where rank 0's arrived, so rank 0 dropped
    what it had prefetched in that round (and rank 1, with as much host memory, had nothing
    to drop). With rank 1's host pool smaller, its prefetches fail for room too."""
    r0, r1 = runs["storage differs"][0]["released"], runs["storage differs"][1]["released"]
    assert len(r0) == len(r1) > 0
    assert sum(r0) > 0 and sum(r1) == 0
    r0, r1 = (runs["host and storage differ"][r]["released"] for r in range(WORLD))
    assert len(r0) == len(r1) > 0 and sum(r0) > 0


def test_differing_host_pools_were_exercised(runs: dict) -> None:
    """The precondition of the host scenarios: the ranks' host tiers did differ, and both
    loaded prefixes (KV, SWA KV or snapshots) back from them."""
    for name in ("host and storage differ", "host differs, recurrent layers"):
        s0, s1 = runs[name][0]["stats"], runs[name][1]["stats"]
        assert s0["host_free"] != s1["host_free"], name
        loads = ("loaded_tokens", "loaded_swa_tokens", "loaded_states")
        assert all(sum(s[k] for k in loads) > 0 for s in (s0, s1)), name


def test_check_catches_a_skipped_call(runs: dict) -> None:
    """check() compares the ranks' call counts: one rank off by one raises on both."""
    for name in SCENARIOS:
        for rank in range(WORLD):
            assert "different numbers of collective calls" in runs[name][rank]["skipped_call"]


@pytest.mark.parametrize("recurrent", [False, True])
def test_usable_ends_predict_match_prefix(tmp_path: Path, recurrent: bool) -> None:
    """The read-only figures the ranks reduce agree with what a match then does: for every
    page boundary ``p`` that ``usable_ends`` marks, ``match_prefix(tokens, p)`` matches
    exactly ``p`` tokens, and at every other one less; ``reach`` is where the walk ends.
    Checked on trees with device, host-only (some prefetched from storage) and tombstoned
    nodes, and snapshots."""
    if recurrent:
        mm = MemoryManager(_mamba_config(256))
    else:
        mm = MemoryManager(_swa_config(256, _stored(tmp_path / "kv")))
    eng = FakeEngine(mm, vocab=VOCAB)
    tree, checked, from_host = mm.tree, 0, 0
    for i, (_, req) in enumerate(_requests()[:40]):
        eng.add(req)
        while eng.step()[0] is not None:
            pass
        mm.check()
        if not recurrent and i % 8 == 0:
            for prefix in _prefixes():
                _, reached = tree.reach(prefix, len(prefix))
                tree.prefetch(prefix, tree.storage_reach(prefix, reached, len(prefix)))
        for _, other in _requests()[:40]:
            ids, limit = list(other.input_ids), len(other.input_ids) - 1
            _, reached = tree.reach(ids, limit)
            ends = tree.usable_ends(ids, reached)
            assert len(ends) == reached // PAGE
            for k, usable in enumerate(ends):
                match = tree.match_prefix(ids, (k + 1) * PAGE)
                got = match.length + match.host_hit_length
                assert (got == (k + 1) * PAGE) == usable, (other.rid, k)
                checked += usable
                loads = match.host_hit_length + match.swa_host_hit_length + match.state_from_host
                from_host += usable and loads > 0
            assert tree.reach(ids, limit)[1] == reached
        mm.check()
    assert checked > 0 and from_host > 0
