"""CacheConfig.from_hf_config: layer maps, shapes and pool budgets of each model family."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from hybridkv.scheduler import CacheConfig, MemoryManager
from hybridkv.scheduler.hf_config import cache_bytes, from_hf_config

GiB = 1 << 30

LLAMA3_8B = dict(
    model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
    num_key_value_heads=8, torch_dtype="bfloat16", max_position_embeddings=8192,
)  # fmt: skip
GEMMA3_27B = dict(
    model_type="gemma3",
    torch_dtype="bfloat16",
    text_config=dict(
        model_type="gemma3_text", num_hidden_layers=62, hidden_size=5376, num_attention_heads=32,
        num_key_value_heads=16, head_dim=128, sliding_window=1024, sliding_window_pattern=6,
    ),
)  # fmt: skip
GEMMA2 = dict(
    model_type="gemma2", num_hidden_layers=6, hidden_size=64, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, sliding_window=4096, torch_dtype="float32",
)  # fmt: skip
GPT_OSS = dict(
    model_type="gpt_oss", num_hidden_layers=4, hidden_size=2880, num_attention_heads=64,
    num_key_value_heads=8, head_dim=64, sliding_window=128,
    layer_types=["sliding_attention", "full_attention"] * 2,
)  # fmt: skip
MISTRAL = dict(
    model_type="mistral", num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
    num_key_value_heads=2, sliding_window=512, torch_dtype="float16",
)  # fmt: skip
QWEN2 = dict(
    model_type="qwen2", num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
    num_key_value_heads=2, sliding_window=256, use_sliding_window=True, max_window_layers=2,
)  # fmt: skip
JAMBA = dict(
    model_type="jamba", num_hidden_layers=16, hidden_size=512, num_attention_heads=8,
    num_key_value_heads=2, attn_layer_period=8, attn_layer_offset=4, mamba_d_state=16,
    mamba_d_conv=4, mamba_expand=2,
)  # fmt: skip
FALCON_H1 = dict(
    model_type="falcon_h1", num_hidden_layers=3, hidden_size=256, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, mamba_d_ssm=512, mamba_n_heads=8, mamba_d_head="auto",
    mamba_n_groups=1, mamba_d_state=32, mamba_d_conv=4,
)  # fmt: skip
NEMOTRON_H = dict(
    model_type="nemotron_h", num_hidden_layers=7, hybrid_override_pattern="M-M*-ME",
    hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=16, n_groups=2, conv_kernel=4,
)  # fmt: skip
FAMILIES = [LLAMA3_8B, GEMMA3_27B, GEMMA2, GPT_OSS, MISTRAL, QWEN2, JAMBA, FALCON_H1, NEMOTRON_H]


def pool_bytes(cfg: CacheConfig) -> int:
    """Device bytes of every pool, padding page and slot included."""
    per, ps = cache_bytes(cfg), cfg.page_size
    total = (cfg.full_tokens + ps) * per["full"] + (cfg.swa_tokens + ps) * per["swa"]
    return total + (cfg.state_slots + 1) * per["state"] if cfg.mamba_layer_ids else total


def test_llama_is_full_only_and_fills_the_budget_exactly() -> None:
    """Llama 3 8B: 32 full layers, 8 KV heads of hidden/heads = 128; 16 GiB is 8192 pages."""
    cfg = CacheConfig.from_hf_config(LLAMA3_8B, 16 * GiB, swa_full_tokens_ratio=0.8)
    assert (cfg.num_layers, cfg.swa_layer_ids, cfg.mamba_layer_ids) == (32, (), ())
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.dtype) == (8, 128, torch.bfloat16)
    assert cache_bytes(cfg)["full"] == 2 * 32 * 8 * 128 * 2
    assert cfg.full_tokens == 8191 * 16 and pool_bytes(cfg) == 16 * GiB


def test_gemma3_text_config_and_pattern() -> None:
    """Gemma 3 27B: the text_config, every sixth layer full, window 1024, SWA ratio 0.8."""
    cfg = from_hf_config(GEMMA3_27B, 24 * GiB, swa_full_tokens_ratio=0.8)
    assert cfg.full_layer_ids == [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]
    assert len(cfg.swa_layer_ids) == 52 and cfg.sliding_window == 1024
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.dtype) == (16, 128, torch.bfloat16)
    full_pages, swa_pages = cfg.full_tokens // 16 + 1, cfg.swa_tokens // 16 + 1
    assert swa_pages == int(full_pages * 0.8)
    assert 0.999 * 24 * GiB < pool_bytes(cfg) <= 24 * GiB


def test_gemma3_layer_types_and_gemma2_alternation() -> None:
    """layer_types wins; Gemma 2 without it alternates, sliding first."""
    types = ["sliding_attention"] * 5 + ["full_attention"]
    cfg = from_hf_config(dict(GEMMA3_27B["text_config"], num_hidden_layers=6, layer_types=types))
    assert cfg.full_layer_ids == [5]
    cfg = from_hf_config(GEMMA2)
    assert cfg.swa_layer_ids == (0, 2, 4) and cfg.dtype == torch.float32 and cfg.head_dim == 32


def test_gpt_oss_layer_types() -> None:
    """GPT-OSS: alternating sliding/full layers, window 128, head_dim 64."""
    cfg = from_hf_config(GPT_OSS, GiB, swa_full_tokens_ratio=0.8)
    assert cfg.swa_layer_ids == (0, 2) and cfg.full_layer_ids == [1, 3]
    assert (cfg.sliding_window, cfg.num_kv_heads, cfg.head_dim) == (128, 8, 64)
    assert cache_bytes(cfg)["full"] == cache_bytes(cfg)["swa"] == 2 * 2 * 8 * 64 * 2
    assert pool_bytes(cfg) <= GiB


def test_mistral_slides_everywhere_and_qwen2_from_max_window_layers() -> None:
    """Mistral: every layer slides (the full pool holds no bytes); Qwen2: layers >= 2."""
    cfg = from_hf_config(MISTRAL, GiB, swa_full_tokens_ratio=0.8)
    assert cfg.swa_layer_ids == (0, 1, 2, 3) and cfg.dtype == torch.float16
    assert cache_bytes(cfg)["full"] == 0 and cfg.full_tokens >= cfg.swa_tokens
    assert pool_bytes(cfg) <= GiB and cfg.swa_tokens * cache_bytes(cfg)["swa"] > 0.99 * GiB
    assert from_hf_config(dict(MISTRAL, sliding_window=None)).swa_layer_ids == ()
    assert from_hf_config(QWEN2).swa_layer_ids == (2, 3)
    assert from_hf_config(dict(QWEN2, use_sliding_window=False)).swa_layer_ids == ()


def test_jamba_attention_period_and_mamba1_state() -> None:
    """Jamba: attention at i % 8 == 4, Mamba-1 state (2 * hidden, d_conv + d_state)."""
    cfg = from_hf_config(JAMBA, GiB, swa_full_tokens_ratio=0.8)
    assert cfg.full_layer_ids == [4, 12] and len(cfg.mamba_layer_ids) == 14
    assert cfg.state_shape == (1024, 4 + 16)
    state_bytes = 14 * 1024 * 20 * 2
    assert cache_bytes(cfg)["state"] == state_bytes
    assert cfg.state_slots == GiB // 2 // state_bytes - 1 and pool_bytes(cfg) <= GiB


def test_falcon_h1_parallel_layers_and_mamba2_state() -> None:
    """Falcon-H1: each decoder layer is cache layers 2i (attention) and 2i + 1 (state)."""
    cfg = from_hf_config(FALCON_H1, GiB)
    assert cfg.num_layers == 6 and cfg.full_layer_ids == [0, 2, 4]
    assert cfg.mamba_layer_ids == (1, 3, 5)
    conv_dim = 512 + 2 * 1 * 32
    assert cfg.state_shape == (conv_dim * 4 + 512 * 32,)


def test_nemotron_h_pattern() -> None:
    """Nemotron-H: M is state, * attention, - and E hold no cache."""
    cfg = from_hf_config(NEMOTRON_H, GiB)
    assert cfg.num_layers == 4 and cfg.mamba_layer_ids == (0, 1, 3) and cfg.full_layer_ids == [2]
    assert cfg.state_shape == ((8 * 32 + 2 * 2 * 16) * 4 + 8 * 32 * 16,)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f["model_type"])
def test_every_family_fits_its_budget(family: dict) -> None:
    """Every family's pools stay within the budget and use most of it."""
    cfg = from_hf_config(family, 8 * GiB, swa_full_tokens_ratio=0.8)
    assert 0.99 * 8 * GiB < pool_bytes(cfg) <= 8 * GiB


def test_small_budget_keeps_the_smallest_swa_pool() -> None:
    """A budget below the ratio's SWA minimum raises the SWA pool and shrinks the full one."""
    budget = 560 * (1 << 20)
    cfg = from_hf_config(GEMMA3_27B, budget, swa_full_tokens_ratio=0.8, page_size=16)
    assert cfg.swa_tokens == cfg.min_swa_tokens and pool_bytes(cfg) <= budget
    with pytest.raises(ValueError, match="memory_bytes=1000000: "):
        from_hf_config(GEMMA3_27B, 1_000_000, swa_full_tokens_ratio=0.8)


def test_overrides_win_and_a_tiny_config_runs() -> None:
    """Overrides replace mapped and computed fields; the result drives a MemoryManager."""
    tiny = dict(GEMMA2, sliding_window=8)
    cfg = from_hf_config(tiny, 1 << 20, page_size=4, device="cpu", backend="torch")
    assert cfg.page_size == 4 and cfg.sliding_window == 8
    static = from_hf_config(tiny, 1 << 20, swa_full_tokens_ratio=0.8, full_tokens=256)
    assert static.full_tokens == 256
    mm = MemoryManager(cfg)
    mm.check()
    mm.close()


def test_paths_and_objects(tmp_path) -> None:  # noqa: ANN001
    """A directory with config.json, a JSON file, and an object with to_dict() all map."""
    (tmp_path / "config.json").write_text(json.dumps(GPT_OSS))
    other = tmp_path / "m.json"
    other.write_text(json.dumps(LLAMA3_8B))
    assert from_hf_config(tmp_path).swa_layer_ids == (0, 2)
    assert from_hf_config(str(other)).num_layers == 32

    class Obj:
        def to_dict(self) -> dict:
            return dict(JAMBA)

    assert from_hf_config(Obj()).full_layer_ids == [4, 12]
    with pytest.raises(ValueError, match="cannot read HF config"):
        from_hf_config(tmp_path / "missing.json")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="no transformers")
def test_transformers_config_objects() -> None:
    """Real transformers config classes map like their dicts."""
    import transformers

    llama = transformers.LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k != "model_type"})
    assert from_hf_config(llama).num_kv_heads == 8
    qwen = transformers.Qwen2Config(**{k: v for k, v in QWEN2.items() if k != "model_type"})
    assert from_hf_config(qwen).swa_layer_ids == (2, 3)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"hidden_size": 64}, "'num_hidden_layers'"),
        (dict(GPT_OSS, layer_types=["chunked_attention"] * 4), "'layer_types'"),
        (dict(GPT_OSS, layer_types=["full_attention"]), "'layer_types'"),
        (dict(GPT_OSS, sliding_window=None), "'sliding_window'"),
        (dict(LLAMA3_8B, torch_dtype="int8"), "'torch_dtype'"),
        (dict(LLAMA3_8B, num_attention_heads=7), "'head_dim'"),
        (dict(NEMOTRON_H, hybrid_override_pattern="M*X"), "'hybrid_override_pattern'"),
        (dict(NEMOTRON_H, mamba_num_heads=None), "'mamba_num_heads'"),
        (dict(JAMBA, attn_layer_offset=9), "'attn_layer_offset'"),
        (dict(LLAMA3_8B, num_key_value_heads=0), "'num_key_value_heads'"),
    ],
)
def test_unmappable_config_names_the_field(config: dict, field: str) -> None:
    """A config it cannot map is a ValueError naming the field."""
    with pytest.raises(ValueError, match="HF config field") as e:
        from_hf_config(config)
    assert field in str(e.value)
