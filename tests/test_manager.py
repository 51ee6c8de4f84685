"""MemoryManager through the engine contract: KV integrity, backends, bad input, abort, chunking."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch
from helpers import assert_refused_unchanged
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)
from workloads import (
    Arrival,
    ChatSession,
    Driver,
    chat_sessions,
    check_gauges,
    random_mix,
    session_tokens,
    small_config,
    tokens,
)

from hybridkv import CacheConfig, MemoryManager, Request
from hybridkv.scheduler.cost import cost

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# Model shapes: page sizes 1/2/4/8, a window smaller than a page, a model without SWA layers,
# one with SWA layers only.
MODELS = {
    "ps1": dict(page_size=1, sliding_window=5, num_kv_heads=1, head_dim=8),
    "ps4": dict(page_size=4, sliding_window=10),
    "ps8-window<page": dict(page_size=8, sliding_window=5, num_kv_heads=1, head_dim=8),
    "ps4-noswa": dict(page_size=4, swa_layer_ids=(), num_layers=2),
    "ps2-allswa": dict(page_size=2, num_layers=2, swa_layer_ids=(0, 1), sliding_window=7),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pages(n: int, ps: int) -> int:
    return -(-n // ps)


def roomy_full(ps: int, total: int) -> int:
    """A full pool with room for about two requests of ``total`` tokens: tight enough that a
    busy mix evicts and retracts."""
    return (_pages(total, ps) + 2) * ps + total


def roomy_swa(cfg: CacheConfig) -> int:
    """An SWA pool with room for about two requests' windows and a chunk."""
    return 2 * cfg.min_swa_tokens + cfg.chunked_prefill_size


def _longest(arrivals: list[Arrival]) -> int:
    return max(len(a.request.input_ids) + a.request.max_new_tokens for a in arrivals)


def model_config(model: str, dtype: str = "bf16", **overrides: object) -> CacheConfig:
    return small_config(**(MODELS[model] | {"dtype": DTYPES[dtype]} | overrides))


def _fresh(mm: MemoryManager) -> MemoryManager:
    return MemoryManager(mm.config)


# ------------------------------------------------------------------ KV integrity


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
def test_chat_with_shared_system_prompts(model: str, dtype: str) -> None:
    """Multi-turn chats sharing system prompts run to completion with intact KV and hit the tree."""
    rng = random.Random(f"chat-{model}")
    sessions = chat_sessions(rng, 6, turns=(2, 4), system_len=(8, 24), new_tokens=(1, 8))
    longest = max(session_tokens(s) for s in sessions)
    cfg = model_config(model, dtype, max_running_requests=4)
    cfg = cfg.replace(full_tokens=max(roomy_full(cfg.page_size, longest), 160))
    if cfg.has_swa:
        cfg = cfg.replace(swa_tokens=roomy_swa(cfg) + 2 * cfg.page_size)
    mm = MemoryManager(cfg)
    stats = Driver(mm).run(sessions=sessions)
    assert stats["device_hit_tokens"] > 0
    assert stats["evicted_full_tokens"] > 0


# model -> (requests, max_new_tokens range, max_running_requests, arrival steps, seed): full pool
# one request's need (roomy_full), tight enough that eviction and retraction happen.
TIGHT = {
    "ps1": (16, (8, 24), 6, 2, 1),
    "ps4": (16, (16, 40), 6, 2, 1),
    "ps8-window<page": (16, (24, 64), 6, 2, 2),
    "ps4-noswa": (16, (8, 24), 6, 2, 3),
    "ps2-allswa": (16, (8, 24), 6, 2, 1),
}


def tight_setup(model: str, dtype: str) -> tuple[CacheConfig, list[Arrival]]:
    """The TIGHT workload of ``model`` and its config."""
    n, new_tokens, running, steps, seed = TIGHT[model]
    cfg = model_config(model, dtype, max_running_requests=running)
    ps = cfg.page_size
    arrivals = random_mix(
        random.Random(seed),
        n,
        prompt_len=(1, 2 * ps + 2),
        prefix_len=(1, 2 * ps + 2),
        new_tokens=new_tokens,
        steps=steps,
    )
    cfg = cfg.replace(full_tokens=roomy_full(ps, _longest(arrivals)))
    if cfg.has_swa:
        cfg = cfg.replace(swa_tokens=roomy_swa(cfg))
    return cfg, arrivals


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
def test_tight_random_mix_evicts_and_retracts(model: str, dtype: str) -> None:
    """A decode-heavy random mix in tight pools finishes with intact KV, evicting and retracting."""
    cfg, arrivals = tight_setup(model, dtype)
    stats = Driver(MemoryManager(cfg)).run(arrivals)
    assert stats["evicted_full_tokens"] > 0
    assert stats["retracted_requests"] > 0
    if cfg.has_swa:
        assert stats["evicted_swa_tokens"] > 0


@pytest.mark.parametrize("model", ["ps1", "ps4-noswa"])
def test_next_turn_hits_whole_previous_turn(model: str) -> None:
    """In a roomy pool each turn's first chunk finds every whole page the previous turn computed."""
    cfg = model_config(model, full_tokens=512, swa_tokens=256)
    ps = cfg.page_size
    session = ChatSession("c", list(range(13)), [([20, 21, 22], 6), ([30, 31], 5), ([40], 3)])
    driver = Driver(MemoryManager(cfg), record=True)
    driver.run(sessions=[session])
    firsts = [p["reqs"][0] for p in driver.plans if not p["reqs"][0].is_decode]
    assert [r.rid for r in firsts] == ["c.0", "c.1", "c.2"]
    prev_kv = 13 + 3 + 6 - 1  # turn 0 prompt + output, less the last token (no KV)
    assert firsts[1].cached_len == prev_kv - prev_kv % ps == firsts[1].extend_start
    prev_kv += 1 + 2 + 5 - 1
    assert firsts[2].cached_len == prev_kv - prev_kv % ps


# ------------------------------------------------------------------ backends


def chat_setup(model: str, dtype: str, backend: str) -> tuple[CacheConfig, list[Arrival], list]:
    """A small mix of requests and two-turn chats, in pools one request's need."""
    cfg = model_config(model, dtype, max_running_requests=4, backend=backend)
    ps = cfg.page_size
    rng = random.Random(7)
    arrivals = random_mix(
        rng, 5, prompt_len=(1, 2 * ps + 3), prefix_len=(1, 2 * ps), new_tokens=(2, 9), steps=3
    )
    sessions = chat_sessions(rng, 2, turns=(2, 2), system_len=(6, 10), new_tokens=(1, 3))
    longest = max(_longest(arrivals), *map(session_tokens, sessions))
    cfg = cfg.replace(full_tokens=roomy_full(ps, longest))
    if cfg.has_swa:
        cfg = cfg.replace(swa_tokens=roomy_swa(cfg))
    return cfg, arrivals, sessions


@pytest.mark.parametrize(
    "kind,model,dtype",
    [
        ("chat", "ps4", "bf16"),
        ("chat", "ps8-window<page", "fp32"),
        ("chat", "ps1", "fp32"),
        ("tight", "ps4-noswa", "fp32"),
        ("tight", "ps4", "bf16"),
    ],
)
def test_triton_and_torch_backends_plan_identically(kind: str, model: str, dtype: str) -> None:
    """The same workload under the Triton (interpreter) and torch backends gives the same plans,
    slot for slot, and the same stats."""
    plans, stats = [], []
    for backend in ("torch", "triton"):
        if kind == "chat":
            cfg, arrivals, sessions = chat_setup(model, dtype, backend)
        else:
            (cfg, arrivals), sessions = tight_setup(model, dtype), []
            cfg = cfg.replace(backend=backend)
        driver = Driver(MemoryManager(cfg), record=True)
        stats.append(driver.run(arrivals, sessions))
        plans.append(driver.plans)
    assert stats[0] == stats[1]
    assert stats[0]["evicted_full_tokens"] > 0
    if kind == "tight":
        assert stats[0]["retracted_requests"] > 0
    assert len(plans[0]) == len(plans[1])
    for step, (a, b) in enumerate(zip(*plans, strict=True)):
        assert a == b, f"step {step}"


# ------------------------------------------------------------------ bad input


@pytest.fixture
def busy() -> Iterator[Driver]:
    """A manager mid-run: one request decoding, one chunked, one waiting, a cached prefix."""
    cfg = small_config(full_tokens=128, swa_tokens=64, max_context_len=64, max_running_requests=2)
    driver = Driver(MemoryManager(cfg))
    driver.add(Request("done", list(range(9)), 2))
    while driver.live:
        driver.step()
    driver.add(Request("run", list(range(9)) + [3], 20))
    driver.step()
    driver.add(Request("chunked", list(range(40)), 4))
    driver.step()
    driver.add(Request("wait", [1, 2, 3], 4))
    s = driver.mm.stats()
    assert (s["running"], s["waiting"]) == (2, 1) and s["full_cached"] > 0
    yield driver


BAD_REQUESTS = {
    "empty prompt": (Request("x", [], 4), "input_ids"),
    "duplicate running rid": (Request("run", [1, 2], 4), "rid"),
    "duplicate waiting rid": (Request("wait", [1, 2], 4), "rid"),
    "zero max_new_tokens": (Request("x", [1, 2], 0), "max_new_tokens"),
    "negative max_new_tokens": (Request("x", [1, 2], -3), "max_new_tokens"),
    "bool max_new_tokens": (Request("x", [1, 2], True), "max_new_tokens"),
    "over max_context_len": (Request("x", list(range(60)), 5), "max_context_len"),
    "negative token id": (Request("x", [1, -2], 4), "input_ids"),
    "float token id": (Request("x", [1, 2.0], 4), "input_ids"),  # type: ignore[list-item]
    "token id past int64": (Request("x", [1, 2**63], 4), "input_ids"),
    "str prompt": (Request("x", "abc", 4), "input_ids"),  # type: ignore[arg-type]
    "empty rid": (Request("", [1], 4), "rid"),
    "int rid": (Request(7, [1], 4), "rid"),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_add_request_rejects_bad_input(busy: Driver, case: str) -> None:
    """Each malformed request raises ValueError naming the problem and changes nothing."""
    request, field = BAD_REQUESTS[case]
    assert_refused_unchanged(busy.mm, lambda: busy.mm.add_request(request), field)
    busy.run()  # the manager still works


def test_add_request_rejects_what_never_fits_the_pools() -> None:
    """A request whose cost() exceeds the full pool is refused; the largest that fits is not."""
    cfg = small_config(full_tokens=64, max_context_len=1024)
    mm = MemoryManager(cfg)
    fits = max(n for n in range(1, 200) if cost(cfg, n).full <= cfg.full_tokens)
    assert_refused_unchanged(
        mm, lambda: mm.add_request(Request("x", [1] * (fits - 3), 4)), "full_tokens"
    )
    mm.add_request(Request("x", [1] * (fits - 3), 3))
    assert mm.stats()["waiting"] == 1


def test_add_request_accepts_exactly_max_context_len() -> None:
    """prompt + max_new_tokens == max_context_len is accepted and runs; one more is refused."""
    cfg = small_config(full_tokens=256, max_context_len=30)
    driver = Driver(MemoryManager(cfg))
    assert_refused_unchanged(
        driver.mm, lambda: driver.mm.add_request(Request("x", [5] * 21, 10)), "max_context"
    )
    driver.run([Arrival(0, Request("x", [5] * 20, 10))])


def test_unknown_rid_is_rejected(busy: Driver) -> None:
    """abort / req_slots of a never-added or finished rid raise ValueError and change nothing."""
    mm = busy.mm
    for rid in ("nope", "done"):
        assert_refused_unchanged(mm, lambda rid=rid: mm.abort(rid), "rid")
        assert_refused_unchanged(mm, lambda rid=rid: mm.req_slots(rid), "rid")


BAD_CONFIGS = [
    ("num_layers", 0),
    ("num_kv_heads", -1),
    ("head_dim", 0),
    ("page_size", 0),
    ("page_size", True),
    ("chunked_prefill_size", 0),
    ("chunked_prefill_size", 2),  # less than a page
    ("max_prefill_tokens", 0),
    ("max_running_requests", 0),
    ("max_context_len", 0),
    ("swa_layer_ids", (4,)),
    ("swa_layer_ids", (1, 1)),
    ("mamba_layer_ids", (1,)),
    ("sliding_window", 0),
    ("swa_tokens", 8),
    ("full_tokens", 4),
    ("write_policy", "write_around"),
    ("swa_eviction", "fifo"),
    ("dtype", torch.int32),
    ("device", "nonsense"),
    ("backend", "cuda"),
    ("host_tokens", -1),
    ("host_tokens", 2),  # less than two pages
    ("storage", "/tmp/nowhere"),  # without the host tier
    ("sliding_window", None),  # with SWA layers
    ("swa_tokens", 0),  # with SWA layers
    ("vocab_size", 0),
    ("vocab_size", 50.0),
]
BAD_CONFIGS += [
    ("full_tokens", 64.5),
    ("full_tokens", "64"),
    ("full_tokens", None),
    ("swa_tokens", 40.0),
    ("swa_layer_ids", "13"),
    ("swa_layer_ids", (1.0,)),
]


@pytest.mark.parametrize("field,value", BAD_CONFIGS, ids=repr)
def test_bad_config_field_is_rejected(field: str, value: object) -> None:
    """Each unworkable CacheConfig field raises ValueError naming it (from CacheConfig or
    MemoryManager)."""
    with pytest.raises(ValueError, match=field):
        MemoryManager(small_config(**{field: value}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_rejected() -> None:
    """device='cuda' on a machine without CUDA is a config that cannot work: ValueError."""
    with pytest.raises(ValueError, match="device"):
        MemoryManager(small_config(device="cuda"))


def test_commit_with_wrong_number_of_ids(busy: Driver) -> None:
    """commit with too few or too many ids raises ValueError, changes nothing, and the plan stays
    committable."""
    mm = busy.mm
    plan = mm.schedule()
    assert plan is not None
    n = len(plan.reqs)
    bad = ([1] * (n - 1), [1] * (n + 1), [], [-1] * n, [2**63] * n, [2**64] * n, [1.0] * n)
    for ids in (*bad, torch.ones(n + 1, dtype=torch.int64)):
        assert_refused_unchanged(mm, lambda ids=ids: mm.commit(plan, ids), "next_token_ids")
    busy.step(plan)
    busy.run()


def test_commit_of_a_stale_or_foreign_plan(busy: Driver) -> None:
    """Committing a plan twice, another manager's plan, or None raises ValueError."""
    mm = busy.mm
    plan = mm.schedule()
    assert plan is not None
    ids = [1] * len(plan.reqs)
    busy.step(plan)
    assert_refused_unchanged(mm, lambda: mm.commit(plan, ids), "plan")
    assert_refused_unchanged(mm, lambda: mm.commit(None, []), "plan")  # type: ignore[arg-type]
    other = _fresh(mm)
    other.add_request(Request("o", [1, 2, 3], 2))
    foreign = other.schedule()
    assert foreign is not None
    assert_refused_unchanged(mm, lambda: mm.commit(foreign, [1]), "plan")
    busy.run()


def test_schedule_twice_without_commit(busy: Driver) -> None:
    """A second schedule() before commit raises ValueError; the first plan still commits."""
    mm = busy.mm
    plan = mm.schedule()
    assert plan is not None
    assert_refused_unchanged(mm, mm.schedule, "commit")
    busy.step(plan)
    busy.run()


# ------------------------------------------------------------------ abort


def _roomy(**overrides: object) -> CacheConfig:
    return small_config(**({"full_tokens": 256, "swa_tokens": 128} | overrides))


def _first_chunk(driver: Driver, rid: str) -> object:
    """Run until ``rid``'s first chunk is scheduled; return it."""
    while True:
        plan = driver.step()
        assert plan is not None
        for r in plan.reqs:
            if r.rid == rid:
                return r


def test_abort_waiting_request() -> None:
    """Aborting a waiting request leaves the pools as they were and it is forgotten."""
    driver = Driver(MemoryManager(_roomy()))
    mm = driver.mm
    before = mm.stats()
    driver.add(Request("a", list(range(10)), 3))
    driver.abort("a")
    assert mm.stats() == before
    mm.check()
    assert mm.schedule() is None
    with pytest.raises(ValueError, match="rid"):
        mm.req_slots("a")


@pytest.mark.parametrize("model", ["ps4", "ps4-noswa", "ps8-window<page"])
def test_abort_running_request_keeps_its_kv_cached(model: str) -> None:
    """A decoding request aborted mid-generation leaves its whole pages in the tree: a later
    request with the same tokens hits them."""
    cfg = model_config(model, full_tokens=256, swa_tokens=128)
    ps = cfg.page_size
    driver = Driver(MemoryManager(cfg))
    driver.add(Request("a", list(range(13)), 20))
    for _ in range(5):
        driver.step()
    generated = driver.engine.outputs["a"]
    kv = 13 + len(generated) - 1
    driver.abort("a")
    driver.mm.check()
    check_gauges(driver.mm, driver.live)
    assert driver.mm.stats()["running"] == 0
    assert driver.mm.stats()["full_cached"] == kv - kv % ps
    driver.add(Request("b", list(range(13)) + generated + [7], 2))
    assert _first_chunk(driver, "b").cached_len == kv - kv % ps
    driver.run()


def test_abort_chunked_request_keeps_its_chunks_cached() -> None:
    """Aborting a request between prefill chunks keeps its computed chunks; a retry hits them."""
    cfg = _roomy(chunked_prefill_size=8)
    driver = Driver(MemoryManager(cfg))
    prompt = list(range(30))
    driver.add(Request("a", prompt, 3))
    assert _first_chunk(driver, "a").extend_len == 8
    driver.step()  # second chunk
    driver.abort("a")
    driver.mm.check()
    assert driver.mm.stats()["full_cached"] == 16
    driver.add(Request("b", prompt, 3))
    first = _first_chunk(driver, "b")
    assert (first.cached_len, first.extend_start, first.extend_len) == (16, 16, 8)
    driver.run()
    assert driver.finished == ["b"]


def test_abort_between_schedule_and_commit() -> None:
    """A request aborted after schedule() is skipped by commit(); the others of the plan go on,
    and what it computed before the plan stays cached."""
    cfg = _roomy()
    driver = Driver(MemoryManager(cfg))
    mm = driver.mm
    driver.add(Request("a", list(range(12)), 6))
    driver.add(Request("b", list(range(100, 109)), 6))
    driver.step()  # prefill of both
    driver.step()  # a decode step
    plan = mm.schedule()
    assert plan is not None and [r.rid for r in plan.reqs] == ["a", "b"]
    driver.abort("a")
    driver.step(plan, verify=False)  # the engine's forward runs the plan as scheduled
    assert driver.finished == []
    assert mm.stats()["full_cached"] == 12 + 8  # a: 13 tokens with KV, b: its 9-token prompt
    driver.run()
    driver.add(Request("c", list(range(12)) + [9], 1))
    assert _first_chunk(driver, "c").cached_len == 12
    driver.run()


def test_abort_chunked_between_schedule_and_commit() -> None:
    """A chunked request aborted after its second chunk is scheduled keeps only its first chunk
    cached; the stale chunk is skipped by commit() and a retry resumes after the first."""
    driver = Driver(MemoryManager(_roomy(chunked_prefill_size=8)))
    mm = driver.mm
    prompt = list(range(30))
    driver.add(Request("a", prompt, 3))
    driver.step()
    plan = mm.schedule()
    assert plan is not None and (plan.reqs[0].extend_start, plan.reqs[0].extend_len) == (8, 8)
    driver.abort("a")
    driver.step(plan, verify=False)
    assert mm.stats()["full_cached"] == 8 and mm.stats()["running"] == 0
    driver.add(Request("b", prompt, 3))
    first = _first_chunk(driver, "b")
    assert (first.cached_len, first.extend_start, first.extend_len) == (8, 8, 8)
    driver.run()


def test_rid_reused_between_schedule_and_commit() -> None:
    """An rid aborted after schedule() and re-added before commit() is a new request: commit()
    must not advance it."""
    driver = Driver(MemoryManager(_roomy()))
    mm = driver.mm
    driver.add(Request("a", list(range(10)), 3))
    plan = mm.schedule()
    assert plan is not None
    mm.abort("a")
    mm.add_request(Request("a", list(range(5)), 3))
    mm.commit(plan, [7])
    mm.check()
    assert mm.stats()["waiting"] == 1 and mm.req_slots("a").numel() == 0


# ------------------------------------------------------------------ chunked prefill


@pytest.mark.parametrize("model", ["ps1", "ps4", "ps8-window<page", "ps4-noswa"])
def test_chunked_prefill_fields_and_reuse(model: str) -> None:
    """A prompt longer than chunked_prefill_size is prefilled in page-multiple chunks with the
    contract's fields; a second request with the same prompt hits all its whole pages."""
    cfg = model_config(model, full_tokens=512, swa_tokens=256, chunked_prefill_size=16)
    ps = cfg.page_size
    prompt = tokens(random.Random(model), 45)
    driver = Driver(MemoryManager(cfg), record=True)
    driver.add(Request("a", prompt, 2))
    while driver.live:
        driver.step()
    chunks = [p["reqs"][0] for p in driver.plans if not p["reqs"][0].is_decode]
    assert [c.extend_start for c in chunks] == [0, 16, 32]
    assert [c.extend_len for c in chunks] == [16, 16, 13]
    assert [c.produces_token for c in chunks] == [False, False, True]
    assert [c.cached_len for c in chunks] == [0, 0, 0]
    assert all(c.loaded_len == 0 and c.req_pool_index == chunks[0].req_pool_index for c in chunks)
    assert len(driver.engine.outputs["a"]) == 2
    hits = driver.mm.stats()["device_hit_tokens"]
    driver.plans.clear()
    driver.add(Request("b", prompt, 2))
    driver.run()
    first = driver.plans[0]["reqs"][0]
    want = (len(prompt) - 1) - (len(prompt) - 1) % ps
    assert (first.cached_len, first.extend_start, first.extend_len) == (want, want, 45 - want)
    assert first.produces_token
    assert driver.mm.stats()["device_hit_tokens"] == hits + want


def test_chunks_respect_max_prefill_tokens() -> None:
    """With max_prefill_tokens below chunked_prefill_size, chunks are cut to it, in whole pages."""
    cfg = _roomy(chunked_prefill_size=32, max_prefill_tokens=12)
    driver = Driver(MemoryManager(cfg), record=True)
    driver.add(Request("a", list(range(30)), 1))
    driver.run()
    assert [p["reqs"][0].extend_len for p in driver.plans] == [12, 12, 6]


# ------------------------------------------------------------------ seed-bug regressions


@pytest.mark.parametrize(
    "window,ps",
    [
        (4, 4),
        (3, 4),
        (2, 1),
        (6, 2),  # the chunk's cost is also the smallest SWA pool CacheConfig accepts
    ],
)
def test_swa_pool_exactly_one_chunk(window: int, ps: int) -> None:
    """With the SWA pool exactly one chunk's cost, chunked prefill never fails to allocate over
    many steps of long prompts (it defers instead of taking the last page)."""
    chunk = 4 * ps
    cfg = small_config(page_size=ps, sliding_window=window, chunked_prefill_size=chunk)
    budget = cost(cfg, chunk).swa
    cfg = cfg.replace(swa_tokens=budget, full_tokens=512, max_running_requests=4)
    assert cfg.swa_tokens == cost(cfg, cfg.chunked_prefill_size).swa
    rng = random.Random(window * 10 + ps)
    arrivals = random_mix(rng, 12, prompt_len=(chunk, 3 * chunk), new_tokens=(1, 6), steps=30)
    stats = Driver(MemoryManager(cfg)).run(arrivals)
    assert stats["evicted_swa_tokens"] > 0


@st.composite
def workloads(draw: st.DrawFn, tight: bool = False) -> tuple[CacheConfig, list[Arrival]]:
    """A random config and request mix. ``tight``: pools down to what add_request and
    CacheConfig accept; else with room for any lone request (see roomy_full / roomy_swa)."""
    ps = draw(st.sampled_from([1, 2, 4, 8]), label="page_size")
    cfg = small_config(
        page_size=ps,
        swa_layer_ids=draw(st.sampled_from([(1, 3), (), (0, 1, 2, 3)]), label="swa_layer_ids"),
        sliding_window=draw(st.integers(1, 3 * ps + 3), label="window"),
        chunked_prefill_size=ps * draw(st.integers(1, 4)),
        max_prefill_tokens=ps * draw(st.integers(1, 6)),
        max_running_requests=draw(st.integers(1, 6)),
        swa_eviction=draw(st.sampled_from(["window", "lru"])),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float32])),
    )
    seed = draw(st.integers(0, 2**16))
    shapes = draw(
        st.lists(
            st.tuples(
                st.integers(0, 3),  # shared prefix (3: none)
                st.integers(1, 3 * ps + 4),  # own prompt tokens
                st.integers(1, 2 * ps + 6),  # max_new_tokens
                st.integers(0, 8),  # arrival step
            ),
            min_size=1,
            max_size=1 if tight else 10,
        )
    )
    rng = random.Random(seed)
    prefixes = [tokens(rng, rng.randint(1, 2 * ps + 2)) for _ in range(3)]
    arrivals = [
        Arrival(step, Request(f"r{i}", (prefixes[p] if p < 3 else []) + tokens(rng, n), new))
        for i, (p, n, new, step) in enumerate(shapes)
    ]
    longest = max(len(a.request.input_ids) + a.request.max_new_tokens for a in arrivals)
    if tight:
        full = max(cost(cfg, longest).full, 2 * ps)  # CacheConfig's least: two pages
    else:
        full = roomy_full(ps, longest)
    cfg = cfg.replace(full_tokens=full + ps * draw(st.integers(0, 6), label="extra full pages"))
    if cfg.has_swa:
        swa = cfg.min_swa_tokens if tight else roomy_swa(cfg)
        cfg = cfg.replace(swa_tokens=swa + ps * draw(st.integers(0, 4), label="extra swa pages"))
    return cfg, arrivals


@settings(max_examples=150)
@given(workloads())
def test_tight_random_workloads_run_to_completion(setup: tuple[CacheConfig, list[Arrival]]) -> None:
    """Random configs and mixes in pools a few pages above one request's need: admission never
    admits what allocation cannot serve, KV stays intact, and everything finishes."""
    cfg, arrivals = setup
    Driver(MemoryManager(cfg)).run(arrivals)


@settings(max_examples=40, phases=[Phase.explicit, Phase.generate])
@given(workloads(tight=True))
@example(  # full pool: decode reserve on top of the cost
    (
        small_config(page_size=4, swa_layer_ids=(), full_tokens=12),
        [Arrival(0, Request("a", [0] * 5, 3))],
    )
)
@example(  # SWA pool: a chunk charged a whole window again
    (
        small_config(page_size=1, sliding_window=6, swa_tokens=8, chunked_prefill_size=2),
        [Arrival(0, Request("a", [0] * 5, 1))],
    )
)
@example(  # SWA pool: the cached prompt's SWA stays pinned while decoding
    (
        small_config(page_size=4, sliding_window=8, swa_tokens=16),
        [Arrival(0, Request("a", list(range(8)), 10))],
    )
)
def test_any_accepted_request_completes_alone(setup: tuple[CacheConfig, list[Arrival]]) -> None:
    """A request add_request accepts completes when it is alone, in pools at the smallest sizes
    add_request and CacheConfig accept."""
    cfg, arrivals = setup
    Driver(MemoryManager(cfg)).run(arrivals, max_steps=500)


def test_lone_request_at_the_full_pool_limit_completes() -> None:
    """prompt 9 + max_new 3 at page 4 costs exactly the 12-token full pool; it must finish."""
    cfg = small_config(page_size=4, swa_layer_ids=(), full_tokens=12)
    assert cost(cfg, 9 + 3).full == cfg.full_tokens
    Driver(MemoryManager(cfg)).run([Arrival(0, Request("a", list(range(9)), 3))], max_steps=50)


def test_lone_chunked_request_in_the_smallest_swa_pool_completes() -> None:
    """Page 1, window 6, the minimum 8-token SWA pool, chunks of 2: a 5-token prompt finishes."""
    cfg = small_config(
        page_size=1, sliding_window=6, swa_tokens=8, chunked_prefill_size=2, full_tokens=64
    )
    assert cfg.swa_tokens == cfg.min_swa_tokens
    Driver(MemoryManager(cfg)).run([Arrival(0, Request("a", [0, 1, 2, 3, 4], 1))], max_steps=50)


def test_lone_request_decodes_past_its_cached_prompt_window() -> None:
    """Page 4, window 8, the minimum 16-token SWA pool: prompt 8 decodes 10 tokens."""
    cfg = small_config(page_size=4, sliding_window=8, swa_tokens=16, full_tokens=64)
    assert cfg.swa_tokens == cfg.min_swa_tokens
    Driver(MemoryManager(cfg)).run([Arrival(0, Request("a", list(range(8)), 10))], max_steps=50)


# ------------------------------------------------------------------ state machine


class ManagerMachine(RuleBasedStateMachine):
    """Random adds, steps and aborts; ``check()`` and the stats gauges hold throughout."""

    rids = Bundle("rids")

    @initialize(
        ps=st.sampled_from([1, 4, 8]),
        window=st.integers(1, 12),
        has_swa=st.booleans(),
        full_pages=st.integers(0, 8),
        chunk_pages=st.integers(1, 3),
        running=st.integers(1, 5),
    )
    def setup(
        self, ps: int, window: int, has_swa: bool, full_pages: int, chunk_pages: int, running: int
    ) -> None:
        cfg = small_config(
            page_size=ps,
            sliding_window=window,
            swa_layer_ids=(1, 3) if has_swa else (),
            chunked_prefill_size=chunk_pages * ps,
            max_running_requests=running,
            max_context_len=64,
        )
        self.prefixes = [list(range(100, 100 + 2 * ps)), list(range(200, 200 + ps + 3))]
        self.max_total = max(map(len, self.prefixes)) + 12 + 8  # see add()
        cfg = cfg.replace(full_tokens=roomy_full(ps, self.max_total) + full_pages * ps)
        if has_swa:
            cfg = cfg.replace(swa_tokens=roomy_swa(cfg) + ps)
        self.driver = Driver(MemoryManager(cfg))
        self.count = 0

    @rule(
        target=rids,
        prefix=st.integers(0, 2),
        n=st.integers(1, 12),
        new=st.integers(1, 8),
        seed=st.integers(0, 1000),
    )
    def add(self, prefix: int, n: int, new: int, seed: int) -> object:
        ids = (self.prefixes[prefix] if prefix < 2 else []) + tokens(random.Random(seed), n)
        rid = f"q{self.count}"
        self.count += 1
        assert len(ids) + new <= self.max_total
        self.driver.add(Request(rid, ids, new))
        return rid

    @rule(times=st.integers(1, 6))
    def step(self, times: int) -> None:
        for _ in range(times):
            self.driver.step()

    @precondition(lambda self: self.driver.live)
    @rule(rid=consumes(rids))
    def abort(self, rid: str) -> None:
        if rid in self.driver.live:
            self.driver.abort(rid)
        else:
            with pytest.raises(ValueError, match="rid"):
                self.driver.mm.abort(rid)

    @rule(pick=st.integers(0, 7))
    def abort_after_schedule(self, pick: int) -> None:
        plan = self.driver.mm.schedule()
        if plan is None:
            return
        self.driver.abort(plan.reqs[pick % len(plan.reqs)].rid)
        self.driver.step(plan, verify=False)

    @invariant()
    def consistent(self) -> None:
        self.driver.mm.check()
        check_gauges(self.driver.mm, self.driver.live)

    def teardown(self) -> None:
        if hasattr(self, "driver"):
            self.driver.run(max_steps=2000)  # whatever is left finishes


ManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40)
TestManagerMachine = ManagerMachine.TestCase


@pytest.mark.parametrize("mamba", [False, True])
def test_stats_bytes_count_allocated_pages_at_their_bytes(mamba: bool) -> None:
    """``memory_bytes`` is every pool's buffer (page 0 included); ``used_bytes`` the pages
    not free in each pool (page 0 excluded) at that pool's page bytes, at every step."""
    extra = dict(mamba_layer_ids=(2,), state_shape=(3, 5), state_slots=12) if mamba else {}
    cfg = small_config(**extra)
    item = 2  # bfloat16
    full_b = 2 * cfg.num_kv_heads * cfg.head_dim * item * len(cfg.full_layer_ids)
    swa_b = 2 * cfg.num_kv_heads * cfg.head_dim * item * len(cfg.swa_layer_ids)
    state_b = 15 * item if mamba else 0
    ps = cfg.page_size
    memory = (cfg.full_tokens + ps) * full_b + (cfg.swa_tokens + ps) * swa_b
    memory += (cfg.state_slots + 1) * state_b
    driver = Driver(MemoryManager(cfg))
    for session in chat_sessions(random.Random(3), 4):
        driver.add_session(session)
    seen_used = 0
    while driver.live:
        driver.step()
        s = driver.mm.stats()
        used = (cfg.full_tokens - s["full_free"]) * full_b + (
            cfg.swa_tokens - s["swa_free"]
        ) * swa_b
        used += (cfg.state_slots - s["state_free"]) * state_b
        assert (s["memory_bytes"], s["used_bytes"]) == (memory, used)
        seen_used = max(seen_used, used)
    assert seen_used > 0
