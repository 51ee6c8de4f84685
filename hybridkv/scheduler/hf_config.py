"""A :class:`CacheConfig` from a Hugging Face model config, with pools sized from a byte budget.

:func:`from_hf_config` reads a ``transformers`` config object, a dict, or a path (a directory
holding ``config.json``, or a JSON file); only the object form needs ``transformers``. A
multimodal config's ``text_config`` is used when the top level has no layers.

Layer map, by the first rule that applies:

- ``hybrid_override_pattern`` (Nemotron-H): ``M`` is a recurrent (Mamba-2) layer, ``*`` a
  full-attention layer, ``-`` and ``E`` (MLP, MoE) hold no cache. Cache layer ids count only
  ``M`` and ``*`` layers, in order.
- Falcon-H1 (``model_type == "falcon_h1"``): every decoder layer runs attention and a Mamba-2
  mixer side by side, so the cache has ``2 * num_hidden_layers`` layers: decoder layer ``i``
  keeps its K/V in cache layer ``2i`` and its state in ``2i + 1``.
- ``attn_layer_period`` / ``attn_layer_offset`` (Jamba): layer ``i`` is attention when
  ``i % period == offset``, recurrent (Mamba-1) otherwise.
- ``layer_types`` (Gemma 2/3, GPT-OSS, recent Qwen2): ``"full_attention"`` / ``"attention"``
  and ``"sliding_attention"``; ``"mamba"`` is a recurrent layer.
- ``sliding_window_pattern`` (Gemma 3): layer ``i`` is full when ``(i + 1) % pattern == 0``;
  Gemma 2 (``model_type == "gemma2"``) alternates, sliding first.
- ``use_sliding_window`` (Qwen2): when true, layers ``>= max_window_layers`` slide.
- ``sliding_window`` set and no ``use_sliding_window`` key (Mistral): every layer slides.
- Otherwise (Llama): every layer is full attention.

State shapes (one tensor per recurrent layer; conv state first): Mamba-1
``(d_inner, d_conv + d_state)`` with ``d_inner = mamba_expand * hidden_size``; Mamba-2 the flat
``(conv_dim * d_conv + heads * head_dim * d_state,)`` with
``conv_dim = heads * head_dim + 2 * n_groups * d_state``.

Pools from ``memory_bytes`` (what vLLM's ``gpu_memory_utilization`` leaves for the KV cache):
by default one arena of that many bytes holds every pool (``CacheConfig.memory_bytes``;
pages move between the pools by demand). A static split is asked for with
``swa_full_tokens_ratio``:

1. With recurrent layers, ``state_share`` of the budget (default 0.5) buys state slots at
   ``layers * prod(state_shape) * itemsize`` bytes each.
2. The rest is split between the full and SWA pools as SGLang does with
   ``swa_full_tokens_ratio``: ``swa_tokens = ratio * full_tokens`` and
   ``full_tokens * (full_bytes + ratio * swa_bytes) = rest``, where ``full_bytes`` and
   ``swa_bytes`` are K + V bytes of one token over the layers of that kind. The SWA pool is
   raised to its minimum (a window and two pages) and never exceeds the full pool.
3. Counts round down to whole pages and leave room for each pool's padding page, so the
   device buffers never pass the budget. ``req_to_token`` and the host tier are not counted.

Without ``memory_bytes`` the pools keep CacheConfig's defaults (SWA raised to its minimum).
``overrides`` are CacheConfig fields and win over everything mapped or computed.
``max_context_len`` is not taken from ``max_position_embeddings``: it sizes ``req_to_token``.
``vocab_size``, where the config has it, bounds the token ids the manager accepts.
A config that cannot be mapped is a ``ValueError`` naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hybridkv.scheduler.config import CacheConfig

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
}
FULL_TYPES = ("full_attention", "attention", "global_attention")
SWA_TYPES = ("sliding_attention", "sliding_window_attention", "local_attention")
STATE_TYPES = ("mamba", "mamba2")


def load_hf_dict(config: object) -> dict[str, Any]:
    """The config as a plain dict: a mapping as-is, an object by ``to_dict()``, a path read
    as JSON (a directory: its ``config.json``)."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, str | Path):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ValueError(f"cannot read HF config {str(path)!r}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"HF config {str(path)!r} is not valid JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise ValueError(f"HF config {str(path)!r} must hold a JSON object")
        return data
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise ValueError(
        f"config must be a transformers config, a dict or a path, got {type(config).__name__}"
    )


def _text(raw: dict[str, Any]) -> dict[str, Any]:
    """The language model's part: ``text_config`` when the top level has no layers."""
    text = raw.get("text_config")
    if "num_hidden_layers" not in raw and isinstance(text, Mapping):
        merged = dict(text)
        for key in ("torch_dtype", "dtype"):
            if merged.get(key) is None and raw.get(key) is not None:
                merged[key] = raw[key]
        return merged
    return raw


def _int(d: dict[str, Any], key: str, default: int | None = None) -> int:
    value = d.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        what = "missing" if key not in d else f"must be a positive int, got {value!r}"
        raise ValueError(f"HF config field {key!r}: {what}")
    return value


def _dtype(d: dict[str, Any]) -> torch.dtype:
    key = "torch_dtype" if d.get("torch_dtype") is not None else "dtype"
    value = d.get(key)
    if value is None or value == "auto":
        return torch.bfloat16
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"HF config field {key!r}: unsupported dtype {value!r}")
    return DTYPES[name]


def _head_dim(d: dict[str, Any]) -> int:
    for key in ("head_dim", "attention_head_dim"):
        if d.get(key) is not None:
            return _int(d, key)
    hidden, heads = _int(d, "hidden_size"), _int(d, "num_attention_heads")
    if hidden % heads:
        raise ValueError(
            "HF config field 'head_dim': missing, and hidden_size "
            f"{hidden} is not a multiple of num_attention_heads {heads}"
        )
    return hidden // heads


def _kinds(d: dict[str, Any]) -> list[str]:
    """One of ``full``, ``swa``, ``state`` per cache layer (see the module docstring)."""
    model_type = d.get("model_type")
    pattern = d.get("hybrid_override_pattern")
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("HF config field 'hybrid_override_pattern': must be a string")
        table = {"M": "state", "*": "full", "-": None, "E": None}
        bad = sorted(set(pattern) - set(table))
        if bad:
            raise ValueError(f"HF config field 'hybrid_override_pattern': unknown layer {bad[0]!r}")
        return [k for k in (table[c] for c in pattern) if k is not None]
    n = _int(d, "num_hidden_layers")
    if model_type == "falcon_h1":
        return ["full", "state"] * n
    if d.get("attn_layer_period") is not None:
        period = _int(d, "attn_layer_period")
        offset = d.get("attn_layer_offset", 0)
        if not isinstance(offset, int) or not 0 <= offset < period:
            raise ValueError(f"HF config field 'attn_layer_offset': must lie in [0, {period})")
        return ["full" if i % period == offset else "state" for i in range(n)]
    types = d.get("layer_types")
    if types is not None:
        if not isinstance(types, list | tuple) or len(types) != n:
            raise ValueError(f"HF config field 'layer_types': must list {n} layer types")
        kinds = []
        for t in types:
            if t in FULL_TYPES:
                kinds.append("full")
            elif t in SWA_TYPES:
                kinds.append("swa")
            elif t in STATE_TYPES:
                kinds.append("state")
            else:
                raise ValueError(f"HF config field 'layer_types': unsupported layer type {t!r}")
        return kinds
    if d.get("sliding_window_pattern") is not None:
        pattern_n = _int(d, "sliding_window_pattern")
        return ["full" if (i + 1) % pattern_n == 0 else "swa" for i in range(n)]
    if model_type == "gemma2":
        return ["swa" if i % 2 == 0 else "full" for i in range(n)]
    if "use_sliding_window" in d:
        if not d["use_sliding_window"] or d.get("sliding_window") is None:
            return ["full"] * n
        start = d.get("max_window_layers", 0)
        if not isinstance(start, int) or start < 0:
            raise ValueError("HF config field 'max_window_layers': must be an int >= 0")
        return ["swa" if i >= start else "full" for i in range(n)]
    if d.get("sliding_window") is not None:
        return ["swa"] * n
    return ["full"] * n


def _state_shape(d: dict[str, Any]) -> tuple[int, ...]:
    """The state of one recurrent layer (see the module docstring)."""
    if d.get("hybrid_override_pattern") is not None:  # Nemotron-H: Mamba-2
        heads, head_dim = _int(d, "mamba_num_heads"), _int(d, "mamba_head_dim")
        state, conv = _int(d, "ssm_state_size"), _int(d, "conv_kernel")
        groups = _int(d, "n_groups", 1)
    elif d.get("model_type") == "falcon_h1":
        if d.get("mamba_d_ssm") is not None:
            inner = _int(d, "mamba_d_ssm")
        else:
            inner = _int(d, "mamba_expand", 2) * _int(d, "hidden_size")
        heads = _int(d, "mamba_n_heads")
        if d.get("mamba_d_head") in (None, "auto"):
            head_dim = inner // heads
        else:
            head_dim = _int(d, "mamba_d_head")
        state, conv = _int(d, "mamba_d_state"), _int(d, "mamba_d_conv")
        groups = _int(d, "mamba_n_groups", 1)
    else:  # Jamba-style Mamba-1
        inner = _int(d, "mamba_expand", 2) * _int(d, "hidden_size")
        return (inner, _int(d, "mamba_d_conv", 4) + _int(d, "mamba_d_state", 16))
    conv_dim = heads * head_dim + 2 * groups * state
    return (conv_dim * conv + heads * head_dim * state,)


def _window(d: dict[str, Any], kinds: list[str]) -> int:
    if "swa" not in kinds:
        return CacheConfig.sliding_window
    window = d.get("sliding_window")
    if window is None:
        raise ValueError("HF config field 'sliding_window': missing, but some layers slide")
    return _int(d, "sliding_window")


def cache_bytes(config: CacheConfig) -> dict[str, int]:
    """Bytes of one token in the full and SWA pools (K + V over their layers) and of one
    state slot (every recurrent layer): ``{"full": ..., "swa": ..., "state": ...}``."""
    return config.token_bytes


def from_hf_config(
    config: object,
    memory_bytes: int | None = None,
    *,
    swa_full_tokens_ratio: float | None = None,
    state_share: float = 0.5,
    **overrides: Any,
) -> CacheConfig:
    """The :class:`CacheConfig` of a Hugging Face model config (rules: the module docstring).

    Args:
        config: a ``transformers`` config, a dict of one, or a path to ``config.json`` (or
            its directory).
        memory_bytes: device bytes for the KV and state pools; ``None`` keeps the default
            pool sizes.
        swa_full_tokens_ratio: ``None``: ``memory_bytes`` sizes one arena for every pool;
            else a static split, SWA pool tokens per full pool token, in (0, 1].
        state_share: with a static split, the fraction of ``memory_bytes`` for
            recurrent-state slots, in (0, 1).
        overrides: CacheConfig fields; they win over the mapped and computed values.

    Raises ``ValueError`` naming the field of a config it cannot map, or the budget that
    cannot hold the smallest pools.
    """
    if swa_full_tokens_ratio is not None and not 0 < swa_full_tokens_ratio <= 1:
        raise ValueError(f"swa_full_tokens_ratio must lie in (0, 1], got {swa_full_tokens_ratio}")
    if not 0 < state_share < 1:
        raise ValueError(f"state_share must lie in (0, 1), got {state_share}")
    d = _text(load_hf_dict(config))
    kinds = _kinds(d)
    if not kinds:
        raise ValueError("HF config field 'hybrid_override_pattern': no cache layers")
    heads = d.get("num_key_value_heads")
    mapped: dict[str, Any] = dict(
        num_layers=len(kinds),
        swa_layer_ids=tuple(i for i, k in enumerate(kinds) if k == "swa"),
        mamba_layer_ids=tuple(i for i, k in enumerate(kinds) if k == "state"),
        num_kv_heads=_int(d, "num_attention_heads" if heads is None else "num_key_value_heads"),
        head_dim=_head_dim(d),
        dtype=_dtype(d),
        sliding_window=_window(d, kinds),
    )
    if d.get("vocab_size") is not None:
        mapped["vocab_size"] = _int(d, "vocab_size")
    if mapped["mamba_layer_ids"]:
        mapped |= dict(state_shape=_state_shape(d), state_slots=max(3, CacheConfig.state_slots))
    base = CacheConfig(**(mapped | overrides | dict(full_tokens=1 << 20, swa_tokens=1 << 20)))
    if memory_bytes is None or swa_full_tokens_ratio is None:
        sizes = dict(swa_tokens=max(CacheConfig.swa_tokens, base.min_swa_tokens))
        sizes["full_tokens"] = max(CacheConfig.full_tokens, sizes["swa_tokens"])
        if memory_bytes is not None:
            if not isinstance(memory_bytes, int) or isinstance(memory_bytes, bool):
                raise ValueError(f"memory_bytes must be a positive int, got {memory_bytes!r}")
            sizes["memory_bytes"] = memory_bytes
    else:
        sizes = _pools(base, memory_bytes, swa_full_tokens_ratio, state_share)
    try:
        return CacheConfig(**(mapped | sizes | overrides))
    except ValueError as e:
        if memory_bytes is None:
            raise
        raise ValueError(f"memory_bytes={memory_bytes}: {e}") from None


def _pools(cfg: CacheConfig, memory: int, ratio: float, state_share: float) -> dict[str, int]:
    """Pool sizes within ``memory`` bytes (the module docstring's rule)."""
    if not isinstance(memory, int) or isinstance(memory, bool) or memory < 1:
        raise ValueError(f"memory_bytes must be a positive int, got {memory!r}")
    per, ps = cache_bytes(cfg), cfg.page_size
    sizes: dict[str, int] = {}
    if cfg.mamba_layer_ids:
        state_bytes = int(memory * state_share)
        sizes["state_slots"] = state_bytes // per["state"] - 1  # slot 0 pads
        memory -= state_bytes
    per_full_token = per["full"] + ratio * per["swa"]
    if per_full_token == 0:  # no attention layers: the full pool is only an index
        sizes["full_tokens"] = CacheConfig.full_tokens
        return sizes
    pages = int(memory // (per_full_token * ps))  # full pool pages, page 0 included
    sizes["full_tokens"] = (pages - 1) * ps
    if not cfg.has_swa:
        return sizes
    swa = (int(pages * ratio) - 1) * ps
    if swa < cfg.min_swa_tokens:
        # NOTE: the smallest SWA pool one request fits; the full pool pays for it
        swa = cfg.min_swa_tokens
        left = memory - (swa + ps) * per["swa"]
        if per["full"]:
            sizes["full_tokens"] = (int(left // (per["full"] * ps)) - 1) * ps
        else:
            sizes["full_tokens"] = max(sizes["full_tokens"], swa)
    sizes["swa_tokens"] = swa
    return sizes
