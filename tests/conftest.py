"""Test set-up: run Triton kernels in the interpreter when there is no GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

# NOTE: the suite checks every launcher's sync-needing argument checks: debug mode on.
os.environ.setdefault("HYBRIDKV_DEBUG", "1")
# NOTE: must happen before any module decorates a Triton kernel: @triton.jit reads it then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=50
)
settings.load_profile("default")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests (``pytestmark = usefixtures(...)``).

    NOTE: the tensors are tiny, and on 2 CPU threads torch 2.13's
    ``repeat_interleave(x, repeats)`` (the torch references use it) takes ~10 ms a call
    against ~6 us on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
