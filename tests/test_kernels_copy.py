"""page_copy: Triton kernel vs torch reference, bit for bit, across pool layouts."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import DEVICE, POISON, poisoned

from hybridkv.kernels.page_copy import page_copy, page_copy_reference

# NOTE: the package re-exports the function under the module's name; fetch the module itself.
page_copy_mod = importlib.import_module("hybridkv.kernels.page_copy")

NUM_LAYERS, HEADS, DIM = 3, 2, 4
CHUNKS = NUM_LAYERS * 2  # K and V of every layer
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
PAGE_SIZES = [1, 4, 16, 64]
NUM_COPIES = [0, 1, 7, 37]
INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as same-size integers, so NaN payloads compare exactly."""
    return t.view(INT_OF_SIZE[t.element_size()])


def as_pages(buf: torch.Tensor, layout: str) -> torch.Tensor:
    """The ``[num_pages, num_chunks, chunk_elems]`` view of a pool buffer."""
    return buf.transpose(0, 1) if layout == "layer_first" else buf


def pool_shape(layout: str, num_pages: int, chunk_elems: int) -> tuple[int, int, int]:
    if layout == "layer_first":
        return (CHUNKS, num_pages, chunk_elems)
    return (num_pages, CHUNKS, chunk_elems)


def random_pool(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A buffer of uniformly random bit patterns (NaNs, infs and subnormals included)."""
    int_dtype = INT_OF_SIZE[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(int_dtype)
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(info.min, info.max, (n,), dtype=int_dtype, generator=gen)
    return raw.view(dtype).reshape(shape).to(DEVICE)


def poisoned_pool(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    int_dtype = INT_OF_SIZE[torch.empty((), dtype=dtype).element_size()]
    n = 1
    for s in shape:
        n *= s
    return poisoned(n, int_dtype).view(dtype).reshape(shape)


def distinct_pages(n: int, num_pages: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(num_pages, generator=gen)[:n].to(DEVICE)


def check_copy(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
    backend: str = "triton",
) -> None:
    """Run page_copy into ``dst`` and compare with the reference run on a clone of ``dst``.

    When ``src`` is ``dst`` (a same-pool copy) the reference reads from the clone too.
    """
    expected = dst.clone()
    ref_src = expected if src is dst else src
    page_copy_reference(ref_src, expected, src_pages, dst_pages)
    before = dst.clone()
    page_copy(src, dst, src_pages, dst_pages, backend=backend)
    assert torch.equal(bits(dst), bits(expected))
    # Independent of the reference: copied pages hold src's bits, the rest did not move.
    assert torch.equal(bits(dst[dst_pages]), bits(before if src is dst else src)[src_pages])
    untouched = torch.ones(dst.shape[0], dtype=torch.bool, device=dst.device)
    untouched[dst_pages] = False
    assert torch.equal(bits(dst[untouched]), bits(before[untouched]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("num_copies", NUM_COPIES)
@pytest.mark.parametrize(
    "src_layout, dst_layout", [("layer_first", "page_first"), ("page_first", "layer_first")]
)
def test_copy_between_layouts(dtype, page_size, num_copies, src_layout, dst_layout):
    """Pages copied across layouts into a poisoned pool match the reference; others stay poison."""
    gen = torch.Generator().manual_seed(page_size * 1000 + num_copies)
    chunk = page_size * HEADS * DIM
    src_pages_n, dst_pages_n = 41, 53
    src = as_pages(random_pool(pool_shape(src_layout, src_pages_n, chunk), dtype, gen), src_layout)
    dst = as_pages(poisoned_pool(pool_shape(dst_layout, dst_pages_n, chunk), dtype), dst_layout)
    src_pages = distinct_pages(num_copies, src_pages_n, gen)
    dst_pages = distinct_pages(num_copies, dst_pages_n, gen)
    check_copy(src, dst, src_pages, dst_pages)
    untouched = torch.ones(dst_pages_n, dtype=torch.bool, device=DEVICE)
    untouched[dst_pages] = False
    assert bool((bits(dst[untouched]) == POISON).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("num_copies", NUM_COPIES[1:])
@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_copy_within_one_pool(dtype, page_size, num_copies, layout):
    """src is dst: pages move to distinct pages of the same pool; the others keep their bits."""
    gen = torch.Generator().manual_seed(page_size * 1000 + num_copies + 1)
    num_pages = 2 * max(NUM_COPIES) + 3
    pool = as_pages(
        random_pool(pool_shape(layout, num_pages, page_size * HEADS * DIM), dtype, gen), layout
    )
    pages = distinct_pages(2 * num_copies, num_pages, gen)
    check_copy(pool, pool, pages[:num_copies], pages[num_copies:])


def test_copy_between_layer_first_pools():
    """Two layer-first pools of different page counts: strides differ on both sides."""
    gen = torch.Generator().manual_seed(7)
    src = random_pool((CHUNKS, 19, 16 * HEADS * DIM), torch.bfloat16, gen).transpose(0, 1)
    dst = poisoned_pool((CHUNKS, 23, 16 * HEADS * DIM), torch.bfloat16).transpose(0, 1)
    check_copy(src, dst, distinct_pages(9, 19, gen), distinct_pages(9, 23, gen))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_payloads_survive(dtype):
    """Signalling and negative NaNs with payloads, infs and -0.0 keep their exact bits."""
    patterns = {
        torch.float32: [0x7F800001, 0x7FC00123, -0x003FFFFF, 0x7F800000, -(2**31), 1],
        torch.float16: [0x7C01, 0x7E42, -0x01FF, 0x7C00, -(2**15), 1],
        torch.bfloat16: [0x7F81, 0x7FC3, -0x003F, 0x7F80, -(2**15), 1],
    }[dtype]
    int_dtype = INT_OF_SIZE[torch.empty((), dtype=dtype).element_size()]
    row = torch.tensor(patterns, dtype=int_dtype).repeat(CHUNKS, 1)  # [chunks, 6]
    src = row.repeat(4, 1, 1).view(dtype).to(DEVICE)  # page-first [4, chunks, 6]
    dst = poisoned_pool((CHUNKS, 5, 6), dtype).transpose(0, 1)
    src_pages = torch.tensor([2, 0, 3], device=DEVICE)
    dst_pages = torch.tensor([4, 1, 0], device=DEVICE)
    check_copy(src, dst, src_pages, dst_pages)
    assert torch.equal(bits(dst[dst_pages]), bits(src[src_pages]))


def test_odd_chunks_and_offsets_copy_without_widening():
    """fp16 chunks of 3 elements at an odd storage offset stay int16 and still copy exactly."""
    gen = torch.Generator().manual_seed(11)
    src = random_pool((CHUNKS, 9, 4), torch.float16, gen)[:, :, 1:].transpose(0, 1)
    dst = poisoned_pool((9, CHUNKS, 4), torch.float16)[:, :, 1:]
    assert page_copy_mod._widest_int_views(src, dst)[0].dtype == torch.int16
    check_copy(src, dst, distinct_pages(5, 9, gen), distinct_pages(5, 9, gen))


def test_chunk_longer_than_block():
    """A chunk of several blocks with a ragged tail (fp16, 4097 elements) copies whole."""
    gen = torch.Generator().manual_seed(13)
    src = random_pool((5, 2, 4097), torch.float16, gen)
    dst = poisoned_pool((2, 6, 4097), torch.float16).transpose(0, 1)
    check_copy(src, dst, torch.tensor([4, 0], device=DEVICE), torch.tensor([1, 5], device=DEVICE))


def test_grid_stride_loops(monkeypatch):
    """With grid axes 1 and 2 capped at one program, each program loops over chunks and blocks."""
    monkeypatch.setattr(page_copy_mod, "_MAX_GRID_YZ", 1)
    gen = torch.Generator().manual_seed(17)
    src = random_pool((CHUNKS, 7, 2048), torch.float32, gen).transpose(0, 1)
    dst = poisoned_pool((7, CHUNKS, 2048), torch.float32)
    check_copy(src, dst, distinct_pages(3, 7, gen), distinct_pages(3, 7, gen))


def test_state_slots():
    """State slots as pages: [slots, layers, conv+ssm elems] fp32 snapshots copy slot to slot."""
    gen = torch.Generator().manual_seed(19)
    states = random_pool((12, 4, 3 * 5 + 7 * 2), torch.float32, gen)
    check_copy(
        states, states, torch.tensor([3, 8], device=DEVICE), torch.tensor([9, 1], device=DEVICE)
    )


def test_reference_matches_naive_loop():
    """The torch backend equals a page-by-page Python loop (anchors the reference itself)."""
    gen = torch.Generator().manual_seed(23)
    src = random_pool((CHUNKS, 10, 32), torch.bfloat16, gen).transpose(0, 1)
    dst = poisoned_pool((10, CHUNKS, 32), torch.bfloat16)
    src_pages, dst_pages = distinct_pages(6, 10, gen), distinct_pages(6, 10, gen)
    expected = dst.clone()
    for s, d in zip(src_pages.tolist(), dst_pages.tolist(), strict=True):
        expected[d] = src[s]
    page_copy(src, dst, src_pages, dst_pages, backend="torch")
    assert torch.equal(bits(dst), bits(expected))


def _bad_inputs() -> list[tuple[str, dict]]:
    pool = torch.zeros(4, 2, 8, device=DEVICE)
    pages = torch.tensor([1, 2], device=DEVICE)
    ok = dict(src=pool, dst=pool.clone(), src_pages=pages, dst_pages=pages.flip(0))
    return [
        ("src", dict(ok, src=[1, 2])),
        ("src", dict(ok, src=pool[0])),
        ("src", dict(ok, src=torch.zeros(4, 2, 8, dtype=torch.complex64, device=DEVICE))),
        ("src", dict(ok, src=torch.zeros(4, 8, 2, device=DEVICE).transpose(1, 2))),
        ("dst", dict(ok, dst=torch.zeros(4, 2, 8, dtype=torch.float16, device=DEVICE))),
        ("dst", dict(ok, dst=torch.zeros(4, 2, 9, device=DEVICE))),
        ("dst", dict(ok, dst=torch.zeros(4, 2, 8, device="meta"))),
        ("src_pages", dict(ok, src_pages=pages.int())),
        ("src_pages", dict(ok, src_pages=pages[None])),
        ("src_pages", dict(ok, src_pages=torch.tensor([1, 4], device=DEVICE))),
        ("src_pages", dict(ok, src_pages=torch.tensor([-1, 0], device=DEVICE))),
        ("dst_pages", dict(ok, dst_pages=torch.tensor([1, 2, 3], device=DEVICE))),
        ("dst_pages", dict(ok, dst_pages=torch.tensor([0, 9], device=DEVICE))),
        ("dst_pages", dict(ok, dst_pages=torch.arange(4, device=DEVICE)[::2])),
    ]


@pytest.mark.parametrize("name, kwargs", _bad_inputs())
def test_bad_input_raises_naming_the_argument(name, kwargs):
    """Each malformed argument is a ValueError that names it, and dst is left as it was."""
    dst = kwargs["dst"]
    before = dst.clone() if isinstance(dst, torch.Tensor) and dst.device.type != "meta" else None
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        page_copy(**kwargs)
    if before is not None:
        assert torch.equal(dst, before)


def test_bad_backend_raises():
    """An unknown backend is a ValueError naming backend."""
    pool = torch.zeros(4, 2, 8, device=DEVICE)
    pages = torch.tensor([1], device=DEVICE)
    with pytest.raises(ValueError, match="backend"):
        page_copy(pool, pool, pages, pages + 1, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_and_pinned_host_both_ways(dtype):
    """CUDA layer-first pool <-> pinned page-first host pool through UVA; pageable host refused."""
    gen = torch.Generator().manual_seed(29)
    chunk = 16 * HEADS * DIM
    device = random_pool((CHUNKS, 33, chunk), dtype, gen).cuda().transpose(0, 1)
    host = random_pool((40, CHUNKS, chunk), dtype, gen).cpu().pin_memory()
    dev_pages = distinct_pages(17, 33, gen).cuda()
    host_pages = distinct_pages(17, 40, gen).cuda()
    for src, dst, sp, dp in (
        (device, host, dev_pages, host_pages),
        (host, device, host_pages, dev_pages),
    ):
        expected = dst.clone()
        page_copy_reference(src, expected, sp, dp)
        page_copy(src, dst, sp, dp)  # backend=None: Triton for CUDA + pinned host
        torch.cuda.synchronize()
        assert torch.equal(bits(dst.cpu()), bits(expected.cpu()))
    pageable = torch.zeros(40, CHUNKS, chunk, dtype=dtype)
    with pytest.raises(ValueError, match="dst"):
        page_copy(device, pageable, dev_pages, host_pages)
