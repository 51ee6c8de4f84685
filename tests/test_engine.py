"""The reference engine against transformers: tiny random models, exact logits and tokens.

Every test runs a model through :class:`hybridkv.engine.Engine` and compares each finished
request with the model's own no-cache forward over the same sequence: the logits of every
position the engine computed within 1e-4 (fp32), and every greedy token identical. The
scenarios put the cache through prefix hits, chunked prefill (chunk 8), eviction, SWA
tombstones, retraction and the host tier; one test checks that a window off by one fails.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("transformers")

from hybridkv import CacheConfig  # noqa: E402
from hybridkv.engine import Engine, HFModel  # noqa: E402
from hybridkv.engine.tiny import compare_with_transformers, tiny_model  # noqa: E402

WINDOW = 8
VOCAB = 96
TOL = 1e-4
BASE = dict(
    device="cpu",
    dtype=torch.float32,
    chunked_prefill_size=8,
    max_prefill_tokens=16,
    max_context_len=96,
    backend="torch",
)


def config(page_size: int) -> dict[str, object]:
    """BASE with chunks of 8 tokens, or one page where a page is larger (the least a
    chunk can be)."""
    chunk = max(8, page_size)
    return BASE | {"chunked_prefill_size": chunk, "max_prefill_tokens": 2 * chunk}


Arrival = tuple[int, list[int], int]  # (step, prompt, max_new_tokens)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # NOTE: tiny matmuls on a shared 2-core machine: intra-op threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_MODELS: dict[str, torch.nn.Module] = {}


def model(family: str) -> torch.nn.Module:
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, window=WINDOW, vocab=VOCAB)
    return _MODELS[family]


def workload(seed: int, n: int, steps: int = 12, new: tuple[int, int] = (2, 10)) -> list[Arrival]:
    """``n`` prompts arriving over ``steps`` steps; most extend one of three shared prefixes
    longer than the window, so hits land inside and past the window."""
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))]

    prefixes = [ids(10, 24) for _ in range(3)]
    out = []
    for _ in range(n):
        prompt = rng.choice(prefixes) + ids(1, 14) if rng.random() < 0.7 else ids(4, 30)
        out.append((rng.randrange(steps), prompt, rng.randint(*new)))
    return sorted(out, key=lambda a: a[0])


def drive(eng: Engine, arrivals: list[Arrival], prefix: str = "r") -> int:
    """Add each request at its step, run to completion, ``mm.check()`` after every step;
    some prompt must take more than one chunk.

    Returns the most cached full tokens that had no SWA KV (tombstoned) after any step."""
    pending, step, tombstoned, chunks = list(arrivals), 0, 0, 0
    for i, (at, prompt, n) in enumerate(pending):
        pending[i] = (at, prompt, n, f"{prefix}{i}")
    while pending or eng.seqs:
        while pending and pending[0][0] <= step:
            _, prompt, n, rid = pending.pop(0)
            eng.add(rid, prompt, n)
        if eng.step() is not None:
            chunks += sum(not r.produces_token for r in eng.last_plan.reqs)
        eng.mm.check()
        st = eng.mm.stats()
        tombstoned = max(tombstoned, st["full_cached"] - st["swa_cached"])
        step += 1
        assert step < 2000, "did not finish"
    assert chunks > 0, "no prompt was chunked"
    return tombstoned


def assert_matches(eng: Engine, family: str, requests: int) -> float:
    """Every request finished; its computed logits and greedy tokens match transformers."""
    assert len(eng.sequences) == requests
    cmp = compare_with_transformers(eng, model(family))
    st = eng.stats()
    # Every computed position was compared (once, where a retraction recomputed some).
    assert cmp.positions <= st["computed_tokens"]
    assert cmp.positions == st["computed_tokens"] or st["retracted_requests"] > 0
    assert cmp.max_diff < TOL, f"max logit difference {cmp.max_diff}"
    assert not cmp.token_mismatches, f"greedy tokens differ at {cmp.token_mismatches[:5]}"
    return cmp.max_diff


@pytest.mark.parametrize(
    ("family", "page_size"),
    [
        ("gemma3_text", 1),
        ("gemma3_text", 4),
        ("gemma3_text", 16),
        ("qwen2", 1),
        ("qwen2", 16),
        ("mistral", 4),
        ("gemma2", 4),
        ("gpt_oss", 4),
        ("llama", 4),
    ],
)
def test_generate_matches_transformers_with_prefix_hits(family: str, page_size: int) -> None:
    """generate() twice over prompts sharing prefixes: the second call hits the first's
    cache; every computed position's logits and every token equal transformers'."""
    eng = Engine(
        model(family), record_logits=True, page_size=page_size, full_tokens=1024,
        swa_tokens=512, **config(page_size),
    )  # fmt: skip
    rng = random.Random(page_size)
    shared = [rng.randrange(VOCAB) for _ in range(21)]
    prompts = [shared + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(4)]
    first = eng.generate(prompts, 6)
    hits = eng.stats()["device_hit_tokens"]
    again = eng.generate(prompts[:2] + [shared[:5]], [6, 3, 4])
    assert again[0] == first[0] and again[1] == first[1][:3], "cache hit decoded differently"
    st = eng.stats()
    assert st["device_hit_tokens"] - hits >= 2 * len(shared) // page_size * page_size
    assert_matches(eng, family, 7)
    eng.close()


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_tight_pools_evict_and_tombstone(page_size: int) -> None:
    """Gemma 3, staggered arrivals into full and SWA pools a few requests deep: both pools
    evict, cached full KV outlives its SWA (tombstones), prefixes still hit; still exact."""
    # page size -> (full tokens, SWA tokens, seed): SWA a few windows, full a few requests.
    full, swa, seed = {1: (56, 16, 2), 4: (128, 24, 4), 16: (160, 64, 2)}[page_size]
    eng = Engine(
        model("gemma3_text"), record_logits=True, page_size=page_size, full_tokens=full,
        swa_tokens=swa, **config(page_size),
    )  # fmt: skip
    arrivals = workload(seed, 12, new=(4, 12))
    tombstoned = drive(eng, arrivals)
    st = eng.stats()
    assert st["evicted_full_tokens"] > 0 and st["evicted_swa_tokens"] > 0
    assert tombstoned > 0, "no cached full KV ever lost its SWA"
    assert st["device_hit_tokens"] > 0
    assert_matches(eng, "gemma3_text", len(arrivals))
    eng.close()


def test_retracted_requests_recompute_exactly() -> None:
    """Long decodes admitted on the optimistic new-token ratio outgrow the full pool: the
    youngest are retracted, re-prefilled from the cache and decode on, still exact."""
    rng = random.Random(1)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(9, 14))] for _ in range(2)]
    arrivals = []
    for _ in range(8):
        prompt = rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
        arrivals.append((0, prompt, rng.randint(36, 44)))
    eng = Engine(
        model("gemma3_text"), record_logits=True, page_size=4, full_tokens=128, swa_tokens=48,
        **BASE,
    )  # fmt: skip
    drive(eng, arrivals)
    st = eng.stats()
    assert st["retracted_requests"] > 0 and st["device_hit_tokens"] > 0
    assert_matches(eng, "gemma3_text", len(arrivals))
    eng.close()


@pytest.mark.parametrize(
    ("policy", "swa_tokens"),
    [("write_through", 32), ("write_through_selective", 32), ("write_back", 64)],
)
def test_host_tier_load_backs_are_exact(policy: str, swa_tokens: int) -> None:
    """Qwen2 with a host tier under each write policy: prefixes pushed off the device come
    back by load back, and the logits over them still match transformers."""
    eng = Engine(
        model("qwen2"), record_logits=True, page_size=4, full_tokens=96, swa_tokens=swa_tokens,
        host_tokens=1024, write_policy=policy, **BASE,
    )  # fmt: skip
    arrivals = workload(7, 24, steps=40)
    drive(eng, arrivals)
    st = eng.stats()
    assert st["evicted_full_tokens"] > 0 and st["backed_up_tokens"] > 0
    assert st["host_hit_tokens"] >= st["loaded_tokens"] > 0
    assert_matches(eng, "qwen2", len(arrivals))
    eng.close()


def test_triton_kernels_path_is_exact() -> None:
    """The manager's Triton kernels (interpreted on CPU) drive the same exact forward."""
    cfg = dict(BASE, backend=None)
    eng = Engine(
        model("gemma3_text"), record_logits=True, page_size=4, full_tokens=64, swa_tokens=24,
        **cfg,
    )  # fmt: skip
    arrivals = workload(3, 6)
    drive(eng, arrivals)
    assert eng.stats()["evicted_swa_tokens"] > 0
    assert_matches(eng, "gemma3_text", len(arrivals))
    eng.close()


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_window_off_by_one_is_caught(family: str, delta: int) -> None:
    """Attention reading 7 or 9 positions of an 8-token window moves the logits by far more
    than the tolerance: the comparison would catch such a bug."""
    eng = Engine(
        model(family), record_logits=True, page_size=4, full_tokens=1024, swa_tokens=512,
        **BASE,
    )  # fmt: skip
    eng.model.specs = [
        s.replace(window=s.window + delta) if s.window is not None else s for s in eng.model.specs
    ]
    drive(eng, workload(11, 4))
    cmp = compare_with_transformers(eng, model(family))
    assert cmp.max_diff > 0.5, f"an off-by-one window moved logits by only {cmp.max_diff}"


def test_cache_config_that_cannot_hold_the_model_is_rejected() -> None:
    """A cache with another layer map, head count or a shorter window is a ValueError."""
    m = model("gemma3_text")
    good = HFModel(m).cache_config(page_size=4, **BASE)
    assert good.swa_layer_ids == (0, 1, 3) and good.sliding_window == WINDOW
    for change in (
        {"swa_layer_ids": (0, 1)},
        {"num_kv_heads": 4},
        {"sliding_window": WINDOW - 1},
    ):
        with pytest.raises(ValueError, match="cache_config"):
            Engine(m, good.replace(**change))
    assert isinstance(good, CacheConfig)


def test_unknown_family_is_rejected() -> None:
    """A model type the engine does not know names itself in the error."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    with pytest.raises(ValueError, match="gpt2"):
        HFModel(GPT2LMHeadModel(cfg))


def test_demo_reports_tokens_per_second_hit_rate_and_diff(capsys: pytest.CaptureFixture) -> None:
    """``python -m hybridkv.engine --demo`` (small): prints its numbers, the diff exact."""
    from hybridkv.engine.__main__ import main

    result = main(["--demo", "--requests", "4", "--new-tokens", "4", "--backend", "torch"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "hit rate" in out and "max |diff|" in out
    assert result["max_diff"] < TOL and result["hit_rate"] > 0
