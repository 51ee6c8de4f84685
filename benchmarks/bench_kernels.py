"""CPU benchmarks: the torch reference of every kernel job at batch 1, 64 and 1024.

    pytest benchmarks/bench_kernels.py --benchmark-only

Inputs come from ``inputs.py`` (shared with ``gpu_kernels.py``); each case is first run once
through the public function with ``backend="torch"``, so its argument checks vouch for the
inputs. ``test_public`` times the public function on the torch backend (the CPU production
path: launcher checks included, debug checks off, the host-known sizes passed as a real caller
does). Page copies also time a contiguous ``copy_`` of the same bytes. Times are reported,
never asserted.
"""

from __future__ import annotations

import pytest

from hybridkv.kernels import debug_enabled, set_debug
from hybridkv.kernels.cases import BATCHES, JOBS, build_case

COPY_JOBS = [job for job in JOBS if job.startswith("page_copy_")]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("job", JOBS)
def test_reference(benchmark, job: str, batch: int) -> None:
    """One call of the job's torch reference on CPU at this batch."""
    case = build_case(job, batch)
    case.run("torch")
    benchmark.group = job
    benchmark.extra_info["nbytes"] = case.nbytes
    benchmark(case.run_reference)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("job", JOBS)
def test_public(benchmark, job: str, batch: int) -> None:
    """One call of the public function, torch backend, debug checks off, on CPU."""
    case = build_case(job, batch)
    case.run("torch")
    benchmark.group = job
    benchmark.extra_info["nbytes"] = case.nbytes
    was = debug_enabled()
    set_debug(False)
    try:
        benchmark(case.run, "torch")
    finally:
        set_debug(was)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("job", COPY_JOBS)
def test_contiguous_copy_baseline(benchmark, job: str, batch: int) -> None:
    """A contiguous copy_ of the same bytes as the page copy, between the same memories."""
    case = build_case(job, batch)
    benchmark.group = job
    benchmark.extra_info["nbytes"] = case.nbytes
    benchmark(case.baseline)
