"""A Hugging Face causal LM taken apart into the pieces a paged engine calls.

:class:`HFModel` runs the model's own modules (embedding, norms, projections, q/k norms,
rotary, MLP, final norm, LM head) over a flat batch of tokens and leaves attention to the
engine: ``layer(i, h, rope, attend)`` computes q, k, v of layer ``i`` and calls
``attend(q, k, v)``, which writes k, v to the cache and reads the paged context back.

Each family's forward is matched to transformers' ``modeling_<family>.py``:

    family       layers                               attention             norms
    gemma2       layer_types (sliding / full)         query_pre_attn_scalar sandwich
                                                      + attn softcap
    gemma3_text  layer_types; local rotary on SWA     query_pre_attn_scalar sandwich
                 layers, q/k RMSNorm                  (no attn softcap)
    mistral      every layer SWA when sliding_window  head_dim ** -0.5      pre-norm
    qwen2        SWA from max_window_layers on        head_dim ** -0.5      pre-norm
    gpt_oss      layer_types; attention sinks; MoE    head_dim ** -0.5      pre-norm
    llama        full only                            head_dim ** -0.5      pre-norm

Window semantics are HF's: position ``i`` attends to ``j`` when ``0 <= i - j < window``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hybridkv.scheduler import CacheConfig

FAMILIES = ("gemma2", "gemma3_text", "mistral", "qwen2", "gpt_oss", "llama")

Rope = tuple[torch.Tensor, torch.Tensor]
# attend(q [T, H, D], k [T, KVH, D], v [T, KVH, D]) -> o [T, H, D]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerSpec:
    """How one decoder layer attends.

    ``window``: HF's sliding window (``i`` attends ``j`` iff ``0 <= i - j < window``), or
    ``None`` for full attention. ``scaling`` multiplies q.k; ``softcap`` caps the scores
    (``tanh(s / c) * c``); ``sinks`` (``[heads]``) are GPT-OSS's per-head sink logits.
    """

    layer_id: int
    window: int | None
    scaling: float
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    local_rope: bool = False

    def replace(self, **changes: object) -> LayerSpec:
        return dataclasses.replace(self, **changes)


class HFModel:
    """Wraps a transformers ``*ForCausalLM`` (eval mode, weights untouched).

    Raises ``ValueError`` naming ``config.model_type`` when the family is not one of
    :data:`FAMILIES`.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        self.family = cfg.model_type
        if self.family not in FAMILIES:
            raise ValueError(f"config.model_type {self.family!r} is not one of {FAMILIES}")
        self.model = model.eval()
        self.config = cfg
        self.inner = model.model
        # NOTE: each family's own rotary application (GPT-OSS rotates halves differently).
        self._apply_rope = sys.modules[type(self.inner).__module__].apply_rotary_pos_emb
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.specs = [self._spec(i, layer) for i, layer in enumerate(self.inner.layers)]

    def _spec(self, i: int, layer: torch.nn.Module) -> LayerSpec:
        attn, cfg = layer.self_attn, self.config
        if self.family == "mistral":
            window = getattr(cfg, "sliding_window", None)
        else:
            window = getattr(attn, "sliding_window", None)
        softcap = attn.attn_logit_softcapping if self.family == "gemma2" else None
        sinks = getattr(attn, "sinks", None) if self.family == "gpt_oss" else None
        local = self.family == "gemma3_text" and window is not None
        return LayerSpec(i, window, float(attn.scaling), softcap, sinks, local)

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    @property
    def window(self) -> int | None:
        """The one sliding window of the model's SWA layers (``None``: no SWA layers)."""
        windows = {s.window for s in self.specs if s.window is not None}
        if len(windows) > 1:
            raise ValueError(f"SWA layers with different windows {sorted(windows)}")
        return windows.pop() if windows else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` int64 ``[T]`` -> hidden states ``[1, T, hidden]``."""
        h = self.inner.embed_tokens(input_ids[None])
        if self.family == "gemma2":
            h = h * torch.tensor(self.config.hidden_size**0.5, dtype=h.dtype)
        return h

    def rotary(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[Rope, Rope | None]:
        """cos/sin of ``positions`` (int64 ``[T]``): global, and Gemma 3's local (or None)."""
        pos = positions[None]
        glob = self.inner.rotary_emb(h, pos)
        local = self.inner.rotary_emb_local(h, pos) if self.family == "gemma3_text" else None
        return glob, local

    def layer(
        self, i: int, h: torch.Tensor, rope: tuple[Rope, Rope | None], attend: Attend
    ) -> torch.Tensor:
        """Decoder layer ``i`` over ``h`` ``[1, T, hidden]``; returns the new hidden states."""
        layer = self.inner.layers[i]
        attn = layer.self_attn
        spec = self.specs[i]
        T = h.shape[1]
        residual = h
        x = layer.input_layernorm(h)
        shape = (1, T, -1, self.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)  # [1, H, T, D]
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = rope[1] if spec.local_rope else rope[0]
        q, k = self._apply_rope(q, k, cos, sin)
        o = attend(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))
        o = attn.o_proj(o.reshape(1, T, -1))
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma's sandwich norms
            h = residual + layer.post_attention_layernorm(o)
            x = layer.mlp(layer.pre_feedforward_layernorm(h))
            return h + layer.post_feedforward_layernorm(x)
        h = residual + o
        x = layer.mlp(layer.post_attention_layernorm(h))
        if isinstance(x, tuple):  # GPT-OSS's MoE also returns router scores
            x = x[0]
        return h + x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and final softcap: ``[1, T, hidden]`` -> ``[T, vocab]``."""
        logits = self.model.lm_head(self.inner.norm(h))[0]
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def cache_config(self, **overrides: object) -> CacheConfig:
        """A :class:`CacheConfig` with this model's layer map, window, heads, head_dim and
        dtype (the model's device unless overridden); pool sizes and policies from
        ``overrides``."""
        swa = tuple(s.layer_id for s in self.specs if s.window is not None)
        shape: dict[str, object] = {
            "num_layers": len(self.specs),
            "swa_layer_ids": swa,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "device": str(self.device),
        }
        if swa:
            shape["sliding_window"] = self.window
        return CacheConfig(**(shape | overrides))
