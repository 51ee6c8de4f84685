"""Storage tier (L3): prefix-chained page keys and the crash-safe file backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hybridkv.tree.storage import FileStorage, page_keys

PAGE = 4
SIG = {"page_size": PAGE, "layers": 2, "swa_layers": 1, "kv_heads": 2, "head_dim": 8}
FULL_SHAPE = (4, 16)  # chunks, elems of one full page
SWA_SHAPE = (2, 16)  # chunks, elems of one SWA page
POISON = 77


def sig(dtype: torch.dtype) -> dict[str, object]:
    return {**SIG, "dtype": str(dtype)}


def rand_pages(n: int, shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns (NaNs, infs, denormals included) viewed as ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    nbytes = n * shape[0] * shape[1] * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).view(n, *shape)


def poisoned(n: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n, *shape), POISON, dtype=dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def untouched(t: torch.Tensor, start: int) -> bool:
    return bool((t[start:] == POISON).all())


@pytest.fixture
def store(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "kv", sig(torch.float16))


def tokens(n_pages: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (n_pages * PAGE,), generator=g).tolist()


# ----------------------------------------------------------------------------- keys


def test_page_keys_hard_coded_digest():
    """Keys of a small case equal fixed digests: the scheme never drifts between versions."""
    assert page_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, "demo") == [
        "f172223df6d8c4542efd41edfd80f8200aa918994b8f8e4f15c9dc1533ab5abc",
        "958a9ce694042d24c14e92cdb32a5da33ac091a72ef00859cf28ce78a4d66fff",
    ]


@pytest.mark.parametrize("n_tokens", [0, 3, 4, 7, 8, 13])
def test_page_keys_one_per_whole_page(n_tokens):
    """One key per whole page; a partial tail page gets none; a tensor gives the same keys."""
    toks = list(range(n_tokens))
    keys = page_keys(toks, PAGE, "s")
    assert len(keys) == n_tokens // PAGE
    assert page_keys(torch.tensor(toks, dtype=torch.int64), PAGE, "s") == keys


def test_page_keys_prefix_chained():
    """Same first pages give the same first keys; a diverging page changes every later key."""
    a = tokens(6, seed=1)
    b = list(a)
    b[2 * PAGE + 1] += 1  # page 2 diverges
    ka, kb = page_keys(a, PAGE, "s"), page_keys(b, PAGE, "s")
    assert ka[:2] == kb[:2]
    assert all(x != y for x, y in zip(ka[2:], kb[2:], strict=True))
    assert page_keys(a[: 3 * PAGE], PAGE, "s") == ka[:3]
    # identical later pages behind a different prefix still get different keys
    c = tokens(1, seed=9) + a[PAGE:]
    assert all(x != y for x, y in zip(ka, page_keys(c, PAGE, "s"), strict=True))


def test_salt_separates_layouts(tmp_path):
    """Another signature gives another salt and other keys; key order in the dict does not."""
    s1 = FileStorage(tmp_path, sig(torch.float16))
    s2 = FileStorage(tmp_path, sig(torch.bfloat16))
    s3 = FileStorage(tmp_path, dict(reversed(list(sig(torch.float16).items()))))
    assert s1.salt != s2.salt and s1.salt == s3.salt
    toks = tokens(3)
    assert set(s1.keys(toks, PAGE)).isdisjoint(s2.keys(toks, PAGE))
    assert s1.keys(toks, PAGE) == page_keys(toks, PAGE, s1.salt)


# ----------------------------------------------------------------------------- roundtrip


@pytest.mark.parametrize("with_swa", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_roundtrip_bit_exact(tmp_path, dtype, with_swa):
    """Written pages read back bit for bit (NaN payloads included), with and without SWA."""
    st = FileStorage(tmp_path, sig(dtype))
    keys = st.keys(tokens(5), PAGE)
    full = rand_pages(5, FULL_SHAPE, dtype, seed=2)
    swa = rand_pages(5, SWA_SHAPE, dtype, seed=3) if with_swa else None
    assert st.write(keys, full, swa) == 5
    full_out, swa_out = poisoned(6, FULL_SHAPE, dtype), poisoned(6, SWA_SHAPE, dtype)
    assert st.read(keys, full_out, swa_out) == (5, [with_swa] * 5)
    assert same_bits(full_out[:5], full)
    assert untouched(full_out, 5)
    if with_swa:
        assert same_bits(swa_out[:5], swa)
        assert untouched(swa_out, 5)
    else:
        assert untouched(swa_out, 0)


def test_read_without_swa_out_and_mixed_swa(store):
    """Pages with and without SWA mix; flags say which; ``swa_out=None`` reads full only."""
    dt = torch.float16
    keys = store.keys(tokens(4), PAGE)
    full, swa = rand_pages(4, FULL_SHAPE, dt, 4), rand_pages(4, SWA_SHAPE, dt, 5)
    assert store.write(keys[:2], full[:2], None) == 2
    assert store.write(keys[2:], full[2:], swa[2:]) == 2
    swa_out = poisoned(4, SWA_SHAPE, dt)
    full_out = poisoned(4, FULL_SHAPE, dt)
    assert store.read(keys, full_out, swa_out) == (4, [False, False, True, True])
    assert same_bits(full_out, full) and same_bits(swa_out[2:], swa[2:])
    assert untouched(swa_out[:2], 0)
    full_out = poisoned(4, FULL_SHAPE, dt)
    assert store.read(keys, full_out, None) == (4, [False] * 4)
    assert same_bits(full_out, full)


def test_partial_read_stops_at_first_missing(store):
    """A missing page ends the read: later stored pages are not read, their rows untouched."""
    dt = torch.float16
    keys = store.keys(tokens(5), PAGE)
    full = rand_pages(5, FULL_SHAPE, dt, 6)
    store.write(keys[:2], full[:2], None)
    store.write(keys[3:], full[3:], None)
    assert store.contains(keys) == 2
    assert store.contains(keys[3:]) == 2
    assert store.contains([]) == 0
    out = poisoned(5, FULL_SHAPE, dt)
    assert store.read(keys, out, None) == (2, [False, False])
    assert same_bits(out[:2], full[:2]) and untouched(out, 2)
    assert store.read(keys[2:], poisoned(3, FULL_SHAPE, dt), None) == (0, [])


def test_write_leaves_existing_files_alone(store):
    """Re-writing a stored key does not touch its file and still counts it as stored."""
    dt = torch.float16
    keys = store.keys(tokens(2), PAGE)
    full = rand_pages(2, FULL_SHAPE, dt, 7)
    store.write(keys[:1], full[:1], None)
    before = os.stat(store.path(keys[0]))
    assert store.write(keys, rand_pages(2, FULL_SHAPE, dt, 8), None) == 2
    after = os.stat(store.path(keys[0]))
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    out = poisoned(2, FULL_SHAPE, dt)
    assert store.read(keys, out, None)[0] == 2
    assert same_bits(out[0], full[0])
    assert store.path(keys[0]).parent.name == keys[0][:2]


def test_bad_arguments_raise(store):
    """Shape mismatches and malformed keys are ValueErrors, not silent misreads."""
    dt = torch.float16
    keys = store.keys(tokens(2), PAGE)
    with pytest.raises(ValueError, match="full"):
        store.write(keys, rand_pages(3, FULL_SHAPE, dt, 0), None)
    with pytest.raises(ValueError, match="swa"):
        store.write(keys, rand_pages(2, FULL_SHAPE, dt, 0), rand_pages(1, SWA_SHAPE, dt, 0))
    with pytest.raises(ValueError, match="full_out"):
        store.read(keys, poisoned(1, FULL_SHAPE, dt), None)
    with pytest.raises(ValueError, match="page key"):
        store.contains(["../../etc/passwd"])
    with pytest.raises(ValueError, match="page_size"):
        page_keys([1, 2], 0, "s")


# ----------------------------------------------------------------------------- persistence


def test_new_object_reads_what_another_wrote(tmp_path):
    """A fresh FileStorage on the same directory and signature finds the earlier pages."""
    dt = torch.bfloat16
    toks = tokens(3)
    a = FileStorage(tmp_path, sig(dt))
    full, swa = rand_pages(3, FULL_SHAPE, dt, 10), rand_pages(3, SWA_SHAPE, dt, 11)
    a.write(a.keys(toks, PAGE), full, swa)
    del a
    b = FileStorage(tmp_path, sig(dt))
    keys = b.keys(toks + [1, 2], PAGE)  # an extra partial page adds no key
    full_out, swa_out = poisoned(3, FULL_SHAPE, dt), poisoned(3, SWA_SHAPE, dt)
    assert b.contains(keys) == 3
    assert b.read(keys, full_out, swa_out) == (3, [True] * 3)
    assert same_bits(full_out, full) and same_bits(swa_out, swa)


def test_subprocess_shares_pages(tmp_path):
    """Another process (another hash seed) reads our pages and stores pages we then read."""
    dt = torch.bfloat16
    toks = tokens(3, seed=12)
    st = FileStorage(tmp_path, sig(dt))
    full = rand_pages(2, FULL_SHAPE, dt, 13)
    st.write(st.keys(toks, PAGE)[:2], full, None)
    child = textwrap.dedent(
        f"""
        import json, sys, torch
        from hybridkv.tree.storage import FileStorage
        st = FileStorage(sys.argv[1], json.loads(sys.argv[2]))
        keys = st.keys({toks!r}, {PAGE})
        out = torch.zeros(3, *{FULL_SHAPE!r}, dtype=torch.bfloat16)
        n, _ = st.read(keys, out, None)
        print(n, out[:n].view(torch.int16).flatten().tolist())
        g = torch.Generator().manual_seed(14)
        page = torch.randint(-(2**15), 2**15, (1, *{FULL_SHAPE!r}), dtype=torch.int16, generator=g)
        print(st.write(keys[2:], page.view(torch.bfloat16), None))
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    res = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path), json.dumps(sig(dt))],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert res.returncode == 0, res.stderr
    line1, line2 = res.stdout.strip().splitlines()[-2:]
    n, bits = line1.split(" ", 1)
    assert int(n) == 2 and json.loads(bits) == full.view(torch.int16).flatten().tolist()
    assert line2 == "1"
    out = poisoned(3, FULL_SHAPE, dt)
    assert st.read(st.keys(toks, PAGE), out, None)[0] == 3
    g = torch.Generator().manual_seed(14)
    page = torch.randint(-(2**15), 2**15, (1, *FULL_SHAPE), dtype=torch.int16, generator=g)
    assert same_bits(out[:2], full) and same_bits(out[2:], page.view(dt))


# ----------------------------------------------------------------------------- crash safety


def _truncate(st: FileStorage, key: str, other: str) -> None:
    p = st.path(key)
    p.write_bytes(p.read_bytes()[:-7])


def _flip_payload(st: FileStorage, key: str, other: str) -> None:
    p = st.path(key)
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x10
    p.write_bytes(bytes(data))


def _flip_header(st: FileStorage, key: str, other: str) -> None:
    p = st.path(key)
    data = bytearray(p.read_bytes())
    data[40] ^= 0x01
    p.write_bytes(bytes(data))


def _foreign(st: FileStorage, key: str, other: str) -> None:
    st.path(key).write_bytes(b"not a page file at all\n" * 40)


def _empty(st: FileStorage, key: str, other: str) -> None:
    st.path(key).write_bytes(b"")


def _bad_magic(st: FileStorage, key: str, other: str) -> None:
    p = st.path(key)
    p.write_bytes(b"XXXXXXXX" + p.read_bytes()[8:])


def _bad_version(st: FileStorage, key: str, other: str) -> None:
    p = st.path(key)
    data = bytearray(p.read_bytes())
    data[8] += 1
    p.write_bytes(bytes(data))


def _wrong_key(st: FileStorage, key: str, other: str) -> None:
    st.path(key).write_bytes(st.path(other).read_bytes())  # a valid page, under another name


def _leftover_tmp(st: FileStorage, key: str, other: str) -> None:
    p = st.path(key)
    p.rename(p.with_name(p.name + ".123.abcd.tmp"))


def _other_signature(st: FileStorage, key: str, other: str) -> None:
    p = st.path(key)
    p.unlink()
    foreign = FileStorage(st.root, {**st.signature, "head_dim": 99})
    foreign.write([key], rand_pages(1, FULL_SHAPE, torch.float16, 99), None)
    assert p.is_file()


CORRUPTIONS = [
    _truncate,
    _flip_payload,
    _flip_header,
    _foreign,
    _empty,
    _bad_magic,
    _bad_version,
    _wrong_key,
    _leftover_tmp,
    _other_signature,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_page_is_a_miss(store, corrupt):
    """A damaged/foreign/leftover page file is a miss: no exception, no wrong KV, repairable."""
    dt = torch.float16
    keys = store.keys(tokens(4, seed=20), PAGE)
    full, swa = rand_pages(4, FULL_SHAPE, dt, 21), rand_pages(4, SWA_SHAPE, dt, 22)
    assert store.write(keys, full, swa) == 4
    corrupt(store, keys[2], keys[1])
    full_out, swa_out = poisoned(4, FULL_SHAPE, dt), poisoned(4, SWA_SHAPE, dt)
    assert store.read(keys, full_out, swa_out) == (2, [True, True])
    assert same_bits(full_out[:2], full[:2]) and same_bits(swa_out[:2], swa[:2])
    assert untouched(full_out, 2) and untouched(swa_out, 2)
    # the bad file is gone (or never was under the key): a new write repairs the chain
    assert store.contains(keys) == 2
    assert store.write(keys, full, swa) == 4
    full_out = poisoned(4, FULL_SHAPE, dt)
    assert store.read(keys, full_out, None) == (4, [False] * 4)
    assert same_bits(full_out, full)


@pytest.mark.parametrize("fail", ["replace", "fsync"])
def test_write_is_atomic(store, monkeypatch, fail):
    """A write that fails mid-way leaves no page file under the key and no ``.tmp`` behind."""
    dt = torch.float16
    keys = store.keys(tokens(3, seed=30), PAGE)
    full = rand_pages(3, FULL_SHAPE, dt, 31)
    store.write(keys[:1], full[:1], None)
    real = getattr(os, fail)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, fail, boom)
    assert store.write(keys, full, None) == 1
    monkeypatch.setattr(os, fail, real)
    files = sorted(p.name for p in store.root.rglob("*") if p.is_file())
    assert files == [f"{keys[0]}.page"]
    assert store.contains(keys) == 1
    assert store.read(keys, poisoned(3, FULL_SHAPE, dt), None)[0] == 1
    assert store.write(keys, full, None) == 3
    out = poisoned(3, FULL_SHAPE, dt)
    assert store.read(keys, out, None)[0] == 3 and same_bits(out, full)


def test_write_propagates_non_os_errors_without_debris(store, monkeypatch):
    """A non-I/O failure inside the write propagates, still leaving nothing under the key."""
    keys = store.keys(tokens(1, seed=40), PAGE)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        store.write(keys, rand_pages(1, FULL_SHAPE, torch.float16, 41), None)
    assert not [p for p in store.root.rglob("*") if p.is_file()]
