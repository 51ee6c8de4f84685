"""Model shapes for the simulator: presets of real models as HF config dicts, and the
small stand-in config a simulation runs on.

A preset goes through :func:`CacheConfig.from_hf_config` like any ``config.json``, so its
pools come from a byte budget exactly as a real engine's would. The simulator then runs on
:func:`stand_in`: the same pools, page size, window and layer kinds, but 1-element K/V,
the full and SWA layer counts divided by their gcd, and at most two recurrent layers whose
state is shrunk by the same factor. So a full page, an SWA page and a state slot keep the
real model's byte ratios (what an arena shared by the pools trades in), every byte count
is the real one over :func:`byte_scale`, and a 120B model's pools simulate in little
memory. The manager's decisions depend only on those, and the FakeEngine's codes need no
more; reports give bytes for the real shape.
"""

from __future__ import annotations

import math
from typing import Any

from hybridkv.scheduler import CacheConfig

PRESETS: dict[str, dict[str, Any]] = {
    # The simulator's default: 2 full + 6 SWA layers, window 256 (its pools are set by flags).
    "small": dict(
        model_type="hybridkv_small", num_hidden_layers=8, hidden_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=256, torch_dtype="bfloat16",
        layer_types=["full_attention", *["sliding_attention"] * 3] * 2,
    ),
    # google/gemma-3-27b: 62 layers, 5 sliding to 1 full, window 1024.
    "gemma3-27b": dict(
        model_type="gemma3_text", num_hidden_layers=62, hidden_size=5376,
        num_attention_heads=32, num_key_value_heads=16, head_dim=128, sliding_window=1024,
        sliding_window_pattern=6, torch_dtype="bfloat16",
    ),
    # openai/gpt-oss-120b: 36 layers alternating sliding (window 128) and full.
    "gpt-oss-120b": dict(
        model_type="gpt_oss", num_hidden_layers=36, hidden_size=2880, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, sliding_window=128, torch_dtype="bfloat16",
        layer_types=["sliding_attention", "full_attention"] * 18,
    ),
    # meta-llama/Meta-Llama-3-8B: 32 full-attention layers, GQA 32/8.
    "llama3-8b": dict(
        model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
        num_key_value_heads=8, torch_dtype="bfloat16",
    ),
    # Jamba-like (ai21labs Jamba shapes): 32 layers, attention at i % 8 == 4, Mamba-1 others.
    "jamba-like": dict(
        model_type="jamba", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
        num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4, mamba_d_state=16,
        mamba_d_conv=4, mamba_expand=2, torch_dtype="bfloat16",
    ),
}  # fmt: skip


def _attention_gcd(config: CacheConfig) -> int:
    """The gcd of the full and SWA layer counts (1 without attention layers)."""
    return math.gcd(len(config.full_layer_ids), len(config.swa_layer_ids)) or 1


def byte_scale(config: CacheConfig) -> int:
    """Real bytes per byte of :func:`stand_in` ``(config)``: the attention layers' gcd times
    the K/V elements per token and layer."""
    return _attention_gcd(config) * config.num_kv_heads * config.head_dim


def stand_in(config: CacheConfig) -> CacheConfig:
    """The config a simulation of ``config`` runs on (see the module docstring).

    The state elements per slot are divided by :func:`byte_scale` over the stand-in's
    recurrent layers, rounded (exact where it divides, as for the presets). An arena's
    ``memory_bytes`` is divided by :func:`byte_scale` too, so it holds as many chunks.
    """
    g, scale = _attention_gcd(config), byte_scale(config)
    kinds = ["full"] * (len(config.full_layer_ids) // g) + ["swa"] * (
        len(config.swa_layer_ids) // g
    )
    recurrent = len(config.mamba_layer_ids)
    kinds += ["state"] * min(2, recurrent)
    changes: dict[str, Any] = dict(
        num_layers=len(kinds),
        swa_layer_ids=tuple(i for i, k in enumerate(kinds) if k == "swa"),
        mamba_layer_ids=tuple(i for i, k in enumerate(kinds) if k == "state"),
        num_kv_heads=1,
        head_dim=1,
    )
    if recurrent:
        elements = recurrent * math.prod(config.state_shape) / scale
        changes["state_shape"] = (max(1, round(elements / min(2, recurrent))),)
    if config.arena:
        changes["memory_bytes"] = config.memory_bytes // scale
    return config.replace(**changes)
