"""Static splits of a byte budget between the full and SWA pools, for ``--compare splits``.

A split gives ``share`` of the attention bytes (the budget less the recurrent-state share,
sized as :func:`~hybridkv.scheduler.hf_config.from_hf_config` sizes it) to the SWA pool and
the rest to the full pool, each rounded down to whole pages with its page 0 inside its
part, so every split of a budget holds the same bytes up to a page per pool. Unlike
``swa_full_tokens_ratio``, a share may give the SWA pool more tokens than the full pool
(bytes it cannot use): the sweep shows what such a split costs.
"""

from __future__ import annotations

from hybridkv.scheduler import CacheConfig
from hybridkv.scheduler.hf_config import cache_bytes

SHARES = tuple(k / 10 for k in range(1, 10))  # SWA shares of the attention bytes swept


def split_pools(
    config: CacheConfig, memory_bytes: int, share: float, state_share: float
) -> dict[str, int]:
    """``full_tokens`` and ``swa_tokens`` of the split of ``memory_bytes`` giving ``share``
    of its attention bytes to the SWA pool (``config``: the model shape, with SWA layers).
    A pool too small for the model is left to :class:`CacheConfig` to refuse."""
    if not config.has_swa or not config.full_layer_ids:
        raise ValueError("--compare splits needs a model with full and SWA layers")
    if not 0 < share < 1:
        raise ValueError(f"SWA share must lie in (0, 1), got {share}")
    per, ps = cache_bytes(config), config.page_size
    rest = memory_bytes - (int(memory_bytes * state_share) if config.mamba_layer_ids else 0)
    pools = {}
    for pool, part in (("full", 1 - share), ("swa", share)):
        pages = int(rest * part) // (per[pool] * ps)  # page 0 included
        pools[f"{pool}_tokens"] = max(0, pages - 1) * ps
    return pools


def swa_share(config: CacheConfig) -> float:
    """The SWA pool's share of the attention pools' bytes in ``config`` (pages 0 included)."""
    per, ps = cache_bytes(config), config.page_size
    swa = (config.swa_tokens // ps + 1) * ps * per["swa"]
    full = (config.full_tokens // ps + 1) * ps * per["full"]
    return swa / (swa + full)
