"""Tiny random-weight models of each family, built from configs in code (no download).

The weights are drawn larger than transformers' init (std 0.02), so attention is peaked
and a wrong key (an off-by-one window, a stale page) moves the logits by whole units, not
by 1e-3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from hybridkv.engine.runner import Engine

TINY_FAMILIES = ("gemma3_text", "gemma2", "qwen2", "mistral", "gpt_oss", "llama")


def tiny_config(family: str, window: int = 8, layers: int = 4, vocab: int = 96) -> object:
    """A transformers config of ``family`` with hidden 64, 4 heads (2 KV heads), head_dim 16,
    and SWA layers of ``window`` (all but every third for Gemma, the upper half for Qwen2,
    every layer for Mistral, every other for GPT-OSS, none for Llama); fp32 eager attention."""
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        sliding_window=window,
        attn_implementation="eager",
        torch_dtype=torch.float32,
    )
    pattern = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(layers)]
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**common, layer_types=pattern, query_pre_attn_scalar=16)
    if family == "gemma2":
        return tf.Gemma2Config(
            **common,
            layer_types=pattern,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=15.0,
        )
    if family == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=True, max_window_layers=layers // 2)
    if family == "mistral":
        return tf.MistralConfig(**common)
    if family == "llama":  # full attention only
        return tf.LlamaConfig(**{k: v for k, v in common.items() if k != "sliding_window"})
    if family == "gpt_oss":
        types = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (
            layers % 2
        )
        # YaRN as GPT-OSS ships it, with a factor that agrees with max_position_embeddings.
        yarn = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0}
        yarn |= {"truncate": False, "original_max_position_embeddings": 256}
        return tf.GptOssConfig(
            **common,
            layer_types=types,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_scaling=yarn,
        )
    raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")


def tiny_model(family: str, seed: int = 0, **config: object) -> torch.nn.Module:
    """A random ``*ForCausalLM`` of :func:`tiny_config` in fp32 eval mode.

    Linear weights ~ N(0, 1 / fan_in) (q_proj and k_proj 2x that std, for peaked
    attention), embeddings ~ N(0, 1), biases and sinks ~ N(0, 0.5), norms as initialised.
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            if p.dim() >= 2 and "embed" not in name and "bias" not in name:
                fan_in = p.shape[-1] if "experts" not in name else p.shape[-2]
                std = fan_in**-0.5 * (2.0 if ("q_proj" in name or "k_proj" in name) else 1.0)
            else:
                std = 1.0 if "embed" in name else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.float().eval()


def reference_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """transformers' own no-cache forward over ``tokens``: ``[len(tokens), vocab]`` fp32."""
    ids = torch.tensor([tokens], dtype=torch.int64, device=model.device)
    with torch.no_grad():
        return model(ids, use_cache=False).logits[0].float().cpu()


class Comparison(NamedTuple):
    """Engine vs transformers over every finished request of an engine."""

    max_diff: float  # max |logit difference| over every computed position
    positions: int  # computed positions compared
    token_mismatches: list[tuple[str, int]]  # (rid, position) where greedy tokens differ


def compare_with_transformers(engine: Engine, model: torch.nn.Module) -> Comparison:
    """Compare each finished request of ``engine`` (built with ``record_logits=True``) with
    ``model``'s no-cache forward over the same sequence: the logits of every position the
    engine computed, and each generated token against the reference's argmax."""
    max_diff, positions, mismatches = 0.0, 0, []
    for rid, seq in engine.sequences.items():
        ref = reference_logits(model, seq)
        for p, got in engine.logits[rid].items():
            max_diff = max(max_diff, float((ref[p] - got).abs().max()))
            positions += 1
        for p in range(engine.prompt_lens[rid] - 1, len(seq) - 1):
            if int(ref[p].argmax()) != seq[p + 1]:
                mismatches.append((rid, p))
    return Comparison(max_diff, positions, mismatches)
