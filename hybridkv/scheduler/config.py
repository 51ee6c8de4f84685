"""CacheConfig: the model shape, the pool sizes and the policies of one manager."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

from hybridkv.allocator.arena import ArenaLayout
from hybridkv.kernels import interpreter_on
from hybridkv.tree import SWA_EVICTION_POLICIES, WRITE_POLICIES


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class CacheConfig:
    """Everything a :class:`MemoryManager` needs; all but the model shape has a default.

    Token counts are usable tokens per pool (rounded down to whole pages); each pool has
    one more page, page 0, for padding writes. A model without SWA layers has no SWA pool:
    ``swa_tokens`` and ``sliding_window`` are then ignored, and may be 0 and ``None``.
    ``vocab_size``, when set, bounds the token ids ``add_request`` and ``commit`` accept.
    ``backend=None`` picks Triton where it can run (CUDA, or the interpreter) and the torch
    references elsewhere.

    ``memory_bytes``, when set, sizes one device arena that holds the full, SWA and state
    pools, whose pages move between them by demand (``hybridkv.allocator.arena``):
    ``swa_tokens`` and ``state_slots`` are then ignored, and ``full_tokens`` only sizes the
    full pool of a model whose full pool holds no bytes (every attention layer slides: the
    full pool is only an index). The host tier keeps its sizes from ``host_tokens`` and the
    ratios of those fields. Without it, each pool has its own buffer of its own size.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 16
    swa_layer_ids: tuple[int, ...] = ()
    mamba_layer_ids: tuple[int, ...] = ()
    dtype: torch.dtype = torch.bfloat16
    full_tokens: int = 65536
    swa_tokens: int = 16384
    sliding_window: int | None = 4096
    state_slots: int = 0
    state_shape: tuple[int, ...] = ()
    host_tokens: int = 0
    write_policy: str = "write_through"
    storage: str | None = None
    chunked_prefill_size: int = 2048
    max_prefill_tokens: int = 8192
    max_running_requests: int = 256
    max_context_len: int = 8192
    swa_eviction: str = "window"
    device: str = field(default_factory=_default_device)
    backend: str | None = None
    vocab_size: int | None = None
    memory_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("swa_layer_ids", "mamba_layer_ids", "state_shape"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(_is_int(i) for i in _iterable(name, value)):
                raise ValueError(f"{name} must be a sequence of ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "full_tokens"):
            _positive(name, getattr(self, name))
        for name in ("chunked_prefill_size", "max_prefill_tokens", "max_running_requests"):
            _positive(name, getattr(self, name))
        _positive("max_context_len", self.max_context_len)
        if self.memory_bytes is not None:
            _positive("memory_bytes", self.memory_bytes)
        if self.has_swa:
            if not self.arena:
                _positive("swa_tokens", self.swa_tokens)
            _positive("sliding_window", self.sliding_window)
        else:
            if not _is_int(self.swa_tokens) or self.swa_tokens < 0:
                raise ValueError(f"swa_tokens must be a non-negative int, got {self.swa_tokens!r}")
            if self.sliding_window is not None:
                _positive("sliding_window", self.sliding_window)
        if self.vocab_size is not None:
            _positive("vocab_size", self.vocab_size)
        ids = self.swa_layer_ids + self.mamba_layer_ids
        if any(not 0 <= i < self.num_layers for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(
                "swa_layer_ids / mamba_layer_ids must be distinct ids in [0, num_layers)"
            )
        if not _is_int(self.state_slots) or self.state_slots < 0:
            raise ValueError(f"state_slots must be a non-negative int, got {self.state_slots!r}")
        if self.mamba_layer_ids:
            if self.storage is not None:
                raise ValueError(
                    "storage does not hold recurrent-state snapshots yet: a model with "
                    "mamba_layer_ids could never use a prefix read from it"
                )
            if not self.state_shape or any(d < 1 for d in self.state_shape):
                raise ValueError("state_shape must be a non-empty shape of positive ints")
            if self.state_slots < 3 and not self.arena:
                raise ValueError(
                    "state_slots must be at least 3 with mamba_layer_ids (a working slot, a "
                    "snapshot and a load back)"
                )
        if not _is_int(self.host_tokens) or self.host_tokens < 0:
            raise ValueError(f"host_tokens must be a non-negative int, got {self.host_tokens!r}")
        if 0 < self.host_tokens < 2 * self.page_size:
            raise ValueError("host_tokens must be 0 (no host tier) or hold at least two pages")
        if self.storage is not None and not self.host_tokens:
            raise ValueError("storage needs the host tier (host_tokens > 0): pages pass through it")
        if self.write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy must be one of {WRITE_POLICIES}")
        if self.swa_eviction not in SWA_EVICTION_POLICIES:
            raise ValueError(f"swa_eviction must be one of {SWA_EVICTION_POLICIES}")
        if self.chunked_prefill_size < self.page_size:
            raise ValueError("chunked_prefill_size must be at least one page")
        if self.max_prefill_tokens < self.page_size:
            raise ValueError("max_prefill_tokens must be at least one page")
        if self.full_tokens < 2 * self.page_size:
            raise ValueError("full_tokens must hold at least two pages")
        if self.has_swa and not self.arena:
            if self.swa_tokens < self.min_swa_tokens:
                raise ValueError(
                    f"swa_tokens must be at least {self.min_swa_tokens} "
                    "(a window and two pages, so one request always fits)"
                )
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but no CUDA device is available")
        if self.backend not in (None, "triton", "torch"):
            raise ValueError("backend must be 'triton', 'torch' or None")
        if self.backend == "triton" and device.type != "cuda" and not interpreter_on():
            raise ValueError("backend='triton' needs a CUDA device or TRITON_INTERPRET=1")
        if self.arena:
            layout = self.arena_layout
            least = self.arena_min_chunks
            if layout is None or layout.num_chunks < least:
                chunk = layout.chunk_bytes if layout is not None else 0
                raise ValueError(
                    f"memory_bytes ({self.memory_bytes}) must hold at least {least} chunks of "
                    f"{chunk} bytes (a reserved chunk and the smallest full, SWA and state "
                    "pools)"
                )

    @property
    def arena(self) -> bool:
        """Whether one arena of ``memory_bytes`` holds the pools."""
        return self.memory_bytes is not None

    @property
    def token_bytes(self) -> dict[str, int]:
        """Bytes of one token in the full and SWA pools (K + V over their layers) and of one
        state slot (every recurrent layer): ``{"full": ..., "swa": ..., "state": ...}``."""
        item = torch.empty(0, dtype=self.dtype).element_size()
        kv = 2 * self.num_kv_heads * self.head_dim * item
        state = len(self.mamba_layer_ids) * math.prod(self.state_shape or (0,)) * item
        return {
            "full": kv * len(self.full_layer_ids),
            "swa": kv * len(self.swa_layer_ids),
            "state": state,
        }

    @property
    def arena_pools(self) -> tuple[str, ...]:
        """The pools the arena holds, in its pool order: those of the model that hold bytes
        (``"full"``, ``"swa"``, ``"state"``)."""
        per = self.token_bytes
        present = {"full": True, "swa": self.has_swa, "state": bool(self.mamba_layer_ids)}
        return tuple(p for p in ("full", "swa", "state") if present[p] and per[p])

    @cached_property
    def arena_layout(self) -> ArenaLayout | None:
        """The arena's chunks (``None`` without ``memory_bytes`` or a chunk of them)."""
        if not self.arena:
            return None
        per, ps = self.token_bytes, self.page_size
        pages = tuple(per[p] * (1 if p == "state" else ps) for p in self.arena_pools)
        layout = ArenaLayout.plan(self.memory_bytes, pages)
        return layout if layout.num_chunks else None

    def arena_min_pages(self, pool: str) -> int:
        """The fewest pages (state: slots) of ``pool`` that one request always fits."""
        ps = self.page_size
        return {"full": 2, "swa": self.min_swa_tokens // ps, "state": 3}[pool]

    @property
    def arena_min_chunks(self) -> int:
        """The fewest chunks an arena may have: the reserved one and the smallest pools."""
        layout = self.arena_layout
        if layout is None:
            return 2
        return 1 + sum(
            -(-self.arena_min_pages(p) // layout.min_pages_per_chunk(i))
            for i, p in enumerate(self.arena_pools)
        )

    @property
    def full_capacity(self) -> int:
        """The most full tokens the pools can ever give one request: the full pool's size, or
        with an arena what its chunks give the full pool when the other pools keep their
        smallest sizes."""
        ps = self.page_size
        if "full" not in self.arena_pools or not self.arena:
            return self.full_tokens - self.full_tokens % ps
        layout = self.arena_layout
        spare = layout.num_chunks - self.arena_min_chunks
        spare += -(-self.arena_min_pages("full") // layout.min_pages_per_chunk(0))
        return spare * layout.min_pages_per_chunk(0) * ps

    @property
    def has_swa(self) -> bool:
        return bool(self.swa_layer_ids)

    @property
    def window(self) -> int | None:
        """The sliding window in tokens, or ``None`` when the model has no SWA layers."""
        return self.sliding_window if self.has_swa else None

    @property
    def swa_lock_step(self) -> int:
        """How far (tokens, whole pages) a request's window slides over its cached prefix
        before it stops pinning the prefix's SWA behind it: an eighth of the window, so a
        prompt's last window is split into at most eight nodes."""
        ps = self.page_size
        return max(1, -(-(self.window or 0) // ps) // 8) * ps

    @property
    def min_swa_tokens(self) -> int:
        """The smallest SWA pool one request always fits: its window (at least a page), a
        page it decodes into, a page of alloc_extend slack and the lock's sliding step (0
        without SWA layers)."""
        if self.window is None:
            return 0
        ps = self.page_size
        window_pages = -(-max(self.sliding_window, ps) // ps)
        return (window_pages + 2) * ps + self.swa_lock_step - ps

    @property
    def host_swa_tokens(self) -> int:
        """Host SWA tokens: the device ratio of SWA to full, at least what one request needs."""
        return max(self.host_tokens * self.swa_tokens // self.full_tokens, self.min_swa_tokens)

    @property
    def host_state_slots(self) -> int:
        """Host state slots: the device ratio of host to full tokens, at least the device's
        (and 3, as an arena's state_slots may be 0)."""
        return max(self.state_slots * self.host_tokens // self.full_tokens, self.state_slots, 3)

    @property
    def full_layer_ids(self) -> list[int]:
        other = set(self.swa_layer_ids) | set(self.mamba_layer_ids)
        return [i for i in range(self.num_layers) if i not in other]

    def replace(self, **changes: object) -> CacheConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(
        cls, config: object, memory_bytes: int | None = None, **overrides: object
    ) -> CacheConfig:
        """The config of a Hugging Face model (a transformers config, a dict or a path), pools
        sized from ``memory_bytes``: see :mod:`hybridkv.scheduler.hf_config`."""
        from hybridkv.scheduler.hf_config import from_hf_config

        return from_hf_config(config, memory_bytes, **overrides)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _iterable(name: str, value: object) -> list[object]:
    try:
        return list(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, got {value!r}") from None


def _positive(name: str, value: object) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
