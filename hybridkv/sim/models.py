"""Model shapes for the simulator: presets of real models as HF config dicts, and the
small stand-in config a simulation runs on.

A preset goes through :func:`CacheConfig.from_hf_config` like any ``config.json``, so its
pools come from a byte budget exactly as a real engine's would. The simulator then runs on
:func:`stand_in`: the same pools, page size, window and layer kinds, but one layer of each
attention kind (at most two recurrent layers) holding 1-element K/V. The manager's
decisions depend only on those, and the FakeEngine's codes need no more, so a 120B
model's pools simulate in little memory; reports give bytes for the real shape.
"""

from __future__ import annotations

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


def stand_in(config: CacheConfig) -> CacheConfig:
    """The config a simulation of ``config`` runs on (see the module docstring)."""
    kinds = []
    if config.full_layer_ids:
        kinds.append("full")
    if config.swa_layer_ids:
        kinds.append("swa")
    kinds += ["state"] * min(2, len(config.mamba_layer_ids))
    changes: dict[str, Any] = dict(
        num_layers=len(kinds),
        swa_layer_ids=tuple(i for i, k in enumerate(kinds) if k == "swa"),
        mamba_layer_ids=tuple(i for i, k in enumerate(kinds) if k == "state"),
        num_kv_heads=1,
        head_dim=1,
    )
    if config.mamba_layer_ids:
        changes["state_shape"] = (8,)
    return config.replace(**changes)
