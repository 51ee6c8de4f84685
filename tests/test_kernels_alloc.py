"""Allocation kernels (alloc_extend, alloc_decode, slots_to_pages, full_to_swa) vs references."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import (
    DEVICE,
    POISON,
    assert_exact,
    poisoned_empty,
    random_free_pages,
    seeded,
)

from hybridkv.kernels.alloc_decode import alloc_decode
from hybridkv.kernels.alloc_extend import alloc_extend
from hybridkv.kernels.free import slots_to_pages
from hybridkv.kernels.full_to_swa import full_to_swa

PAGE_SIZES = [1, 4, 16, 64]
BATCHES = [0, 1, 7, 300]


def _t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def _randint(low: int, high: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(low, high, (n,), generator=gen, dtype=torch.int64)


def _run_both(fn: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
    """Run ``fn`` on Triton (outputs poisoned) first, then on torch."""
    with poisoned_empty():
        got = fn(*args, backend="triton")
    return got, fn(*args, backend="torch")


def _pages_for(needed: int, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``free_pages``: exactly ``needed`` pages plus 0-3 spare ones, shuffled; and ``batch``
    other pages for the requests' ``last_loc`` (disjoint from them)."""
    n = needed + int(_randint(0, 4, 1, gen))
    num_pages = n + batch + 1 + int(_randint(0, 50, 1, gen))
    pages = random_free_pages(n + batch, num_pages, gen)
    return pages[:n], pages[n:]


# --- alloc_extend ----------------------------------------------------------------------------

EXTEND_CASES = [
    (ps, batch, prefix, extend)
    for ps in PAGE_SIZES
    for batch in BATCHES
    for prefix in ("zero", "aligned", "mid")
    for extend in ("random", "empty", "to_boundary")
    if not (ps == 1 and prefix == "mid")
]


def _extend_inputs(
    ps: int, batch: int, prefix_kind: str, extend_kind: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (prefix_lens, seq_lens, last_loc, free_pages), lengths up to ~6 pages."""
    pages = _randint(0, 3, batch, gen) * ps
    if prefix_kind == "zero":
        prefix = torch.zeros(batch, dtype=torch.int64)
    elif prefix_kind == "aligned":
        prefix = pages
    else:
        prefix = pages + _randint(1, ps, batch, gen)
    if extend_kind == "random":
        seq = prefix + _randint(0, 3 * ps + 1, batch, gen)
    elif extend_kind == "empty":
        seq = prefix.clone()
    else:
        seq = (prefix + ps - 1) // ps * ps + _randint(0, 3, batch, gen) * ps
    needed = int(((seq + ps - 1) // ps - (prefix + ps - 1) // ps).sum())
    free_pages, last_pages = _pages_for(needed, batch, gen)
    prefix, seq = prefix.to(DEVICE), seq.to(DEVICE)
    return prefix, seq, last_pages * ps + (prefix - 1) % ps, free_pages


@pytest.mark.parametrize("ps,batch,prefix,extend", EXTEND_CASES)
def test_alloc_extend_matches_reference(ps: int, batch: int, prefix: str, extend: str) -> None:
    """alloc_extend: Triton equals the reference on random batches of every shape."""
    args = _extend_inputs(ps, batch, prefix, extend, seeded("extend", ps, batch, prefix, extend))
    (got, got_n), (want, want_n) = _run_both(alloc_extend, *args, ps)
    assert_exact(got, want)
    assert got_n == want_n
    prefix_lens, seq_lens, last_loc, free_pages = args
    assert got.numel() == int((seq_lens - prefix_lens).sum())
    # Slots are distinct; their pages are last_loc pages or exactly the front of free_pages.
    assert got.unique().numel() == got.numel()
    pages, taken = set((got // ps).tolist()), set(free_pages[:got_n].tolist())
    assert taken <= pages and pages - taken <= set((last_loc // ps).tolist())


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_alloc_extend_long_requests(ps: int) -> None:
    """alloc_extend: extends longer than the kernel's 256-token block loop more than once."""
    gen = seeded("extend-long", ps)
    prefix = _randint(0, 3 * ps, 4, gen)
    seq = prefix + torch.tensor([257, 0, 512, 513])
    needed = int(((seq + ps - 1) // ps - (prefix + ps - 1) // ps).sum())
    free_pages, last_pages = _pages_for(needed, 4, gen)
    prefix, seq = prefix.to(DEVICE), seq.to(DEVICE)
    args = prefix, seq, last_pages * ps + (prefix - 1) % ps, free_pages
    (got, got_n), (want, want_n) = _run_both(alloc_extend, *args, ps)
    assert_exact(got, want)
    assert got_n == want_n


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_alloc_extend_hand_single(backend: str) -> None:
    """alloc_extend: page 4, prefix 6, seq 13 fills the last page then takes two new pages."""
    out, n = alloc_extend(_t([6]), _t([13]), _t([4 * 5 + 1]), _t([9, 3, 7]), 4, backend=backend)
    assert out.tolist() == [22, 23, 36, 37, 38, 39, 12]
    assert n == 2


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_alloc_extend_hand_batch(backend: str) -> None:
    """alloc_extend: fresh, empty, page-filling and mid-page requests take pages in order."""
    out, n = alloc_extend(
        _t([0, 4, 3, 2]),
        _t([5, 4, 4, 9]),
        _t([POISON, 4 * 2 + 3, 4 * 8 + 2, 4 * 6 + 1]),
        _t([10, 11, 12, 13, 14]),
        4,
        backend=backend,
    )
    assert out.tolist() == [40, 41, 42, 43, 44, 35, 26, 27, 48, 49, 50, 51, 52]
    assert n == 4


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_alloc_extend_page_size_one(backend: str) -> None:
    """alloc_extend: with page size 1 every token is a new page, last_loc is ignored."""
    out, n = alloc_extend(
        _t([2, 0]), _t([4, 1]), _t([-5, -5]), _t([7, 3, 9, 8]), 1, backend=backend
    )
    assert out.tolist() == [7, 3, 9]
    assert n == 3


# --- alloc_decode ----------------------------------------------------------------------------

DECODE_CASES = [
    (ps, batch, kind)
    for ps in PAGE_SIZES
    for batch in BATCHES
    for kind in ("random", "boundary", "in_page")
    if not (ps == 1 and kind == "in_page")
]


def _decode_inputs(
    ps: int, batch: int, kind: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (seq_lens, last_loc, free_pages), lengths up to ~3 pages."""
    if kind == "random":
        seq = _randint(1, 3 * ps + 1, batch, gen)
    elif kind == "boundary":
        seq = _randint(0, 3, batch, gen) * ps + 1
    else:
        seq = _randint(0, 3, batch, gen) * ps + _randint(2, ps + 1, batch, gen)
    needed = int(((seq - 1) % ps == 0).sum())
    free_pages, last_pages = _pages_for(needed, batch, gen)
    seq = seq.to(DEVICE)
    return seq, last_pages * ps + (seq - 2) % ps, free_pages


@pytest.mark.parametrize("ps,batch,kind", DECODE_CASES)
def test_alloc_decode_matches_reference(ps: int, batch: int, kind: str) -> None:
    """alloc_decode: Triton equals the reference on random batches of every shape."""
    args = _decode_inputs(ps, batch, kind, seeded("decode", ps, batch, kind))
    (got, got_n), (want, want_n) = _run_both(alloc_decode, *args, ps)
    assert_exact(got, want)
    assert got_n == want_n
    seq_lens, last_loc, free_pages = args
    new = (seq_lens - 1) % ps == 0
    assert torch.equal(got[~new], last_loc[~new] + 1)
    assert torch.equal(got[new], free_pages[:got_n] * ps)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_alloc_decode_hand(backend: str) -> None:
    """alloc_decode: page 4; the first token, two page starts and two in-page tokens."""
    out, n = alloc_decode(
        _t([1, 5, 7, 4, 9]),
        _t([POISON, 4 * 3 + 3, 4 * 2 + 1, 4 * 7 + 2, 4 * 1 + 3]),
        _t([5, 6, 2, 99]),
        4,
        backend=backend,
    )
    assert out.tolist() == [20, 24, 10, 31, 8]
    assert n == 3


@pytest.mark.parametrize("ps", [1, 4, 16])
def test_decode_steps_equal_one_extend(ps: int) -> None:
    """alloc_decode step by step gives the slots of one alloc_extend over the same tokens."""
    gen = seeded("chain", ps)
    length = 2 * ps + 3
    free_pages = random_free_pages(length, length + 10, gen)
    want, want_n = alloc_extend(_t([0]), _t([length]), _t([0]), free_pages, ps, backend="triton")
    got, last, taken = [], _t([POISON]), 0
    for seq in range(1, length + 1):
        slot, n = alloc_decode(_t([seq]), last, free_pages[taken:], ps, backend="triton")
        got.append(int(slot))
        last, taken = slot, taken + n
    assert got == want.tolist()
    assert taken == want_n


# --- slots_to_pages (free) -------------------------------------------------------------------

FREE_CASES = [
    (ps, n, kind) for ps in PAGE_SIZES for n in BATCHES for kind in ("random", "clustered", "edges")
]
NUM_PAGES = 40


def _free_inputs(ps: int, n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Random slots of a NUM_PAGES pool: anywhere, from three pages, or on page edges."""
    if kind == "random":
        slots = _randint(0, NUM_PAGES * ps, n, gen)
    elif kind == "clustered":
        pages = torch.randperm(NUM_PAGES, generator=gen)[:3]
        slots = pages[_randint(0, 3, n, gen)] * ps + _randint(0, ps, n, gen)
    else:
        edge = torch.cat([torch.arange(NUM_PAGES) * ps, torch.arange(1, NUM_PAGES + 1) * ps - 1])
        slots = edge[_randint(0, edge.numel(), n, gen)]
    return slots.to(DEVICE)


@pytest.mark.parametrize("ps,n,kind", FREE_CASES)
def test_slots_to_pages_matches_reference(ps: int, n: int, kind: str) -> None:
    """slots_to_pages: Triton equals torch.unique(slots // page_size) on random slots."""
    slots = _free_inputs(ps, n, kind, seeded("free", ps, n, kind))
    got, want = _run_both(slots_to_pages, slots, ps, NUM_PAGES)
    assert_exact(got, want)
    assert bool((got[1:] > got[:-1]).all())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_slots_to_pages_hand(backend: str) -> None:
    """slots_to_pages: page 4; duplicates and unsorted slots give sorted distinct pages."""
    got = slots_to_pages(_t([13, 12, 40, 5, 13, 0, 43]), 4, 11, backend=backend)
    assert got.tolist() == [0, 1, 3, 10]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_slots_to_pages_empty(backend: str) -> None:
    """slots_to_pages: no slots give an empty int64 tensor."""
    got = slots_to_pages(_t([]), 16, 3, backend=backend)
    assert got.dtype == torch.int64 and got.shape == (0,)


# --- full_to_swa -----------------------------------------------------------------------------

SWA_CASES = [(ps, n) for ps in PAGE_SIZES for n in BATCHES]


@pytest.mark.parametrize("ps,n", SWA_CASES)
def test_full_to_swa_matches_reference(ps: int, n: int) -> None:
    """full_to_swa: Triton equals the reference gather, tombstones (0) included."""
    gen = seeded("swa", ps, n)
    size = NUM_PAGES * ps
    swa = torch.randperm(size, generator=gen) + 1
    swa[_randint(0, 10, size, gen) < 3] = 0
    swa[:ps] = 0
    full_slots = _randint(0, size, n, gen)
    if n:
        full_slots[0], full_slots[-1] = 0, size - 1
    got, want = _run_both(full_to_swa, full_slots.to(DEVICE), swa.to(DEVICE))
    assert_exact(got, want)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_full_to_swa_hand(backend: str) -> None:
    """full_to_swa: a five-slot map with two tombstones."""
    got = full_to_swa(_t([3, 1, 2, 4, 0]), _t([0, 5, 0, 7, 3]), backend=backend)
    assert got.tolist() == [7, 5, 0, 3, 0]


# --- bad input -------------------------------------------------------------------------------


def _extend_args() -> dict[str, Any]:
    return dict(
        prefix_lens=_t([6, 0]),
        seq_lens=_t([13, 3]),
        last_loc=_t([21, 0]),
        free_pages=_t([9, 3, 7]),
        page_size=4,
    )


def _decode_args() -> dict[str, Any]:
    return dict(seq_lens=_t([5, 7]), last_loc=_t([0, 9]), free_pages=_t([3]), page_size=4)


def _free_args() -> dict[str, Any]:
    return dict(slots=_t([13, 0, 5]), page_size=4, num_pages=11)


def _swa_args() -> dict[str, Any]:
    return dict(full_slots=_t([3, 1]), full_to_swa_map=_t([0, 5, 0, 7, 3]))


BAD_INPUTS = [
    # (kernel, args, argument to replace, bad value, name the error must contain)
    (alloc_extend, _extend_args, "prefix_lens", _t([6, 0]).int(), "prefix_lens"),
    (alloc_extend, _extend_args, "seq_lens", _t([13, 3]).float(), "seq_lens"),
    (alloc_extend, _extend_args, "last_loc", _t([21, 0])[None], "last_loc"),
    (alloc_extend, _extend_args, "free_pages", _t([9, 3, 7, 1])[::2], "free_pages"),
    (alloc_extend, _extend_args, "free_pages", [9, 3, 7], "free_pages"),
    (alloc_extend, _extend_args, "seq_lens", _t([13, 3, 4]), "seq_lens"),
    (alloc_extend, _extend_args, "last_loc", _t([21]), "last_loc"),
    (alloc_extend, _extend_args, "prefix_lens", _t([6, -1]), "prefix_lens"),
    (alloc_extend, _extend_args, "seq_lens", _t([5, 3]), "seq_lens"),
    (alloc_extend, _extend_args, "last_loc", _t([22, 0]), "last_loc"),
    (alloc_extend, _extend_args, "free_pages", _t([9, 3]), "free_pages"),
    (alloc_extend, _extend_args, "page_size", 0, "page_size"),
    (alloc_extend, _extend_args, "page_size", 4.0, "page_size"),
    (alloc_extend, _extend_args, "backend", "bogus", "backend"),
    (alloc_decode, _decode_args, "seq_lens", _t([5, 7]).int(), "seq_lens"),
    (alloc_decode, _decode_args, "last_loc", _t([0, 9]).float(), "last_loc"),
    (alloc_decode, _decode_args, "free_pages", _t([3])[None], "free_pages"),
    (alloc_decode, _decode_args, "seq_lens", _t([[5, 7]]), "seq_lens"),
    (alloc_decode, _decode_args, "last_loc", _t([0, 9, 1]), "last_loc"),
    (alloc_decode, _decode_args, "seq_lens", _t([0, 7]), "seq_lens"),
    (alloc_decode, _decode_args, "seq_lens", _t([-4, 7]), "seq_lens"),
    (alloc_decode, _decode_args, "last_loc", _t([0, 10]), "last_loc"),
    (alloc_decode, _decode_args, "free_pages", _t([]), "free_pages"),
    (alloc_decode, _decode_args, "page_size", -1, "page_size"),
    (alloc_decode, _decode_args, "page_size", True, "page_size"),
    (alloc_decode, _decode_args, "backend", "bogus", "backend"),
    (slots_to_pages, _free_args, "slots", _t([13, 0, 5]).int(), "slots"),
    (slots_to_pages, _free_args, "slots", _t([[13, 0, 5]]), "slots"),
    (slots_to_pages, _free_args, "slots", _t([13, -1, 5]), "slots"),
    (slots_to_pages, _free_args, "slots", _t([13, 44, 5]), "slots"),
    (slots_to_pages, _free_args, "page_size", 0, "page_size"),
    (slots_to_pages, _free_args, "num_pages", 0, "num_pages"),
    (slots_to_pages, _free_args, "num_pages", 11.0, "num_pages"),
    (slots_to_pages, _free_args, "backend", "bogus", "backend"),
    (full_to_swa, _swa_args, "full_slots", _t([3, 1]).int(), "full_slots"),
    (full_to_swa, _swa_args, "full_slots", _t([[3, 1]]), "full_slots"),
    (full_to_swa, _swa_args, "full_slots", _t([3, -1]), "full_slots"),
    (full_to_swa, _swa_args, "full_slots", _t([3, 5]), "full_slots"),
    (full_to_swa, _swa_args, "full_to_swa_map", _t([0, 5, 0, 7, 3]).int(), "full_to_swa_map"),
    (full_to_swa, _swa_args, "full_to_swa_map", _t([[0, 5, 0, 7, 3]]), "full_to_swa_map"),
    (full_to_swa, _swa_args, "backend", "bogus", "backend"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "fn,make_args,arg,value,name",
    BAD_INPUTS,
    ids=[f"{case[0].__name__}-{case[2]}-{i}" for i, case in enumerate(BAD_INPUTS)],
)
def test_bad_input_names_argument(
    fn: Callable[..., Any],
    make_args: Callable[[], dict[str, Any]],
    arg: str,
    value: Any,
    name: str,
    backend: str,
) -> None:
    """Each kernel raises a ValueError naming the bad argument, whatever the backend."""
    args = make_args() | {"backend": backend}
    fn(**args)  # the unmodified arguments are valid
    args[arg] = value
    with pytest.raises(ValueError, match=name):
        fn(**args)


def test_default_backend_is_triton_here() -> None:
    """backend=None runs Triton (GPU or interpreter) and agrees with the reference."""
    args = _extend_args()
    got, n = alloc_extend(**args)
    want, want_n = alloc_extend(**args, backend="torch")
    assert torch.equal(got, want) and n == want_n


def test_poisoned_empty_shows_unwritten_elements() -> None:
    """The poisoned_empty helper fills fresh buffers with POISON, so unwritten outputs fail."""
    with poisoned_empty():
        buf = torch.empty(3, dtype=torch.int64)
    assert buf.tolist() == [POISON] * 3
    with pytest.raises(AssertionError, match="never written"):
        assert_exact(buf, buf.clone())
