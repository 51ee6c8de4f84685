"""Launchers with host-known sizes: same results, checked in debug mode, no device->host sync.

Inputs are the benchmark cases (``hybridkv.kernels.cases``), whose ``kwargs`` carry the sizes
a real caller passes. A sync is counted on CPU tensors too: the same op syncs on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import count_syncs

from hybridkv import kernels
from hybridkv.kernels import debug_enabled, set_debug
from hybridkv.kernels.cases import JOBS, Case, build_case

SIZE_KWARGS = ("num_new_pages", "num_tokens", "num_freed", "num_pages")
SIZED_JOBS = ["alloc_extend", "alloc_decode", "swa_release", "page_table", "page_table_swa"]
# slots_to_pages compacts with nonzero by design (the eviction path): it always syncs.
SYNC_FREE_JOBS = [job for job in JOBS if job != "slots_to_pages"]
# The module of each Triton kernel: kernel ``_{module}_kernel`` lives in ``kernels.{module}``.
KERNEL_MODULES = [
    "alloc_decode",
    "alloc_extend",
    "full_to_swa",
    "page_copy",
    "page_table",
    "swa_release",
    "write_req_to_token",
]


@contextlib.contextmanager
def debug(on: bool) -> Iterator[None]:
    was = debug_enabled()
    set_debug(on)
    try:
        yield
    finally:
        set_debug(was)


def _without_sizes(case: Case) -> Case:
    kwargs = {k: v for k, v in case.kwargs.items() if k not in SIZE_KWARGS}
    return dataclasses.replace(case, kwargs=kwargs)


def _with(case: Case, **kwargs: Any) -> Case:
    return dataclasses.replace(case, kwargs={**case.kwargs, **kwargs})


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(map(_same, a, b))  # type: ignore[arg-type]
    return a == b


@contextlib.contextmanager
def no_kernel_launches() -> Iterator[None]:
    """Triton launches become no-ops: what is left is the launcher's own host work."""

    class _NoLaunch:
        def __getitem__(self, grid: object) -> Any:
            return lambda *args, **kwargs: None

    with pytest.MonkeyPatch.context() as mp:
        for name in KERNEL_MODULES:
            module = importlib.import_module(f"hybridkv.kernels.{name}")
            mp.setattr(module, f"_{name}_kernel", _NoLaunch())
        yield


def test_set_debug_round_trip() -> None:
    """The suite runs in debug mode; set_debug flips it."""
    assert debug_enabled()
    with debug(False):
        assert not debug_enabled()
    assert debug_enabled()


@pytest.mark.parametrize("debug_on", [True, False], ids=["debug", "nodebug"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("job", SIZED_JOBS)
def test_sizes_change_nothing(job: str, batch: int, backend: str, debug_on: bool) -> None:
    """Passing the host-known sizes gives the results (and mutations) of not passing them."""
    with_sizes, without = build_case(job, batch), _without_sizes(build_case(job, batch))
    assert set(with_sizes.kwargs) & set(SIZE_KWARGS)
    with debug(debug_on):
        got, want = with_sizes.run(backend), without.run(backend)
    assert _same(got, want)
    assert _same(with_sizes.args, without.args)


@pytest.mark.parametrize("job", SIZED_JOBS)
def test_wrong_size_is_value_error_in_debug(job: str) -> None:
    """A size that does not match the tensors raises, naming it, on both backends."""
    case = build_case(job, 8)
    for name, value in case.kwargs.items():
        if name not in SIZE_KWARGS:
            continue
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match=name):
                _with(case, **{name: value + 1}).run(backend)
            with pytest.raises(ValueError, match=name):
                _with(case, **{name: -1}).run(backend)
            with pytest.raises(ValueError, match=name):
                _with(case, **{name: float(value)}).run(backend)


@pytest.mark.parametrize("job", SYNC_FREE_JOBS)
def test_torch_path_does_not_sync(job: str) -> None:
    """Debug off, sizes given: the torch backend (the CPU production path) never syncs."""
    case = build_case(job, 64)
    with debug(False), count_syncs() as count:
        case.run("torch")
    assert count.syncs == []


@pytest.mark.parametrize("job", SYNC_FREE_JOBS)
def test_triton_launcher_does_not_sync(job: str) -> None:
    """Debug off, sizes given: the Triton launcher's host work (all but the launch) never syncs."""
    case = build_case(job, 64)
    with debug(False), no_kernel_launches(), count_syncs() as count:
        case.run("triton")
    assert count.syncs == []


@pytest.mark.parametrize("job", SYNC_FREE_JOBS)
def test_torch_path_op_count_does_not_grow_with_batch(job: str) -> None:
    """The torch path is batched tensor work: its aten op count is the same at 64 and 1024."""
    counts = []
    for batch in (64, 1024):
        case = build_case(job, batch)
        with debug(False), count_syncs() as count:
            case.run("torch")
        counts.append(count.ops)
    assert counts[0] == counts[1]


def test_slots_to_pages_syncs_once() -> None:
    """slots_to_pages keeps its one nonzero (it sizes the freed pages) and nothing else."""
    case = build_case("slots_to_pages", 8)
    with debug(False), count_syncs() as count:
        case.run("torch")
    assert count.syncs == ["aten.nonzero.default"]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batches_with_sizes(backend: str) -> None:
    """Batch 0 and calls with nothing to do return empty results without a sync."""
    e = torch.empty(0, dtype=torch.int64)
    r2t = torch.zeros(4, 32, dtype=torch.int32)
    smap = torch.arange(64)
    with debug(False), count_syncs() as count:
        out, n = kernels.alloc_decode(e, e, e, 4, num_new_pages=0, backend=backend)
        assert out.shape == (0,) and n == 0
        out, n = kernels.alloc_extend(e, e, e, e, 4, num_new_pages=0, num_tokens=0, backend=backend)
        assert out.shape == (0,) and n == 0
        freed, new = kernels.swa_release(r2t, e, e, e, smap, 8, 4, num_freed=0, backend=backend)
        assert freed.shape == (0,) and new.shape == (0,)
        indptr, indices, last = kernels.page_table(r2t, e, e, e, 4, num_pages=0, backend=backend)
        assert indptr.tolist() == [0] and indices.shape == (0,) and last.shape == (0,)
    assert count.syncs == ["Tensor.tolist"]  # the assertion's own
    # Nothing slid out of the window: no page freed, the map untouched.
    seq, zero = torch.tensor([10, 7]), torch.zeros(2, dtype=torch.int64)
    rows = torch.tensor([0, 2])
    with debug(False), count_syncs() as count:
        freed, new = kernels.swa_release(r2t, rows, seq, zero, smap, 8, 4, num_freed=0)
    assert count.syncs == []
    assert freed.numel() == 0 and torch.equal(new, zero) and torch.equal(smap, torch.arange(64))
