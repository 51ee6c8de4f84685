"""Benchmark set-up: import ``hybridkv`` from this checkout and pin torch's CPU threads.

``benchmarks/`` is outside ``testpaths``, so a plain ``pytest`` run never collects it; run
``pytest benchmarks/bench_kernels.py --benchmark-only``. The suite times torch references on
CPU, so the Triton interpreter is not needed here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op CPU threads for the benchmarks (default 1; 0 keeps torch's default)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # NOTE: one thread by default: index ops at ~32k elements go parallel, and on a shared or
    # oversubscribed machine a descheduled OpenMP thread stalls them for a whole time slice
    # (medians 100x off). The scheduler calls these references from one thread anyway.
    threads = config.getoption("--torch-threads")
    if threads:
        torch.set_num_threads(threads)


def pytest_report_header(config: pytest.Config) -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)"
