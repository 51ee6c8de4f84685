"""Errors hybridkv raises on purpose."""

from __future__ import annotations


class CheckError(Exception):
    """An invariant ``check()`` verifies does not hold: a bug in hybridkv, never bad input.

    A plain exception rather than ``assert``, so ``python -O`` still checks.
    """


def ensure(condition: bool, message: str) -> None:
    """Raise :class:`CheckError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CheckError(message)
