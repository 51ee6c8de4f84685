"""Test set-up: run Triton kernels in the interpreter when there is no GPU."""

from __future__ import annotations

import os

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
