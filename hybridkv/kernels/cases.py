"""Realistic inputs for the kernel benchmarks: one call of every kernel job at a batch size.

Shared by ``python -m hybridkv`` (the self-check), the CPU suite (``benchmarks/bench_kernels.py``)
and the GPU script (``benchmarks/gpu_kernels.py``).
Lengths, per request (``PAGE_SIZE`` 16, ``WINDOW`` 512):

    job                 batch means        tokens per request
    alloc_extend        prefill requests   prefix ~U[0, 1024), extend_len(batch) new tokens
    write_req_to_token  prefill requests   as alloc_extend (prefix slots + new slots)
    full_to_swa         prefill requests   the extend_len(batch) new tokens
    alloc_decode        decode requests    1 new token, context ~U[1536, 2560]
    slots_to_pages      finished requests  every slot of a ~2k context
    swa_release         decode requests    one page slides out of the window
    page_table[_swa]    decode requests    ~2k context (full) / the trailing window (SWA)
    page_copy_*         pages copied       whole pages: every layer, K and V

``nbytes`` is the least traffic one call must do (reads + writes of the elements it touches),
the numerator of the GB/s column.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybridkv.kernels import (
    alloc_decode,
    alloc_decode_reference,
    alloc_extend,
    alloc_extend_reference,
    full_to_swa,
    full_to_swa_reference,
    page_copy,
    page_copy_reference,
    page_table,
    page_table_reference,
    slots_to_pages,
    slots_to_pages_reference,
    swa_release,
    swa_release_reference,
    write_req_to_token,
    write_req_to_token_reference,
)

PAGE_SIZE = 16
WINDOW = 512
MAX_CONTEXT = 4096
BATCHES = (1, 64, 1024)
I64, I32 = 8, 4  # bytes per index element


@dataclass(frozen=True, slots=True)
class KVShape:
    """The per-page geometry of a KV pool: ``num_layers * 2`` chunks of one page each."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int = PAGE_SIZE
    dtype: torch.dtype = torch.bfloat16

    @property
    def chunk_elems(self) -> int:
        return self.page_size * self.num_kv_heads * self.head_dim

    @property
    def page_bytes(self) -> int:
        return self.num_layers * 2 * self.chunk_elems * torch.empty((), dtype=self.dtype).itemsize


CPU_KV = KVShape(num_layers=4, num_kv_heads=2, head_dim=64)  # 32 KiB per page
GPU_KV = KVShape(num_layers=8, num_kv_heads=8, head_dim=128)  # 512 KiB per page


@dataclass(frozen=True)
class Case:
    """One call of a kernel job: ``run(backend)`` calls the public function, ``run_reference()``
    its torch reference, on the same arguments. ``kwargs`` holds the host-known sizes
    (``num_new_pages``, ``num_tokens``, ``num_freed``, ``num_pages``) a real caller passes.
    ``baseline`` (page copies only) is a contiguous ``copy_`` of the same bytes between the
    same two memories."""

    job: str
    batch: int
    fn: Callable[..., object]
    reference: Callable[..., object]
    args: tuple
    nbytes: int
    kwargs: dict = field(default_factory=dict)
    baseline: Callable[[], object] | None = None

    def run(self, backend: str | None) -> object:
        return self.fn(*self.args, **self.kwargs, backend=backend)

    def run_reference(self) -> object:
        return self.reference(*self.args, **self.kwargs)


def extend_len(batch: int) -> int:
    """New tokens per prefill request: 512, capped at a 32k-token step (32 at batch 1024)."""
    return min(512, 32768 // batch)


def _cdiv(a: torch.Tensor, b: int) -> torch.Tensor:
    return (a + b - 1) // b


def _gen(job: str, batch: int) -> torch.Generator:
    """A generator seeded by the case, the same in every process (``hash`` of a str is not)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{job}/{batch}".encode()))


# -- prefill step --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Extend:
    prefix_lens: torch.Tensor
    seq_lens: torch.Tensor
    last_loc: torch.Tensor
    free_pages: torch.Tensor
    new_pages: int
    pool_pages: int


def _extend_step(batch: int, gen: torch.Generator) -> _Extend:
    """A prefill step: each request has a cached prefix and ``extend_len(batch)`` new tokens."""
    prefix = torch.randint(0, 1024, (batch,), generator=gen)
    seq = prefix + extend_len(batch)
    new_pages = int((_cdiv(seq, PAGE_SIZE) - _cdiv(prefix, PAGE_SIZE)).sum())
    pool_pages = new_pages + batch + 1  # the prefixes' last pages, the new ones, page 0
    perm = torch.randperm(pool_pages - 1, generator=gen) + 1
    last_loc = perm[new_pages:] * PAGE_SIZE + (prefix - 1) % PAGE_SIZE
    return _Extend(prefix, seq, last_loc, perm[:new_pages], new_pages, pool_pages)


def _alloc_extend(batch: int, device: torch.device) -> Case:
    s = _extend_step(batch, _gen("alloc_extend", batch))
    tokens = int((s.seq_lens - s.prefix_lens).sum())
    args = (s.prefix_lens, s.seq_lens, s.last_loc, s.free_pages)
    nbytes = I64 * (3 * batch + s.new_pages + tokens)
    return Case(
        "alloc_extend",
        batch,
        alloc_extend,
        alloc_extend_reference,
        (*(t.to(device) for t in args), PAGE_SIZE),
        nbytes,
        {"num_new_pages": s.new_pages, "num_tokens": tokens},
    )


def _write_req_to_token(batch: int, device: torch.device) -> Case:
    gen = _gen("write_req_to_token", batch)
    s = _extend_step(batch, gen)
    new_slots, _ = alloc_extend_reference(
        s.prefix_lens, s.seq_lens, s.last_loc, s.free_pages, PAGE_SIZE
    )
    prefix_slots = torch.randint(PAGE_SIZE, s.pool_pages * PAGE_SIZE, (int(s.prefix_lens.sum()),))
    extend_lens = s.seq_lens - s.prefix_lens
    args = (
        torch.zeros(batch, MAX_CONTEXT, dtype=torch.int32),
        torch.randperm(batch, generator=gen),
        prefix_slots,
        s.prefix_lens,
        new_slots,
        s.prefix_lens,  # extend_starts: new tokens follow the prefix
        extend_lens,
    )
    written = prefix_slots.numel() + new_slots.numel()
    nbytes = (I64 + I32) * written + 4 * I64 * batch
    return Case(
        "write_req_to_token",
        batch,
        write_req_to_token,
        write_req_to_token_reference,
        tuple(t.to(device) for t in args),
        nbytes,
    )


def _full_to_swa(batch: int, device: torch.device) -> Case:
    gen = _gen("full_to_swa", batch)
    s = _extend_step(batch, gen)
    full_slots, _ = alloc_extend_reference(
        s.prefix_lens, s.seq_lens, s.last_loc, s.free_pages, PAGE_SIZE
    )
    num_slots = s.pool_pages * PAGE_SIZE
    full_to_swa_map = torch.randperm(num_slots, generator=gen)
    nbytes = 3 * I64 * full_slots.numel()  # slot in, map entry in, SWA slot out
    return Case(
        "full_to_swa",
        batch,
        full_to_swa,
        full_to_swa_reference,
        (full_slots.to(device), full_to_swa_map.to(device)),
        nbytes,
    )


# -- decode step ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Decode:
    req_to_token: torch.Tensor  # int32 [batch, MAX_CONTEXT]
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    released_lens: torch.Tensor
    full_to_swa_map: torch.Tensor
    num_pages: int


def _decode_step(batch: int, gen: torch.Generator) -> _Decode:
    """Running requests of ~2k tokens laid out page by page in shuffled pages of a full pool.

    Every full page maps, offset for offset, to its own SWA page, except the pages released
    before this step: those are tombstoned (0). ``released_lens`` sits one page behind the
    release frontier, so the next ``swa_release`` frees exactly one page per request.
    """
    seq = torch.randint(1536, 2561, (batch,), generator=gen)
    pages_per_req = _cdiv(seq, PAGE_SIZE)
    num_pages = int(pages_per_req.sum()) + 1
    full_pages = torch.randperm(num_pages - 1, generator=gen) + 1
    starts = torch.cumsum(pages_per_req, 0) - pages_per_req
    pos = torch.arange(MAX_CONTEXT)
    page_idx = torch.minimum(
        starts[:, None] + pos // PAGE_SIZE, starts[:, None] + pages_per_req[:, None] - 1
    )
    slots = full_pages[page_idx] * PAGE_SIZE + pos % PAGE_SIZE
    slots = torch.where(pos < seq[:, None], slots, 0)
    rows = torch.randperm(batch, generator=gen)
    req_to_token = torch.zeros(batch, MAX_CONTEXT, dtype=torch.int32)
    req_to_token[rows] = slots.to(torch.int32)

    swa_page_of = torch.cat(
        [torch.zeros(1, dtype=torch.int64), torch.randperm(num_pages - 1, generator=gen) + 1]
    )
    full_slot = torch.arange(num_pages * PAGE_SIZE)
    full_to_swa_map = swa_page_of[full_slot // PAGE_SIZE] * PAGE_SIZE + full_slot % PAGE_SIZE
    full_to_swa_map[:PAGE_SIZE] = 0
    keep = max(WINDOW, PAGE_SIZE)
    frontier = torch.clamp(seq - keep, min=0) // PAGE_SIZE * PAGE_SIZE
    released = torch.clamp(frontier - PAGE_SIZE, min=0)
    tombstoned = slots[pos < released[:, None]]
    full_to_swa_map[tombstoned] = 0
    return _Decode(req_to_token, rows, seq, released, full_to_swa_map, num_pages)


def _alloc_decode(batch: int, device: torch.device) -> Case:
    gen = _gen("alloc_decode", batch)
    seq = torch.randint(1536, 2561, (batch,), generator=gen)  # counts the new token
    perm = torch.randperm(2 * batch, generator=gen) + 1
    last_loc = perm[:batch] * PAGE_SIZE + (seq - 2) % PAGE_SIZE
    free_pages = perm[batch:]
    new_pages = int(((seq - 1) % PAGE_SIZE == 0).sum())
    nbytes = I64 * (2 * batch + new_pages + batch)
    return Case(
        "alloc_decode",
        batch,
        alloc_decode,
        alloc_decode_reference,
        (seq.to(device), last_loc.to(device), free_pages.to(device), PAGE_SIZE),
        nbytes,
        {"num_new_pages": new_pages},
    )


def _slots_to_pages(batch: int, device: torch.device) -> Case:
    d = _decode_step(batch, _gen("slots_to_pages", batch))
    pos = torch.arange(MAX_CONTEXT)
    rows = d.req_to_token[d.req_pool_indices]
    slots = rows[pos < d.seq_lens[:, None]].to(torch.int64)  # every slot of every request
    nbytes = I64 * (slots.numel() + int(_cdiv(d.seq_lens, PAGE_SIZE).sum()))
    return Case(
        "slots_to_pages",
        batch,
        slots_to_pages,
        slots_to_pages_reference,
        (slots.to(device), PAGE_SIZE, d.num_pages),
        nbytes,
    )


def _swa_release(batch: int, device: torch.device) -> Case:
    # NOTE: swa_release tombstones the map, but the elements a call reads and writes depend
    # only on seq_lens and released_lens, which it does not mutate: repeated calls cost the same.
    d = _decode_step(batch, _gen("swa_release", batch))
    keep = max(WINDOW, PAGE_SIZE)
    frontier = torch.clamp(d.seq_lens - keep, min=0) // PAGE_SIZE * PAGE_SIZE
    pages = int(((torch.maximum(frontier, d.released_lens) - d.released_lens) // PAGE_SIZE).sum())
    # per request: row, seq, released in, new released out; per page: req_to_token entry and
    # map entry in, the page's map entries zeroed, the SWA page out
    nbytes = 4 * I64 * batch + pages * (I32 + I64 + PAGE_SIZE * I64 + I64)
    args = (d.req_to_token, d.req_pool_indices, d.seq_lens, d.released_lens, d.full_to_swa_map)
    return Case(
        "swa_release",
        batch,
        swa_release,
        swa_release_reference,
        (*(t.to(device) for t in args), WINDOW, PAGE_SIZE),
        nbytes,
        {"num_freed": pages},
    )


def _page_table(batch: int, device: torch.device, swa: bool) -> Case:
    job = "page_table_swa" if swa else "page_table"
    d = _decode_step(batch, _gen(job, batch))
    if swa:  # the decode query sits at seq - 1 and attends to the WINDOW positions before it
        kv_starts = torch.clamp(d.seq_lens - 1 - WINDOW, min=0)
    else:
        kv_starts = torch.zeros_like(d.seq_lens)
    pages = int((_cdiv(d.seq_lens, PAGE_SIZE) - kv_starts // PAGE_SIZE).sum())
    # per request: row, start, seq in, indptr and last_page_len out; per page: req_to_token
    # entry (and map entry) in, page id out
    nbytes = 3 * I64 * batch + 2 * I32 * batch + pages * (I32 + I32 + (I64 if swa else 0))
    args = (d.req_to_token, d.req_pool_indices, kv_starts, d.seq_lens)
    kwargs: dict[str, object] = {"num_pages": pages}
    if swa:
        kwargs["full_to_swa_map"] = d.full_to_swa_map.to(device)
    return Case(
        job,
        batch,
        page_table,
        page_table_reference,
        (*(t.to(device) for t in args), PAGE_SIZE),
        nbytes,
        kwargs,
    )


# -- page copies ---------------------------------------------------------------------------


def _random_pool(
    shape: tuple[int, ...], kv: KVShape, device: torch.device, pin: bool
) -> torch.Tensor:
    """A pool buffer of random bits (content does not change a copy's cost)."""
    int_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        torch.empty((), dtype=kv.dtype).itemsize
    ]
    buf = torch.empty(shape, dtype=int_dtype, device=device, pin_memory=pin)
    return buf.random_().view(kv.dtype)


def _page_copy(
    batch: int, device: torch.device, direction: str, kv: KVShape, host: torch.device
) -> Case:
    """``batch`` pages between a layer-first device pool and a page-first host pool.

    ``d2d``: within the device pool (distinct pages); ``backup``: device -> host;
    ``load``: host -> device. ``host`` is pinned when ``device`` is CUDA and ``host`` is CPU.
    """
    gen = _gen(f"page_copy_{direction}", batch)
    chunks, num_pages = kv.num_layers * 2, 2 * batch + 1
    dev_buf = _random_pool((chunks, num_pages, kv.chunk_elems), kv, device, pin=False)
    dev_pool = dev_buf.transpose(0, 1)
    pin = device.type == "cuda" and host.type == "cpu"
    if direction == "d2d":
        src, dst, src_buf, dst_buf = dev_pool, dev_pool, dev_buf, dev_buf
    else:
        host_buf = _random_pool((num_pages, chunks, kv.chunk_elems), kv, host, pin=pin)
        if direction == "backup":
            src, dst, src_buf, dst_buf = dev_pool, host_buf, dev_buf, host_buf
        else:
            src, dst, src_buf, dst_buf = host_buf, dev_pool, host_buf, dev_buf
    perm = torch.randperm(num_pages, generator=gen)
    src_pages, dst_pages = perm[:batch].to(device), perm[batch : 2 * batch].to(device)
    # The same bytes as one contiguous run; d2d copies the pool's first half onto its second.
    n = batch * chunks * kv.chunk_elems
    flat_src, flat_dst = src_buf.reshape(-1), dst_buf.reshape(-1)
    if direction == "d2d":
        flat_src, flat_dst = flat_src[:n], flat_dst[n : 2 * n]
    else:
        flat_src, flat_dst = flat_src[:n], flat_dst[:n]

    def baseline() -> torch.Tensor:
        return flat_dst.copy_(flat_src, non_blocking=True)

    return Case(
        f"page_copy_{direction}",
        batch,
        page_copy,
        page_copy_reference,
        (src, dst, src_pages, dst_pages),
        2 * batch * kv.page_bytes,
        baseline=baseline,
    )


JOBS = (
    "alloc_extend",
    "alloc_decode",
    "slots_to_pages",
    "full_to_swa",
    "swa_release",
    "page_table",
    "page_table_swa",
    "write_req_to_token",
    "page_copy_d2d",
    "page_copy_backup",
    "page_copy_load",
)


def build_case(
    job: str,
    batch: int,
    device: torch.device | str = "cpu",
    *,
    kv: KVShape = CPU_KV,
    host: torch.device | str = "cpu",
) -> Case:
    """Inputs of one call of ``job`` for ``batch`` requests (or pages, for page copies)."""
    device, host = torch.device(device), torch.device(host)
    if job.startswith("page_copy_"):
        return _page_copy(batch, device, job.removeprefix("page_copy_"), kv, host)
    builders: dict[str, Callable[[int, torch.device], Case]] = {
        "alloc_extend": _alloc_extend,
        "alloc_decode": _alloc_decode,
        "slots_to_pages": _slots_to_pages,
        "full_to_swa": _full_to_swa,
        "swa_release": _swa_release,
        "page_table": lambda b, d: _page_table(b, d, swa=False),
        "page_table_swa": lambda b, d: _page_table(b, d, swa=True),
        "write_req_to_token": _write_req_to_token,
    }
    if job not in builders:
        raise ValueError(f"job must be one of {JOBS}, got {job!r}")
    return builders[job](batch, device)
