"""Helpers shared by the tests: devices, poisoned buffers, random inputs."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from unittest import mock

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
POISON = -7777


def poisoned(n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A buffer whose unwritten elements show as POISON."""
    return torch.full((n,), POISON, dtype=dtype, device=DEVICE)


def random_free_pages(n: int, num_pages: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` distinct pages in ``[1, num_pages)``, shuffled (page 0 is reserved)."""
    return (torch.randperm(num_pages - 1, generator=gen)[:n] + 1).to(DEVICE)


def seeded(*key: object) -> torch.Generator:
    """A CPU generator whose seed is fixed by ``key`` (e.g. the test's parameters)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Inside the block, ``torch.empty`` returns POISON-filled tensors (NaN for floats).

    Launchers allocate their outputs with ``torch.empty``; under this, an element a kernel
    forgot to write shows up instead of whatever the allocator left there.
    """
    real_empty = torch.empty

    def empty(*args: object, **kwargs: object) -> torch.Tensor:
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() or t.is_complex():
            return t.fill_(float("nan"))
        if t.dtype == torch.bool:
            return t.fill_(True)
        info = torch.iinfo(t.dtype)
        return t.fill_(POISON if info.min <= POISON <= info.max else info.max)

    with mock.patch.object(torch, "empty", empty):
        yield


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Index outputs: same dtype, shape and values, and no POISON left anywhere."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not bool((actual == POISON).any()), "an output element was never written"
    assert torch.equal(actual, expected), (actual, expected)
