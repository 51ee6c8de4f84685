"""Helpers shared by the tests: devices, poisoned buffers, random inputs."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import socket
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
POISON = -7777


def assert_refused_unchanged(mm: Any, call: Callable[[], object], match: str) -> None:
    """``call()`` raises ValueError matching ``match``; the manager's stats and invariants
    are as they were."""
    before = mm.stats()
    with pytest.raises(ValueError, match=match):
        call()
    assert mm.stats() == before
    mm.check()


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


def run_ranks(
    fn: Callable[..., dict],
    per_rank_args: list[tuple],
    timeout_s: float,
    group_timeout_s: float,
) -> dict[int, dict]:
    """Run ``fn(rank, *per_rank_args[rank])`` on spawned ranks joined in one gloo process
    group (its collectives time out after ``group_timeout_s``); return each rank's dict.

    ``fn`` must be a module-level function (it is pickled). A rank that raises reports
    ``{"error": ..., "tb": ...}`` instead; a rank that hangs fails the caller's assertion
    (it is killed) after ``timeout_s``, instead of blocking the test run.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    world = len(per_rank_args)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, r, world, init_method, group_timeout_s, per_rank_args[r], results),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}
    try:
        for _ in range(world):
            rank, res = results.get(timeout=timeout_s)
            got[rank] = res
    except queue.Empty:
        pass
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    assert len(got) == world, f"ranks {sorted(set(range(world)) - set(got))} hung: {got}"
    return got


def _rank_main(
    fn: Callable[..., dict],
    rank: int,
    world: int,
    init_method: str,
    group_timeout_s: float,
    args: tuple,
    results: mp.Queue,
) -> None:
    """One rank of :func:`run_ranks`: join the group, run ``fn``, leave the group."""
    try:
        dist.init_process_group(
            "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=group_timeout_s),
        )
        try:
            results.put((rank, fn(rank, *args)))
        finally:
            dist.destroy_process_group()
    except Exception as exc:  # report, so the parent fails with the cause instead of a hang
        results.put((rank, {"error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}))


@dataclass
class SyncCount:
    """What :func:`count_syncs` saw: ``syncs`` names each op that waits for the device to
    know its result on the host; ``ops`` counts every aten op."""

    syncs: list[str] = field(default_factory=list)
    ops: int = 0


_SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select")
_SYNC_PREFIXES = ("aten.unique", "aten._unique", "aten.equal")


def _has_bool_index(indices: object) -> bool:
    items = indices if isinstance(indices, (list, tuple)) else [indices]
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in items)


def _on_cpu(device: object) -> bool:
    return device is not None and torch.device(device).type == "cpu"  # type: ignore[arg-type]


def _is_sync(name: str, args: tuple, kwargs: dict[str, Any]) -> bool:
    """True for an op that needs the device's result on the host (whatever device runs it:
    on CPU the same op would sync on a GPU)."""
    if name.startswith(_SYNC_OPS) or name.startswith(_SYNC_PREFIXES):
        return True
    if name.startswith(("aten.index.", "aten.index_put", "aten._index_put_impl")):
        return len(args) > 1 and _has_bool_index(args[1])
    if name.startswith("aten.repeat_interleave.Tensor"):
        return kwargs.get("output_size") is None
    if name.startswith("aten.copy_"):
        dst, src = args[0], args[1]
        if not isinstance(src, torch.Tensor):
            return False
        return src.device.type != "cpu" and dst.device.type == "cpu"
    if name.startswith("aten._to_copy"):
        src = args[0]
        return src.device.type != "cpu" and _on_cpu(kwargs.get("device"))
    return False


class _SyncCounter(TorchDispatchMode):
    def __init__(self, count: SyncCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        self.count.ops += 1
        if _is_sync(name, args, kwargs):
            self.count.syncs.append(name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCount]:
    """Count aten ops and device->host syncs inside the block.

    A sync is ``_local_scalar_dense``/``item`` (``int()``, ``bool()``, ``.item()``),
    ``nonzero``, ``unique*``, ``masked_select``, ``equal``, indexing or ``index_put`` with a
    bool mask, ``repeat_interleave`` without ``output_size``, a copy from a non-CPU tensor to
    the CPU, and ``Tensor.tolist`` (which reads CPU memory without the dispatcher, so it is
    patched). Ops on CPU count too: they are the ones that would sync on a GPU.
    """
    count = SyncCount()
    real_tolist = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        count.syncs.append("Tensor.tolist")
        return real_tolist(self)

    with mock.patch.object(torch.Tensor, "tolist", tolist), _SyncCounter(count):
        yield count
