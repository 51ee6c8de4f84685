"""Allocators and pools: exact slots and free-list order, the full->SWA map, state machines
against a naive model, KV pool reads/writes and host backup/load."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from helpers import DEVICE
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from hybridkv import kernels
from hybridkv.allocator import HostPool, KVPool, PagedAllocator, SWAAllocator
from hybridkv.errors import CheckError

PAGE_SIZES = [1, 4, 16]
BACKENDS = ["torch", "triton"]
INT_OF_SIZE = {2: torch.int16, 4: torch.int32}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
HEADS, DIM = 2, 3  # odd on purpose: nothing may assume powers of two


def _t(values: list[int]) -> torch.Tensor:
    """int64 on the pool's device (slots, last_loc)."""
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def _h(values: list[int]) -> torch.Tensor:
    """int64 on the host (prefix_lens, seq_lens: the allocator decides without a sync)."""
    return torch.tensor(values, dtype=torch.int64)


def _free(alloc: PagedAllocator) -> list[int]:
    return alloc.free_pages_view().tolist()


def _slots(page: int, ps: int, start: int = 0, stop: int | None = None) -> list[int]:
    """Slots ``[start, stop)`` of ``page`` (the whole page by default)."""
    return list(range(page * ps + start, page * ps + (ps if stop is None else stop)))


def _extend(alloc, prefix: list[int], seq: list[int], last: list[int]) -> torch.Tensor | None:
    return alloc.alloc_extend(_h(prefix), _h(seq), _t(last))


def _decode(alloc, seq: list[int], last: list[int]) -> torch.Tensor | None:
    return alloc.alloc_decode(_h(seq), _t(last))


def _paired(slots: list[int], pairs: dict[int, int], ps: int) -> list[int]:
    """SWA slots of full ``slots`` when full page ``p`` pairs with SWA page ``pairs[p]``."""
    return [pairs[s // ps] * ps + s % ps for s in slots]


def _check_swa(alloc: SWAAllocator) -> None:
    """``check()`` plus the pairing it leaves implicit: a mapped full slot points at the same
    offset of an SWA page other than 0, and full and SWA pages pair one to one."""
    alloc.check()
    ps = alloc.page_size
    full = torch.nonzero(alloc.full_to_swa).flatten()
    swa = alloc.full_to_swa[full]
    assert torch.equal(swa % ps, full % ps), "a full slot maps to another in-page offset"
    assert bool((swa >= ps).all()), "a full slot maps into SWA page 0"
    pairs = set(zip((full // ps).tolist(), (swa // ps).tolist(), strict=True))
    assert len({f for f, _ in pairs}) == len(pairs), "a full page maps to two SWA pages"
    assert len({s for _, s in pairs}) == len(pairs), "an SWA page is mapped from two full pages"


def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _random_bits(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaN payloads, infs and -0.0 included)."""
    itype = INT_OF_SIZE[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(itype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=itype).view(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_OF_SIZE[t.element_size()])


# --- PagedAllocator: exact slots and free-list order -----------------------------------------


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_paged_fresh_pool(ps):
    """A fresh pool rounds down to whole pages and frees pages 1..N in order; page 0 is extra."""
    alloc = PagedAllocator(5 * ps + ps - 1, ps, DEVICE, "torch")
    assert _free(alloc) == [1, 2, 3, 4, 5]
    assert alloc.num_pages == 6 and alloc.num_slots == 6 * ps
    assert alloc.free_page_count == 5 and alloc.available == 5 * ps
    alloc.check()


def test_paged_bad_config():
    """A page size below 1 or a pool smaller than one page is a ValueError."""
    with pytest.raises(ValueError, match="page_size"):
        PagedAllocator(16, 0, DEVICE, "torch")
    with pytest.raises(ValueError, match="one page"):
        PagedAllocator(3, 4, DEVICE, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_exact_trace_page4(backend):
    """Page size 4, step by step: extend, mid-page extend, decodes, frees, LIFO reuse, short."""
    alloc = PagedAllocator(24, 4, DEVICE, backend)
    assert _extend(alloc, [0, 0], [3, 5], [-1, -1]).tolist() == [4, 5, 6, 8, 9, 10, 11, 12]
    assert _free(alloc) == [4, 5, 6]
    alloc.check()
    # A: positions 3..5 fill slot 7 of its page, then take page 4.
    assert _extend(alloc, [3], [6], [6]).tolist() == [7, 16, 17]
    assert _free(alloc) == [5, 6]
    alloc.check()
    # B position 5, A position 6: both mid-page, no page taken.
    assert _decode(alloc, [6, 7], [12, 17]).tolist() == [13, 18]
    assert _decode(alloc, [8], [18]).tolist() == [19]
    assert _free(alloc) == [5, 6]
    # A position 8 starts a page (page 5); B position 6 does not.
    assert _decode(alloc, [9, 7], [19, 13]).tolist() == [20, 14]
    assert _free(alloc) == [6]
    alloc.check()
    alloc.free(_t([8, 9, 10, 11, 12, 13, 14]))  # B: pages 2, 3
    assert _free(alloc) == [2, 3, 6]
    alloc.free(_t([20, 4, 17, 7, 5, 16, 18, 6, 19]))  # A, shuffled: pages 1, 4, 5
    assert _free(alloc) == [1, 4, 5, 2, 3, 6]
    alloc.check()
    # The pages freed last are handed out first.
    assert _extend(alloc, [0], [9], [-1]).tolist() == [4, 5, 6, 7, 16, 17, 18, 19, 20]
    assert _free(alloc) == [2, 3, 6]
    assert _extend(alloc, [0], [13], [-1]) is None
    assert _free(alloc) == [2, 3, 6] and alloc.available == 12
    alloc.check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_paged_extend_from_empty(ps, backend):
    """Prefix 0: each request takes whole pages from the front, in request order; 0 takes none."""
    alloc = PagedAllocator(8 * ps, ps, DEVICE, backend)
    got = _extend(alloc, [0, 0, 0, 0], [1, ps, 0, ps + 1], [-1, -1, -1, -1])
    assert got.dtype == torch.int64
    assert got.tolist() == [ps] + _slots(2, ps) + _slots(3, ps) + [4 * ps]
    assert _free(alloc) == [5, 6, 7, 8]
    assert alloc.available == 4 * ps
    alloc.check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", [4, 16])
def test_paged_extend_mid_page(ps, backend):
    """A mid-page prefix fills the rest of last_loc's page first, then takes whole pages."""
    alloc = PagedAllocator(8 * ps, ps, DEVICE, backend)
    a = _extend(alloc, [0], [ps + 1], [-1]).tolist()
    b = _extend(alloc, [0], [2], [-1]).tolist()
    assert a == _slots(1, ps) + [2 * ps] and b == [3 * ps, 3 * ps + 1]
    assert _free(alloc) == [4, 5, 6, 7, 8]
    # A to 3ps+2, B up to its page boundary, C new.
    got = _extend(alloc, [ps + 1, 2, 0], [3 * ps + 2, ps, 1], [a[-1], b[-1], -1])
    want_a = _slots(2, ps, 1) + _slots(4, ps) + [5 * ps, 5 * ps + 1]
    want_b = _slots(3, ps, 2)
    assert got.tolist() == want_a + want_b + [6 * ps]
    assert _free(alloc) == [7, 8]
    alloc.check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_paged_decode_on_and_off_boundaries(ps, backend):
    """A decode takes a page only when its position starts one (seq_len 1 included)."""
    alloc = PagedAllocator(8 * ps, ps, DEVICE, backend)
    a = _extend(alloc, [0], [ps], [-1]).tolist()  # page 1, full
    b = _extend(alloc, [0], [1], [-1]).tolist()  # page 2, one token
    got = _decode(alloc, [ps + 1, 2, 1], [a[-1], b[-1], -1]).tolist()
    if ps == 1:  # every position starts a page
        assert got == [3, 4, 5]
        assert _free(alloc) == [6, 7, 8]
    else:
        assert got == [3 * ps, 2 * ps + 1, 4 * ps]
        assert _free(alloc) == [5, 6, 7, 8]
    alloc.check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_paged_free_whole_pages_to_front(ps, backend):
    """free releases whole pages (one slot suffices), pushed ascending at the front; LIFO reuse."""
    alloc = PagedAllocator(6 * ps, ps, DEVICE, backend)
    a = _extend(alloc, [0], [2 * ps + 1], [-1])  # pages 1, 2, 3
    b = _extend(alloc, [0], [ps], [-1])  # page 4
    assert _free(alloc) == [5, 6]
    alloc.free(a.flip(0))
    assert _free(alloc) == [1, 2, 3, 5, 6]
    alloc.check()
    alloc.free(b[-1:])  # one slot of page 4 frees the whole page
    assert _free(alloc) == [4, 1, 2, 3, 5, 6]
    alloc.free(_t([]))
    assert _free(alloc) == [4, 1, 2, 3, 5, 6]
    alloc.check()
    assert _decode(alloc, [1], [-1]).tolist() == [4 * ps]
    assert _free(alloc) == [1, 2, 3, 5, 6]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_paged_free_group_one_call(ps, backend, monkeypatch):
    """free_group defers every free (nested groups too) into one slots_to_pages call at exit."""
    alloc = PagedAllocator(6 * ps, ps, DEVICE, backend)
    a, _, c = (_extend(alloc, [0], [ps], [-1]) for _ in range(3))  # pages 1, 2, 3
    calls = []
    real = kernels.slots_to_pages

    def spy(*args, **kwargs):
        calls.append(args[0].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "slots_to_pages", spy)
    with alloc.free_group():
        alloc.free(a)
        with alloc.free_group():
            alloc.free(c)
        assert _free(alloc) == [4, 5, 6] and calls == []
    # One batch, pushed ascending: separately, c would have gone in front of a.
    assert _free(alloc) == [1, 3, 4, 5, 6]
    assert calls == [a.tolist() + c.tolist()]
    with alloc.free_group():
        pass
    assert len(calls) == 1
    alloc.check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_paged_short_returns_none(ps, backend):
    """Short of pages: None and nothing taken; an exact fit succeeds; mid-page fills need none."""
    alloc = PagedAllocator(3 * ps, ps, DEVICE, backend)
    a = _extend(alloc, [0], [ps + 1], [-1]).tolist()  # pages 1, 2
    assert _free(alloc) == [3]
    assert _extend(alloc, [0, 0], [1, 1], [-1, -1]) is None
    assert _decode(alloc, [1, 1], [-1, -1]) is None
    assert _extend(alloc, [ps + 1], [3 * ps + 1], [a[-1]]) is None
    assert _free(alloc) == [3] and alloc.available == ps
    alloc.check()
    if ps > 1:  # the rest of A's page needs no new page, even with none left after
        assert _extend(alloc, [0], [ps], [-1]).tolist() == _slots(3, ps)
        assert _free(alloc) == [] and alloc.available == 0
        assert _decode(alloc, [1], [-1]) is None
        assert _decode(alloc, [ps + 2], [a[-1]]).tolist() == [a[-1] + 1]
    else:
        assert _extend(alloc, [2], [3], [a[-1]]).tolist() == [3]
        assert _free(alloc) == [] and _decode(alloc, [4], [3]) is None
    alloc.check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_paged_drain_never_hands_out_page0(ps, backend):
    """Draining the pool hands out every slot of pages 1..N exactly once and never page 0."""
    alloc = PagedAllocator(7 * ps, ps, DEVICE, backend)
    got = [_extend(alloc, [0, 0], [ps + 1, 2 * ps], [-1, -1])]
    last = int(got[0][ps])
    for seq in range(ps + 2, 2 * ps + 1):
        got.append(_decode(alloc, [seq], [last]))
        last = int(got[-1][0])
    got.append(_extend(alloc, [0], [3 * ps], [-1]))
    slots = torch.cat(got).tolist()
    assert sorted(slots) == list(range(ps, 8 * ps))
    assert _free(alloc) == [] and alloc.available == 0
    assert _extend(alloc, [0], [1], [-1]) is None and _decode(alloc, [1], [-1]) is None
    alloc.check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_empty_batch(backend):
    """A batch of no requests returns no slots and takes nothing."""
    alloc = PagedAllocator(16, 4, DEVICE, backend)
    assert _extend(alloc, [], [], []).tolist() == []
    assert _decode(alloc, [], []).tolist() == []
    assert _free(alloc) == [1, 2, 3, 4]
    alloc.check()


def test_paged_check_catches_corruption():
    """check() fails on a page freed twice and on page 0 in the free list."""
    alloc = PagedAllocator(16, 4, DEVICE, "torch")
    slots = _extend(alloc, [0], [8], [-1])
    alloc.free(slots[:1])
    alloc.free(slots[:1])
    with pytest.raises(CheckError, match="twice"):
        alloc.check()
    alloc = PagedAllocator(16, 4, DEVICE, "torch")
    _extend(alloc, [0], [4], [-1])
    alloc.free_pages(_t([0]))
    with pytest.raises(CheckError, match="bad free page"):
        alloc.check()


# --- SWAAllocator ----------------------------------------------------------------------------


def _swa(full_pages: int, swa_pages: int, ps: int, backend: str = "torch") -> SWAAllocator:
    return SWAAllocator(full_pages * ps, swa_pages * ps, ps, DEVICE, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_swa_extend_maps_every_new_slot(ps, backend):
    """Every new full slot maps to the same offset of its paired SWA page (mid-page too)."""
    alloc = _swa(8, 6, ps, backend)
    a = _extend(alloc, [0], [ps + 1], [-1]).tolist()  # full 1, 2 -> SWA 1, 2
    assert a == _slots(1, ps) + [2 * ps]
    alloc.free_swa(_t(a[:ps]))  # SWA page 1 back in front
    assert _free(alloc.swa) == [1, 3, 4, 5, 6]
    b = _extend(alloc, [0], [2 * ps], [-1]).tolist()  # full 3, 4 -> SWA 1, 3
    _check_swa(alloc)
    a2 = _extend(alloc, [ps + 1], [2 * ps + 2], [a[-1]]).tolist()
    assert a2 == _slots(2, ps, 1) + [5 * ps, 5 * ps + 1]
    pairs = {2: 2, 3: 1, 4: 3, 5: 4, 6: 5}
    assert alloc.full_to_swa[_t(b)].tolist() == _paired(b, pairs, ps)
    assert alloc.translate(_t(a + a2)).tolist() == [0] * ps + _paired([a[-1]] + a2, pairs, ps)
    assert _free(alloc.full) == list(range(6 if ps > 1 else 7, 9))
    assert _free(alloc.swa) == ([5, 6] if ps > 1 else [6])
    assert alloc.full_available == len(_free(alloc.full)) * ps
    assert alloc.swa_available == len(_free(alloc.swa)) * ps
    _check_swa(alloc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_swa_decode_maps_new_slot(ps, backend):
    """Decode maps its slot; at a page boundary a tombstoned last_loc is ignored."""
    alloc = _swa(6, 4, ps, backend)
    a = _extend(alloc, [0], [ps], [-1]).tolist()  # full 1 -> SWA 1
    b = _extend(alloc, [0], [1], [-1]).tolist()  # full 2 -> SWA 2
    alloc.free_swa(_t(a))  # A tombstoned; SWA free [1, 3, 4]
    got = _decode(alloc, [ps + 1, 2], [a[-1], b[-1]]).tolist()
    if ps == 1:
        assert got == [3, 4]
        pairs = {3: 1, 4: 3}
    else:
        assert got == [3 * ps, 2 * ps + 1]
        pairs = {3: 1, 2: 2}
    assert alloc.translate(_t(got)).tolist() == _paired(got, pairs, ps)
    assert _free(alloc.swa) == ([4] if ps == 1 else [3, 4])
    _check_swa(alloc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_swa_free_clears_map_and_frees_paired_pages(ps, backend):
    """free clears whole pages of the map and pushes their SWA pages in full-page order; a
    tombstoned page frees no SWA page (never page 0)."""
    alloc = _swa(6, 6, ps, backend)
    a = _extend(alloc, [0], [ps], [-1])  # full 1 -> SWA 1
    b = _extend(alloc, [0], [ps], [-1])  # full 2 -> SWA 2
    alloc.free(a)
    alloc.free_swa(b)
    assert _free(alloc.full) == [1, 3, 4, 5, 6] and _free(alloc.swa) == [2, 1, 3, 4, 5, 6]
    tail = max(1, ps - 1)
    c = _extend(alloc, [0], [ps + tail], [-1])  # full 1, 3 -> SWA 2, 1
    assert c.tolist() == _slots(1, ps) + _slots(3, ps, 0, tail)
    assert alloc.translate(c).tolist() == _paired(c.tolist(), {1: 2, 3: 1}, ps)
    _check_swa(alloc)
    alloc.free(c[-1:].repeat(3))  # one slot frees page 3 (and its SWA page 1) only
    assert _free(alloc.full) == [3, 4, 5, 6] and _free(alloc.swa) == [1, 3, 4, 5, 6]
    alloc.free(c[:ps])
    assert _free(alloc.full) == [1, 3, 4, 5, 6] and _free(alloc.swa) == [2, 1, 3, 4, 5, 6]
    assert not bool(alloc.full_to_swa.any())
    _check_swa(alloc)
    alloc.free(b)  # tombstoned: its full page comes back, no SWA page does
    assert _free(alloc.full) == [2, 1, 3, 4, 5, 6] and _free(alloc.swa) == [2, 1, 3, 4, 5, 6]
    _check_swa(alloc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_swa_free_swa_tombstones_whole_pages(ps, backend):
    """free_swa zeroes whole pages of the map and frees their SWA pages; the full KV stays."""
    alloc = _swa(5, 5, ps, backend)
    a = _extend(alloc, [0], [2 * ps + 1], [-1])  # full 1, 2, 3 -> SWA 1, 2, 3
    alloc.free_swa(_t([2 * ps, 2 * ps - 1]))  # one slot each of pages 2 and 1
    assert _free(alloc.swa) == [1, 2, 4, 5]
    assert _free(alloc.full) == [4, 5]
    assert alloc.translate(a).tolist() == [0] * (2 * ps) + [3 * ps]
    _check_swa(alloc)
    alloc.free_swa(a[: 2 * ps])  # already tombstoned: nothing changes, page 0 stays out
    alloc.free_swa(_t([]))
    assert _free(alloc.swa) == [1, 2, 4, 5] and _free(alloc.full) == [4, 5]
    _check_swa(alloc)
    alloc.free(a)
    assert _free(alloc.full) == [1, 2, 3, 4, 5] and _free(alloc.swa) == [3, 1, 2, 4, 5]
    _check_swa(alloc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", [4, 16])
def test_swa_alloc_refuses_to_continue_a_tombstoned_page(ps, backend):
    """Extending or decoding mid-page from a tombstoned last_loc would take SWA slots on the
    reserved page 0: ValueError naming last_loc, and neither pool changes."""
    alloc = _swa(6, 6, ps, backend)
    a = _extend(alloc, [0], [ps + 1], [-1])  # full 1, 2 -> SWA 1, 2; position ps mid-page
    alloc.free_swa(a)  # tombstoned
    before = (_free(alloc.full), _free(alloc.swa), alloc.full_to_swa.clone())
    with pytest.raises(ValueError, match="last_loc"):
        _extend(alloc, [ps + 1], [ps + 3], [int(a[-1])])
    with pytest.raises(ValueError, match="last_loc"):
        _decode(alloc, [ps + 2], [int(a[-1])])
    assert (_free(alloc.full), _free(alloc.swa)) == before[:2]
    assert torch.equal(alloc.full_to_swa, before[2])
    _check_swa(alloc)
    got = _extend(alloc, [2 * ps], [2 * ps + 1], [int(a[-1])])  # a new page: no SWA needed
    assert bool((alloc.translate(got) >= ps).all())
    _check_swa(alloc)


def test_swa_check_catches_a_corrupt_map():
    """check() raises CheckError on a map into a free SWA page and on page 0 mapped."""
    alloc = _swa(4, 4, 4)
    a = _extend(alloc, [0], [4], [-1])
    alloc.swa.free_pages(_t([1]))  # SWA page 1 free while full page 1 maps to it
    with pytest.raises(CheckError, match="free SWA page"):
        alloc.check()
    alloc = _swa(4, 4, 4)
    alloc.full_to_swa[2] = 5
    with pytest.raises(CheckError, match="page 0 maps"):
        alloc.check()
    del a


def test_checks_survive_python_o():
    """Allocator and manager checks raise CheckError under ``python -O`` (no bare asserts)."""
    code = textwrap.dedent(
        """
        import torch
        from hybridkv import CacheConfig, MemoryManager
        from hybridkv.allocator import PagedAllocator
        from hybridkv.errors import CheckError

        alloc = PagedAllocator(16, 4, "cpu", "torch")
        alloc.alloc_pages(1)
        alloc.free_pages(torch.tensor([0]))
        mm = MemoryManager(CacheConfig(num_layers=2, num_kv_heads=1, head_dim=4, page_size=4,
            full_tokens=64, swa_tokens=0, sliding_window=None, device="cpu", backend="torch"))
        mm.allocator.full.alloc_pages(1)  # a page leaked: in no one's hands
        for check in (alloc.check, mm.check):
            try:
                check()
            except CheckError as e:
                print("caught:", e)
        """
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-O", "-c", code]
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "caught: bad free page",
        "caught: full: pages [1] are lost or held twice",
    ], out.stderr


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_swa_adopt(ps):
    """adopt_swa moves a duplicate's SWA slots to the tombstoned keeper; freeing the duplicate
    then frees no SWA page, freeing the keeper does."""
    alloc = _swa(4, 4, ps)
    keep = _extend(alloc, [0], [ps], [-1])  # full 1 -> SWA 1
    alloc.free_swa(keep)
    dup = _extend(alloc, [0], [ps], [-1])  # full 2 -> SWA 1
    assert _free(alloc.swa) == [2, 3, 4]
    alloc.adopt_swa(keep, dup)
    assert alloc.translate(keep).tolist() == _slots(1, ps)
    assert alloc.translate(dup).tolist() == [0] * ps
    _check_swa(alloc)
    alloc.free(dup)
    assert _free(alloc.full) == [2, 3, 4] and _free(alloc.swa) == [2, 3, 4]
    _check_swa(alloc)
    alloc.free(keep)
    assert _free(alloc.full) == [1, 2, 3, 4] and _free(alloc.swa) == [1, 2, 3, 4]
    _check_swa(alloc)


SWA_WINDOWS = {  # window, and pages released of A (len 5ps) and B (len 3ps)
    "lt": (lambda ps: max(1, ps // 2), 4, 2),
    "eq": (lambda ps: ps, 4, 2),
    "gt": (lambda ps: 2 * ps + 1, 2, 0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", list(SWA_WINDOWS))
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_swa_release(ps, window, backend):
    """swa_release frees the SWA pages that slid out (request order, then position), tombstones
    them, returns the new released lengths and is idempotent."""
    win, na, nb = SWA_WINDOWS[window]
    alloc = _swa(12, 12, ps, backend)
    d = _extend(alloc, [0], [2 * ps], [-1])  # full 1, 2 -> SWA 1, 2
    alloc.free_swa(d[ps:])  # SWA free [2, 3, ...]
    a = _extend(alloc, [0], [5 * ps], [-1])  # full 3..7 -> SWA 2..6
    b = _extend(alloc, [0], [3 * ps], [-1])  # full 8..10 -> SWA 7..9
    pairs = {p: p - 1 for p in range(3, 11)}
    assert alloc.translate(torch.cat([a, b])).tolist() == _paired(
        a.tolist() + b.tolist(), pairs, ps
    )
    assert _free(alloc.swa) == [10, 11, 12]
    r2t = torch.zeros(2, 6 * ps, dtype=torch.int32, device=DEVICE)
    r2t[1, : a.numel()] = a.to(torch.int32)
    r2t[0, : b.numel()] = b.to(torch.int32)
    rows, seq = _t([1, 0]), _t([5 * ps, 3 * ps])
    new = alloc.swa_release(r2t, rows, seq, _t([0, 0]), win(ps))
    assert new.tolist() == [na * ps, nb * ps]
    freed = [p - 1 for p in range(3, 3 + na)] + [p - 1 for p in range(8, 8 + nb)]
    assert _free(alloc.swa) == freed + [10, 11, 12]
    assert _free(alloc.full) == [11, 12]
    swa_a, swa_b = alloc.translate(a).tolist(), alloc.translate(b).tolist()
    assert swa_a == [0] * (na * ps) + _paired(a.tolist()[na * ps :], pairs, ps)
    assert swa_b == [0] * (nb * ps) + _paired(b.tolist()[nb * ps :], pairs, ps)
    _check_swa(alloc)
    again = alloc.swa_release(r2t, rows, seq, new, win(ps))
    assert again.tolist() == new.tolist() and _free(alloc.swa) == freed + [10, 11, 12]
    _check_swa(alloc)
    alloc.free(a)
    kept = [p - 1 for p in range(3 + na, 8)]
    assert _free(alloc.full) == [3, 4, 5, 6, 7, 11, 12]
    assert _free(alloc.swa) == kept + freed + [10, 11, 12]
    _check_swa(alloc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_swa_short_returns_none(ps, backend):
    """None with both free lists and the map unchanged when either pool is short."""
    alloc = _swa(2, 4, ps, backend)  # full pool short
    _extend(alloc, [0], [ps + 1], [-1])
    before = alloc.full_to_swa.clone()
    assert _extend(alloc, [0], [1], [-1]) is None
    assert _decode(alloc, [1], [0]) is None
    assert _free(alloc.full) == [] and _free(alloc.swa) == [3, 4]
    assert torch.equal(alloc.full_to_swa, before)
    _check_swa(alloc)
    alloc = _swa(6, 3, ps, backend)  # SWA pool short
    a = _extend(alloc, [0], [ps + 1], [-1]).tolist()  # full 1, 2 -> SWA 1, 2
    b = _extend(alloc, [0], [ps], [-1]).tolist()  # full 3 -> SWA 3
    before = alloc.full_to_swa.clone()
    assert _extend(alloc, [0], [1], [-1]) is None
    assert _decode(alloc, [ps + 2, ps + 1], [a[-1], b[-1]]) is None
    assert _free(alloc.full) == [4, 5, 6] and _free(alloc.swa) == []
    assert torch.equal(alloc.full_to_swa, before)
    _check_swa(alloc)
    if ps > 1:  # a mid-page decode needs no page of either pool
        assert _decode(alloc, [ps + 2], [a[-1]]).tolist() == [a[-1] + 1]
        assert alloc.translate(_t([a[-1] + 1])).tolist() == [a[-1] + 1]
        _check_swa(alloc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_swa_free_group(ps, backend):
    """SWA free_group defers full and SWA frees (and map clears) to one batch at exit."""
    alloc = _swa(4, 4, ps, backend)
    a, _, c = (_extend(alloc, [0], [ps], [-1]) for _ in range(3))  # full k -> SWA k
    before = alloc.full_to_swa.clone()
    with alloc.free_group():
        alloc.free(a)
        with alloc.free_group():
            alloc.free(c)
        assert _free(alloc.full) == [4] and _free(alloc.swa) == [4]
        assert torch.equal(alloc.full_to_swa, before)
    assert _free(alloc.full) == [1, 3, 4] and _free(alloc.swa) == [1, 3, 4]
    assert alloc.translate(torch.cat([a, c])).tolist() == [0] * (2 * ps)
    _check_swa(alloc)


def test_swa_release_over_tombstoned_page():
    """Releasing a window that covers an already tombstoned page must not free SWA page 0."""
    ps = 4
    alloc = _swa(4, 4, ps)
    a = _extend(alloc, [0], [3 * ps], [-1])  # full 1, 2, 3 -> SWA 1, 2, 3
    alloc.free_swa(a[:ps])  # tombstone page 1 (SWA free [1, 4])
    r2t = a.to(torch.int32).view(1, -1).clone()
    new = alloc.swa_release(r2t, _t([0]), _t([3 * ps]), _t([0]), ps)
    assert new.tolist() == [2 * ps]
    assert _free(alloc.swa) == [2, 1, 4]
    _check_swa(alloc)


def test_swa_decode_first_token():
    """seq_len 1 with last_loc -1 takes a new page, as PagedAllocator.alloc_decode does."""
    alloc = _swa(4, 4, 4)
    assert _decode(alloc.full, [1], [-1]).tolist() == [4]
    alloc = _swa(4, 4, 4)
    assert _decode(alloc, [1], [-1]).tolist() == [4]
    _check_swa(alloc)


# --- state machines against a naive model ----------------------------------------------------


class PagedMachine(RuleBasedStateMachine):
    """PagedAllocator vs a model: per-request slot lists and the free list in exact order."""

    backend = "torch"

    @initialize(ps=st.sampled_from(PAGE_SIZES), pages=st.integers(1, 10))
    def setup(self, ps: int, pages: int) -> None:
        self.ps = ps
        self.num_pages = pages
        self.alloc = PagedAllocator(pages * ps, ps, DEVICE, self.backend)
        self.free = list(range(1, pages + 1))
        self.reqs: dict[int, list[int]] = {}
        self.next_rid = 0

    def _expect(self, batch: list[tuple[list[int], int]]) -> tuple[list[int], list[int]]:
        """Naively, position by position: the next slot of the page, or a new page's first."""
        out, taken = [], []
        for slots, add in batch:
            prev = slots[-1] if slots else None
            for pos in range(len(slots), len(slots) + add):
                if pos % self.ps == 0:
                    page = self.free[len(taken)] if len(taken) < len(self.free) else -1
                    taken.append(page)
                    prev = page * self.ps
                else:
                    prev += 1
                out.append(prev)
        return out, taken

    def _draw_batch(self, data: st.DataObject) -> list[int]:
        """Up to 3 live requests and up to 2 new ones (at least one request), shuffled."""
        live = sorted(self.reqs)
        chosen = data.draw(st.lists(st.sampled_from(live), unique=True, max_size=3)) if live else []
        fresh = data.draw(st.integers(0 if chosen else 1, 2))
        for _ in range(fresh):
            self.reqs[self.next_rid] = []
            chosen.append(self.next_rid)
            self.next_rid += 1
        return data.draw(st.permutations(chosen))

    def _apply(self, rids: list[int], adds: list[int], got: torch.Tensor | None) -> None:
        batch = [(self.reqs[r], n) for r, n in zip(rids, adds, strict=True)]
        want, taken = self._expect(batch)
        if len(taken) > len(self.free):
            assert got is None, "allocated past the free list"
        else:
            assert got is not None, "refused although the pages were there"
            assert got.tolist() == want
            self.free = self.free[len(taken) :]
            it = iter(want)
            for r, n in zip(rids, adds, strict=True):
                self.reqs[r] += [next(it) for _ in range(n)]
        for r in rids:
            if not self.reqs[r]:
                del self.reqs[r]

    @rule(data=st.data())
    def extend(self, data: st.DataObject) -> None:
        rids = self._draw_batch(data)
        adds = [data.draw(st.integers(0, 2 * self.ps + 1)) for _ in rids]
        slots = [self.reqs[r] for r in rids]
        prefix = [len(s) for s in slots]
        seq = [p + n for p, n in zip(prefix, adds, strict=True)]
        last = [s[-1] if s else -1 for s in slots]
        self._apply(rids, adds, _extend(self.alloc, prefix, seq, last))

    @rule(data=st.data())
    def decode(self, data: st.DataObject) -> None:
        rids = self._draw_batch(data)
        slots = [self.reqs[r] for r in rids]
        seq = [len(s) + 1 for s in slots]
        last = [s[-1] if s else -1 for s in slots]
        self._apply(rids, [1] * len(rids), _decode(self.alloc, seq, last))

    def _release(self, rids: list[int]) -> list[int]:
        pages = sorted({s // self.ps for r in rids for s in self.reqs.pop(r)})
        self.free = pages + self.free
        return pages

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def free_one(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        slots = data.draw(st.permutations(self.reqs[rid]))
        self.alloc.free(_t(slots + slots[:1]))  # any order, duplicates allowed
        self._release([rid])

    @precondition(lambda self: len(self.reqs) >= 2)
    @rule(data=st.data())
    def free_grouped(self, data: st.DataObject) -> None:
        rids = data.draw(st.lists(st.sampled_from(sorted(self.reqs)), min_size=2, unique=True))
        before = _free(self.alloc)
        with self.alloc.free_group():
            for r in rids:
                self.alloc.free(_t(self.reqs[r]))
            assert _free(self.alloc) == before
        self._release(rids)

    @invariant()
    def consistent(self) -> None:
        self.alloc.check()
        assert _free(self.alloc) == self.free
        assert self.alloc.available == len(self.free) * self.ps
        slots = [s for v in self.reqs.values() for s in v]
        assert len(set(slots)) == len(slots), "a slot handed out twice"
        owned = [{s // self.ps for s in v} for v in self.reqs.values()]
        held = [p for pages in owned for p in pages] + self.free
        assert sorted(held) == list(range(1, self.num_pages + 1)), "a page lost or in two places"


class SWAMachine(RuleBasedStateMachine):
    """SWAAllocator vs a model: per-request full slots, full page -> SWA page (0: tombstone),
    released lengths, and both free lists in exact order; the whole map is rebuilt and compared."""

    backend = "torch"

    @initialize(
        ps=st.sampled_from(PAGE_SIZES),
        full_pages=st.integers(1, 12),
        swa_pages=st.integers(1, 8),
        window=st.integers(1, 40),
    )
    def setup(self, ps: int, full_pages: int, swa_pages: int, window: int) -> None:
        self.ps = ps
        self.window = window
        self.alloc = _swa(full_pages, swa_pages, ps, self.backend)
        self.full_free = list(range(1, full_pages + 1))
        self.swa_free = list(range(1, swa_pages + 1))
        self.reqs: dict[int, list[int]] = {}
        self.pair: dict[int, int] = {}
        self.released: dict[int, int] = {}
        self.next_rid = 0

    _draw_batch = PagedMachine._draw_batch

    def _apply(self, rids: list[int], adds: list[int], got: torch.Tensor | None) -> None:
        ps, want, k = self.ps, [], 0
        new_pairs = {}
        for r, n in zip(rids, adds, strict=True):
            slots = self.reqs[r]
            prev = slots[-1] if slots else None
            for pos in range(len(slots), len(slots) + n):
                if pos % ps == 0:
                    page = -1  # short: the batch must be refused
                    if k < min(len(self.full_free), len(self.swa_free)):
                        page = self.full_free[k]
                        new_pairs[page] = self.swa_free[k]
                    prev = page * ps
                    k += 1
                else:
                    prev += 1
                want.append(prev)
        if k > min(len(self.full_free), len(self.swa_free)):
            assert got is None, "allocated past a free list"
        else:
            assert got is not None, "refused although both pools had the pages"
            assert got.tolist() == want
            self.full_free, self.swa_free = self.full_free[k:], self.swa_free[k:]
            self.pair |= new_pairs
            it = iter(want)
            for r, n in zip(rids, adds, strict=True):
                self.reqs[r] += [next(it) for _ in range(n)]
        for r in rids:
            self.released.setdefault(r, 0)
            if not self.reqs[r]:
                del self.reqs[r], self.released[r]

    @rule(data=st.data())
    def extend(self, data: st.DataObject) -> None:
        rids = self._draw_batch(data)
        adds = [data.draw(st.integers(0, 2 * self.ps + 1)) for _ in rids]
        slots = [self.reqs[r] for r in rids]
        prefix = [len(s) for s in slots]
        seq = [p + n for p, n in zip(prefix, adds, strict=True)]
        last = [s[-1] if s else -1 for s in slots]
        self._apply(rids, adds, _extend(self.alloc, prefix, seq, last))

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def decode(self, data: st.DataObject) -> None:
        live = st.sampled_from(sorted(self.reqs))
        rids = data.draw(st.lists(live, min_size=1, max_size=3, unique=True))
        slots = [self.reqs[r] for r in rids]
        seq = [len(s) + 1 for s in slots]
        self._apply(rids, [1] * len(rids), _decode(self.alloc, seq, [s[-1] for s in slots]))

    def _pages(self, rid: int) -> list[int]:
        """Full pages of a request in position order (a request starts at a page start)."""
        return [s // self.ps for s in self.reqs[rid][:: self.ps]]

    def _complete(self) -> list[tuple[int, int]]:
        """(request, full page) of every page whose ps slots are all allocated."""
        return [
            (r, p)
            for r in sorted(self.reqs)
            for p in self._pages(r)[: len(self.reqs[r]) // self.ps]
        ]

    def _drop_swa(self, full_pages: list[int]) -> list[int]:
        """Model of freeing the SWA pages of ``full_pages`` (in that order), pushed in front."""
        swa = [self.pair[p] for p in full_pages if self.pair[p]]
        self.swa_free = swa + self.swa_free
        for p in full_pages:
            self.pair[p] = 0
        return swa

    def _free_reqs(self, rids: list[int]) -> None:
        pages = sorted(p for r in rids for p in self._pages(r))
        self._drop_swa(pages)
        self.full_free = pages + self.full_free
        for r in rids:
            del self.reqs[r], self.released[r]
        for p in pages:
            del self.pair[p]

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def free_one(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        self.alloc.free(_t(data.draw(st.permutations(self.reqs[rid]))))
        self._free_reqs([rid])

    @precondition(lambda self: len(self.reqs) >= 2)
    @rule(data=st.data())
    def free_grouped(self, data: st.DataObject) -> None:
        rids = data.draw(st.lists(st.sampled_from(sorted(self.reqs)), min_size=2, unique=True))
        with self.alloc.free_group():
            for r in rids:
                self.alloc.free(_t(self.reqs[r]))
        self._free_reqs(rids)

    @precondition(lambda self: self._complete())
    @rule(data=st.data())
    def tombstone(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(self._complete()), min_size=1, unique=True))
        offsets = [data.draw(st.integers(0, self.ps - 1)) for _ in chosen]
        self.alloc.free_swa(
            _t([p * self.ps + o for (_, p), o in zip(chosen, offsets, strict=True)])
        )
        self._drop_swa(sorted(p for _, p in chosen))

    @precondition(lambda self: self._complete())
    @rule(data=st.data())
    def adopt(self, data: st.DataObject) -> None:
        keep = [p for _, p in self._complete() if not self.pair[p]]
        dup = [p for _, p in self._complete() if self.pair[p]]
        if not keep or not dup:
            return
        k, d = data.draw(st.sampled_from(keep)), data.draw(st.sampled_from(dup))
        self.alloc.adopt_swa(_t(_slots(k, self.ps)), _t(_slots(d, self.ps)))
        self.pair[k], self.pair[d] = self.pair[d], 0

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        ps, keep = self.ps, max(self.window, self.ps)
        plan = {}
        for r in sorted(self.reqs):
            n = len(self.reqs[r])
            new = max(self.released[r], max(n - keep, 0) // ps * ps)
            pages = self._pages(r)[self.released[r] // ps : new // ps]
            if all(self.pair[p] for p in pages):  # the kernel's contract: still mapped
                plan[r] = (new, pages)
        rids = data.draw(st.lists(st.sampled_from(sorted(plan)), unique=True)) if plan else []
        width = max([len(self.reqs[r]) for r in rids], default=0) + 1
        r2t = torch.zeros(len(rids) + 1, width, dtype=torch.int32, device=DEVICE)
        rows = [len(rids) - i for i in range(len(rids))]  # not the batch order
        for row, r in zip(rows, rids, strict=True):
            r2t[row, : len(self.reqs[r])] = _t(self.reqs[r]).to(torch.int32)
        got = self.alloc.swa_release(
            r2t,
            _t(rows),
            _t([len(self.reqs[r]) for r in rids]),
            _t([self.released[r] for r in rids]),
            self.window,
        )
        assert got.tolist() == [plan[r][0] for r in rids]
        freed = [self.pair[p] for r in rids for p in plan[r][1]]
        self.swa_free = freed + self.swa_free
        for r in rids:
            self.released[r] = plan[r][0]
            for p in plan[r][1]:
                self.pair[p] = 0

    @invariant()
    def consistent(self) -> None:
        _check_swa(self.alloc)
        assert _free(self.alloc.full) == self.full_free
        assert _free(self.alloc.swa) == self.swa_free
        ps = self.ps
        expected = torch.zeros_like(self.alloc.full_to_swa)
        for slots in self.reqs.values():
            for s in slots:
                if self.pair[s // ps]:
                    expected[s] = self.pair[s // ps] * ps + s % ps
        assert torch.equal(self.alloc.full_to_swa, expected)
        slots = [s for v in self.reqs.values() for s in v]
        assert len(set(slots)) == len(slots), "a full slot handed out twice"
        full_held = sorted(self.pair) + self.full_free
        assert sorted(full_held) == list(range(1, self.alloc.full.num_pages)), "full page lost"
        swa_held = [q for q in self.pair.values() if q] + self.swa_free
        assert sorted(swa_held) == list(range(1, self.alloc.swa.num_pages)), "SWA page lost"


class PagedTritonMachine(PagedMachine):
    backend = "triton"


class SWATritonMachine(SWAMachine):
    backend = "triton"


_MANY = settings(max_examples=40, stateful_step_count=25)
_FEW = settings(max_examples=4, stateful_step_count=10)
TestPagedMachine = PagedMachine.TestCase
TestPagedMachine.settings = _MANY
TestSWAMachine = SWAMachine.TestCase
TestSWAMachine.settings = _MANY
TestPagedTritonMachine = PagedTritonMachine.TestCase
TestPagedTritonMachine.settings = _FEW
TestSWATritonMachine = SWATritonMachine.TestCase
TestSWATritonMachine.settings = _FEW


# --- KVPool ----------------------------------------------------------------------------------

FULL_LAYERS, SWA_LAYERS, MAMBA_LAYER = [0, 3], [1, 2], 4


def _kv(
    ps: int, dtype: torch.dtype, swa_layers: list[int] = SWA_LAYERS
) -> tuple[SWAAllocator, KVPool]:
    """Full pool of 6 pages, SWA pool of 4 pages; layer 4 is recurrent (in neither list)."""
    alloc = _swa(6, 4, ps)
    kv = KVPool(
        FULL_LAYERS,
        swa_layers,
        alloc.full.num_slots,
        alloc.swa.num_slots,
        ps,
        HEADS,
        DIM,
        dtype,
        DEVICE,
        alloc.full_to_swa,
        "torch",
    )
    return alloc, kv


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_kv_roundtrip(ps, dtype):
    """set_kv then get_kv is bit-exact on every layer; SWA layers land at the mapped SWA slots."""
    gen = _gen("kv", ps, dtype)
    alloc, kv = _kv(ps, dtype)
    alloc.free_swa(_extend(alloc, [0], [ps], [-1]))  # full p pairs with SWA p - 1 from now on
    a = _extend(alloc, [0], [2 * ps + 1], [-1])
    b = _extend(alloc, [0], [ps], [-1])
    slots = torch.cat([a, b])[torch.randperm(3 * ps + 1, generator=gen)]
    swa_slots = alloc.translate(slots)
    assert swa_slots.tolist() == [s - ps for s in slots.tolist()]
    data = {}
    for lid in FULL_LAYERS + SWA_LAYERS:
        k, v = (_random_bits((slots.numel(), HEADS, DIM), dtype, gen) for _ in range(2))
        kv.set_kv(lid, slots, k, v)
        data[lid] = (k, v)
    for j, lid in enumerate(FULL_LAYERS):
        got_k, got_v = kv.get_kv(lid, slots)
        assert got_k.dtype == dtype and got_k.shape == (slots.numel(), HEADS, DIM)
        assert torch.equal(_bits(got_k), _bits(data[lid][0]))
        assert torch.equal(_bits(got_v), _bits(data[lid][1]))
        assert torch.equal(_bits(kv.full_buf[2 * j, slots]), _bits(data[lid][0]))
    for j, lid in enumerate(SWA_LAYERS):
        got_k, got_v = kv.get_kv(lid, slots)
        assert torch.equal(_bits(got_k), _bits(data[lid][0]))
        assert torch.equal(_bits(got_v), _bits(data[lid][1]))
        assert torch.equal(_bits(kv.swa_buf[2 * j + 1, swa_slots]), _bits(data[lid][1]))
    unused_full = torch.ones(kv.full_buf.shape[1], dtype=torch.bool)
    unused_full[slots] = False
    unused_swa = torch.ones(kv.swa_buf.shape[1], dtype=torch.bool)
    unused_swa[swa_slots] = False
    assert not bool(_bits(kv.full_buf[:, unused_full]).any())
    assert not bool(_bits(kv.swa_buf[:, unused_swa]).any())


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_kv_tombstoned_slots_write_padding(ps):
    """SWA writes at tombstoned slots land in padding slot 0 only; mapped slots still work;
    reading a tombstoned slot (outside the window) is refused, padding slot 0 reads."""
    gen = _gen("tomb", ps)
    alloc, kv = _kv(ps, torch.float32)
    a = _extend(alloc, [0], [2 * ps], [-1])  # full 1, 2 -> SWA 1, 2
    alloc.free_swa(a[:ps])
    k, v = (_random_bits((2 * ps, HEADS, DIM), torch.float32, gen) for _ in range(2))
    kv.set_kv(SWA_LAYERS[1], a, k, v)
    got_k, got_v = kv.get_kv(SWA_LAYERS[1], a[ps:])
    assert torch.equal(_bits(got_k), _bits(k[ps:]))
    assert torch.equal(_bits(got_v), _bits(v[ps:]))
    for tombstoned in (a, a[:1], a[ps - 1 : ps + 1]):
        with pytest.raises(ValueError, match="no SWA KV"):
            kv.get_kv(SWA_LAYERS[1], tombstoned)
    pad_k, _ = kv.get_kv(SWA_LAYERS[1], _t([0] * ps))
    assert torch.equal(_bits(pad_k), _bits(kv.swa_buf[2, 0].expand(ps, HEADS, DIM)))
    assert torch.equal(_bits(kv.get_kv(FULL_LAYERS[0], a)[0]), _bits(kv.full_buf[0, a]))
    touched = torch.zeros(kv.swa_buf.shape[1], dtype=torch.bool)
    touched[[0, *_slots(2, ps)]] = True
    assert not bool(_bits(kv.swa_buf[:, ~touched]).any())
    assert not bool(_bits(kv.full_buf).any())


@pytest.mark.parametrize("layer", [FULL_LAYERS[0], SWA_LAYERS[0]], ids=["full", "swa"])
def test_kv_slots_outside_the_pool_are_refused(layer):
    """Full slot -1 (it would write the pool's last, allocatable slot) or past the pool:
    ValueError naming full_slots from set_kv and get_kv, and nothing is written."""
    alloc, kv = _kv(4, torch.float32)
    size = alloc.full.num_slots
    good = _extend(alloc, [0], [3], [-1])
    k = torch.ones(4, HEADS, DIM)
    for slot in (-1, size, size + 5):
        bad = torch.cat([good, _t([slot])])
        with pytest.raises(ValueError, match=rf"full_slots must lie in \[0, {size}\)"):
            kv.set_kv(layer, bad, k, k)
        with pytest.raises(ValueError, match=rf"full_slots must lie in \[0, {size}\)"):
            kv.get_kv(layer, bad)
    assert not bool(kv.full_buf.any()) and not bool(kv.swa_buf.any())
    kv.set_kv(layer, good, k[:3], k[:3])
    assert bool((kv.get_kv(layer, good)[0] == 1).all())


def test_kv_bad_input():
    """ValueError for a recurrent or unknown layer, wrong k/v shapes and non-int64 or 2-D
    slots; nothing is written."""
    alloc, kv = _kv(4, torch.float16)
    slots = _extend(alloc, [0], [3], [-1])
    k = torch.ones(3, HEADS, DIM, dtype=torch.float16)
    for lid in (MAMBA_LAYER, 99, -1):
        with pytest.raises(ValueError, match="layer_id"):
            kv.set_kv(lid, slots, k, k)
        with pytest.raises(ValueError, match="layer_id"):
            kv.get_kv(lid, slots)
    for lid in (FULL_LAYERS[0], SWA_LAYERS[0]):
        with pytest.raises(ValueError, match="k must have shape"):
            kv.set_kv(lid, slots, k[:, :, :2], k)
        with pytest.raises(ValueError, match="v must have shape"):
            kv.set_kv(lid, slots, k, k[:2])
        with pytest.raises(ValueError, match="int64"):
            kv.set_kv(lid, slots.to(torch.int32), k, k)
        with pytest.raises(ValueError, match="1-D"):
            kv.get_kv(lid, slots.view(1, 3))
        with pytest.raises(ValueError, match="int64"):
            kv.get_kv(lid, slots.tolist())
    assert not bool(kv.full_buf.any()) and not bool(kv.swa_buf.any())


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_page_view_shape(ps):
    """page_view is a [pages, 2*layers, page_size*heads*dim] view of the buffer itself."""
    alloc, kv = _kv(ps, torch.bfloat16)
    full, swa = kv.page_view(False), kv.page_view(True)
    assert full.shape == (alloc.full.num_pages, 2 * len(FULL_LAYERS), ps * HEADS * DIM)
    assert swa.shape == (alloc.swa.num_pages, 2 * len(SWA_LAYERS), ps * HEADS * DIM)
    assert full.data_ptr() == kv.full_buf.data_ptr() and full.stride(2) == 1
    full[3, 2] = 1.0  # page 3, K of the second full layer
    assert bool((kv.full_buf[2, 3 * ps : 4 * ps] == 1).all())
    assert int((kv.full_buf != 0).sum()) == ps * HEADS * DIM


def test_page_view_without_swa_layers():
    """A model with no SWA layers still has an (empty) SWA page view."""
    alloc, kv = _kv(4, torch.float32, swa_layers=[])
    assert kv.page_view(True).shape == (alloc.swa.num_pages, 0, 4 * HEADS * DIM)


@pytest.fixture(params=BACKENDS)
def copy_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run page_copy (as the pools call it, through ``hybridkv.kernels``) on this backend."""
    real = kernels.page_copy
    monkeypatch.setattr(kernels, "page_copy", functools.partial(real, backend=request.param))
    return request.param


@pytest.mark.parametrize("swa", [False, True], ids=["full", "swa"])
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_page_copy_through_view(ps, swa, copy_backend):
    """A page copy through page_view moves exactly those pages' K and V of every layer."""
    gen = _gen("copy", ps, swa)
    _, kv = _kv(ps, torch.bfloat16)
    buf = kv.swa_buf if swa else kv.full_buf
    buf.copy_(_random_bits(tuple(buf.shape), torch.bfloat16, gen))
    before = buf.clone()
    view = kv.page_view(swa)
    kernels.page_copy(view, view, _t([2, 4]), _t([3, 1]))
    expected = before.clone()
    expected[:, 3 * ps : 4 * ps] = before[:, 2 * ps : 3 * ps]
    expected[:, 1 * ps : 2 * ps] = before[:, 4 * ps : 5 * ps]
    assert torch.equal(_bits(buf), _bits(expected))


# --- HostPool --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_host_backup_load_roundtrip(ps, dtype, copy_backend):
    """backup copies the chosen pages to new host pages; load restores them bit-exact (to the
    same or other device pages) and touches nothing else."""
    gen = _gen("host", ps, dtype)
    _, kv = _kv(ps, dtype)
    kv.full_buf.copy_(_random_bits(tuple(kv.full_buf.shape), dtype, gen))
    original = kv.full_buf.clone()
    view = kv.page_view(False)
    host = HostPool(3 * ps, ps, view.shape[1], view.shape[2], dtype)
    host_pages = host.backup(view, _t([4, 2]))
    assert host_pages.tolist() == [1, 2] and host.available == ps
    assert torch.equal(_bits(host.buf[1:3]), _bits(view[[4, 2]]))
    assert not bool(_bits(host.buf[[0, 3]]).any())
    assert torch.equal(_bits(kv.full_buf), _bits(original))
    # Clobber the backed-up device pages, then load them back.
    kv.full_buf[:, 2 * ps : 3 * ps] = 0
    kv.full_buf[:, 4 * ps : 5 * ps] = 0
    host.load(view, host_pages, _t([4, 2]))
    assert torch.equal(_bits(kv.full_buf), _bits(original))
    host.load(view, host_pages[:1], _t([5]))  # page 4's KV into page 5
    expected = original.clone()
    expected[:, 5 * ps : 6 * ps] = original[:, 4 * ps : 5 * ps]
    assert torch.equal(_bits(kv.full_buf), _bits(expected))


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_host_short_and_free(ps, copy_backend):
    """backup returns None (nothing taken or written) when the host pool is short; free
    returns pages to the front, and they are used next."""
    gen = _gen("host-short", ps)
    _, kv = _kv(ps, torch.float32)
    kv.full_buf.copy_(_random_bits(tuple(kv.full_buf.shape), torch.float32, gen))
    view = kv.page_view(False)
    host = HostPool(3 * ps, ps, view.shape[1], view.shape[2], torch.float32)
    assert host.backup(view, _t([1, 2])).tolist() == [1, 2]
    snapshot = host.buf.clone()
    assert host.backup(view, _t([3, 4])) is None
    assert _free(host.allocator) == [3] and host.available == ps
    assert torch.equal(_bits(host.buf), _bits(snapshot))
    host.free(_t([2]))
    assert _free(host.allocator) == [2, 3] and host.available == 2 * ps
    assert host.backup(view, _t([5])).tolist() == [2]
    assert torch.equal(_bits(host.buf[2]), _bits(view[5]))
    host.allocator.check()


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_swa_free_whole_pages_matches_marking(ps):
    """free/free_swa of whole-page runs (tree nodes) read pages off directly, leaving the
    same free lists and map as marking the pool; slots that are not such runs are refused
    in debug mode."""
    pools = []
    for whole in (False, True):
        alloc = SWAAllocator(12 * ps, 12 * ps, ps, DEVICE, "torch")
        s = alloc.alloc_extend([0], [8 * ps], torch.tensor([-1], device=DEVICE))
        nodes = torch.cat([s[3 * ps : 5 * ps], s[:ps], s[6 * ps : 8 * ps]])
        alloc.free_swa(nodes[: 2 * ps], whole_pages=whole)
        alloc.free(nodes, whole_pages=whole)
        alloc.check()
        pools.append(alloc)
    marked, direct = pools
    assert marked.full.free_pages_view().tolist() == direct.full.free_pages_view().tolist()
    assert marked.swa.free_pages_view().tolist() == direct.swa.free_pages_view().tolist()
    assert torch.equal(marked.full_to_swa, direct.full_to_swa)
    if ps > 1:
        s = direct.alloc_extend([0], [2 * ps], torch.tensor([-1], device=DEVICE))
        with pytest.raises(AssertionError, match="whole pages"):
            direct.free(s[1 : 1 + ps], whole_pages=True)
