"""Triton, or a stand-in where it is not installed (macOS, Windows: no Triton wheels).

Kernel modules import ``triton`` and ``tl`` from here. Without Triton, ``@triton.jit``
still decorates (a kernel becomes a stub that raises if launched), ``tl.constexpr`` and
the other names a module touches at import time exist, and :data:`HAS_TRITON` is False,
so :func:`hybridkv.kernels.resolve_backend` picks the torch references.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _Kernel:
        """What ``@triton.jit`` returns without Triton: launching it is an error."""

        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __getitem__(self, grid: object) -> Any:
            raise RuntimeError(
                f"{self.fn.__name__} is a Triton kernel and Triton is not installed: use "
                "backend='torch' (pip install triton, on Linux, for the kernels)"
            )

    def _jit(fn: Any = None, **_: object) -> Any:
        return _Kernel(fn) if fn is not None else _Kernel

    def _cdiv(a: int, b: int) -> int:
        return -(-a // b)

    def _next_power_of_2(n: int) -> int:
        return 1 << max(0, int(n) - 1).bit_length()

    triton = SimpleNamespace(  # type: ignore[assignment]
        jit=_jit, cdiv=_cdiv, next_power_of_2=_next_power_of_2, __version__="not installed"
    )
    tl = SimpleNamespace(constexpr=Any)  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "tl", "triton"]
