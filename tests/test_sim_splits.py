"""``--compare splits``: the arena and static full/SWA splits of one byte budget."""

from __future__ import annotations

import json

import pytest

from hybridkv.scheduler import CacheConfig
from hybridkv.scheduler.hf_config import cache_bytes
from hybridkv.sim import cli, splits
from hybridkv.sim.models import PRESETS, byte_scale, stand_in

GiB = 1 << 30
CPU = ["--device", "cpu", "--backend", "torch", "--quiet"]


def _pool_bytes(cfg: CacheConfig) -> int:
    """Device bytes of the static pools of ``cfg``, every page 0 included."""
    per, ps = cache_bytes(cfg), cfg.page_size
    full = (cfg.full_tokens // ps + 1) * ps * per["full"]
    return full + (cfg.swa_tokens // ps + 1) * ps * per["swa"]


def _largest_page(cfg: CacheConfig) -> int:
    per = cache_bytes(cfg)
    return max(per["full"], per["swa"]) * cfg.page_size


@pytest.mark.parametrize("model", ["gemma3-27b", "gpt-oss-120b"])
def test_static_splits_hold_the_budget_and_sweep_the_share(model: str) -> None:
    """Every share's pools fill the budget to within a page per pool, and give the SWA pool
    that share of the bytes (to within those pages); shares rise with the SWA pool."""
    budget = 3 * GiB
    args = cli.build_parser().parse_args(["--model", model, "--memory", "3", *CPU])
    base = cli.make_config(args, host_tokens=0)
    page = _largest_page(base)
    assert budget - 3 * page < _pool_bytes(base) <= budget  # the default split
    swa_tokens = []
    for share in splits.SHARES:
        try:
            cfg = cli.make_config(args, **splits.split_pools(base, budget, share, 0.5))
        except ValueError as e:  # an SWA pool below one window: the sweep shows it as n/a
            assert "swa_tokens" in str(e) and share <= 0.2
            continue
        assert budget - 2 * page < _pool_bytes(cfg) <= budget
        assert splits.swa_share(cfg) == pytest.approx(share, abs=2 * page / budget)
        swa_tokens.append(cfg.swa_tokens)
    assert swa_tokens == sorted(swa_tokens) and len(swa_tokens) >= 7


def test_split_needs_full_and_swa_layers() -> None:
    llama = CacheConfig.from_hf_config(PRESETS["llama3-8b"], GiB, swa_full_tokens_ratio=0.8)
    with pytest.raises(ValueError, match="full and SWA layers"):
        splits.split_pools(llama, GiB, 0.5, 0.5)
    argv = ["--compare", "splits", "--model", "llama3-8b", "--requests", "2", *CPU]
    assert cli.main(argv) == 2


def test_small_sweep_runs_clean_at_equal_bytes(capsys) -> None:  # noqa: ANN001
    """A small sweep through main(): every row that runs finishes every request with 0 OOMs,
    on pools of the same bytes (real model bytes, to within a few pages); a memory-bound
    workload's steps differ between shares; the table prints every row."""
    argv = ["--compare", "splits", "--model", "gpt-oss-120b", "--memory", "0.25"]
    argv += ["--requests", "16", "--json", *CPU]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    budget = out["memory_bytes"]
    assert budget == GiB // 4
    names = [r["split"] for r in out["rows"]]
    static = ["default (ratio 0.8)", *(f"SWA {s:.0%}" for s in splits.SHARES)]
    assert names == ["arena", *static]
    ran = [r for r in out["rows"] if "skipped" not in r]
    assert len(ran) >= 6 and ran[1]["split"].startswith("default")
    real = CacheConfig.from_hf_config(PRESETS["gpt-oss-120b"], budget, swa_full_tokens_ratio=0.8)
    for row in ran:
        assert row["ooms"] == 0 and row["errors"] == 0 and row["finished"] == 16
        assert budget - 4 * _largest_page(real) < row["memory_bytes"] <= budget
        assert 0 < row["memory_used_mean"] <= row["memory_used_max"] <= 1
    default = next(r for r in ran if r["split"].startswith("default"))
    assert default["speedup"] == 1.0
    assert len({r["steps"] for r in ran}) > 1
    assert cli.main([a for a in argv if a != "--json"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in names) and "mem util" in text


@pytest.mark.parametrize("model", ["gemma3-27b", "gpt-oss-120b"])
def test_stand_in_arena_holds_as_many_chunks(model: str) -> None:
    """The stand-in's arena is the real budget over the byte scale: the same chunks, the same
    pages of each pool per chunk (so the arena trades pages as the real model's would)."""
    real = CacheConfig.from_hf_config(PRESETS[model], 3 * GiB, swa_full_tokens_ratio=0.8)
    real = real.replace(memory_bytes=3 * GiB)
    sim = stand_in(real)
    assert sim.memory_bytes == 3 * GiB // byte_scale(real)
    a, b = real.arena_layout, sim.arena_layout
    assert (a.num_chunks, a.chunk_bytes) == (b.num_chunks, b.chunk_bytes * byte_scale(real))
    for i in range(len(real.arena_pools)):
        assert a.min_pages_per_chunk(i) == b.min_pages_per_chunk(i)
