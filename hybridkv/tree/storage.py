"""Storage tier (L3): KV pages in a directory, keyed by the hash of their whole token prefix.

A page's key chains the key of the page before it, so a key names a page *and* everything
in front of it; a process that later opens the same directory finds the pages any earlier
one stored::

    tokens:  [ page 0 ][ page 1 ][ page 2 ][ tail ]     (tail: not a whole page, no key)
    keys:    k0 = H(H(salt) || p0), k1 = H(k0 || p1), k2 = H(k1 || p2)

One file per page, ``root/<key[:2]>/<key>.page``::

    MAGIC(8) | version u32 | header_len u32 | header (JSON, padded) | full page | swa page?

The header holds the salt, key, signature, dtype and shape of each part and a checksum of
the payload. A file that fails any check is a miss (and is deleted), never an exception
and never wrong KV. Writes go to a ``.tmp`` file in the same directory, fsync, then
``os.replace``: a reader sees a whole page or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

MAGIC = b"HKVPAGE\0"
VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_ALIGN = 64  # payload offset alignment
_MAX_HEADER = 1 << 16
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def page_keys(tokens: Sequence[int], page_size: int, salt: str) -> list[str]:
    """One hex key per whole page of ``tokens``, each chained on the key before it.

    ``key_i = sha256(key_{i-1} || page_i as little-endian int64)`` (raw 32-byte digests
    chained), ``key_-1 = sha256(salt)``. Stable across processes and machines.
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
    fmt = struct.Struct(f"<{page_size}q")
    prev = hashlib.sha256(salt.encode()).digest()
    keys: list[str] = []
    for start in range(0, len(ids) - page_size + 1, page_size):
        h = hashlib.sha256(prev)
        h.update(fmt.pack(*ids[start : start + page_size]))
        prev = h.digest()
        keys.append(h.hexdigest())
    return keys


def _page_bytes(page: torch.Tensor) -> memoryview:
    """Raw bytes of one page (any dtype, bf16 included) without a round trip through floats."""
    # NOTE: flat first: memoryview.cast refuses a view with a zero in its shape, the full
    # page of a model without full-attention layers.
    return memoryview(page.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy())


class FileStorage:
    """Pages in ``root``, one file each. ``signature`` names the model/layout (page_size,
    layer counts, heads, head_dim, dtype, ...); it is hashed into ``salt``, so pools of
    another shape never share a key."""

    def __init__(self, root: str | os.PathLike, signature: dict[str, object]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.signature = dict(signature)
        blob = json.dumps(
            {"format": VERSION, "signature": self.signature}, sort_keys=True, default=str
        )
        self.salt: str = hashlib.sha256(blob.encode()).hexdigest()

    def keys(self, tokens: Sequence[int], page_size: int) -> list[str]:
        """``page_keys`` with this storage's salt."""
        return page_keys(tokens, page_size, self.salt)

    def path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"not a page key (64 lowercase hex chars): {key!r}")
        return self.root / key[:2] / f"{key}.page"

    def contains(self, keys: Sequence[str]) -> int:
        """How many leading ``keys`` have a page file (stat only; a corrupt one still counts
        until a ``read`` finds it out)."""
        for i, key in enumerate(keys):
            if not self.path(key).is_file():
                return i
        return len(keys)

    def write(self, keys: Sequence[str], full: torch.Tensor, swa: torch.Tensor | None) -> int:
        """Store page ``i`` of ``full`` ``[n, chunks, elems]`` (and of ``swa``, its own
        shape, or ``None`` when these pages have no SWA KV) under ``keys[i]``.

        Existing files are left alone (same key, same content). Does not mutate the tensors.
        Returns how many leading keys are stored afterwards (written now or already there):
        ``len(keys)`` unless an ``OSError`` (disk full, ...) stopped it; a failed page leaves
        no file under its key and no ``.tmp`` behind.
        """
        n = len(keys)
        if full.dim() != 3 or full.shape[0] != n:
            raise ValueError(f"full must be [{n}, chunks, elems], got {tuple(full.shape)}")
        if swa is not None and (swa.dim() != 3 or swa.shape[0] != n):
            raise ValueError(f"swa must be [{n}, chunks, elems] or None, got {tuple(swa.shape)}")
        for i, key in enumerate(keys):
            path = self.path(key)
            if path.is_file():
                continue
            parts = [_page_bytes(full[i])] + ([] if swa is None else [_page_bytes(swa[i])])
            digest = hashlib.blake2b(digest_size=16)
            for part in parts:
                digest.update(part)
            header = {
                "salt": self.salt,
                "key": key,
                "signature": self.signature,
                "full": [str(full.dtype), list(full.shape[1:])],
                "swa": None if swa is None else [str(swa.dtype), list(swa.shape[1:])],
                "checksum": digest.hexdigest(),
            }
            try:
                self._write_file(path, header, parts)
            except OSError:
                return i
        return n

    def _write_file(self, path: Path, header: dict[str, object], parts: list[memoryview]) -> None:
        head = json.dumps(header, sort_keys=True, default=str).encode()
        head += b" " * (-(_PREFIX.size + len(head)) % _ALIGN)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as f:
                f.write(_PREFIX.pack(MAGIC, VERSION, len(head)))
                f.write(head)
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def read(
        self, keys: Sequence[str], full_out: torch.Tensor, swa_out: torch.Tensor | None
    ) -> tuple[int, list[bool]]:
        """Copy the leading stored pages of ``keys`` into ``full_out[i]`` (and ``swa_out[i]``).

        ``full_out``: ``[>= len(keys), chunks, elems]``; ``swa_out``: the same for SWA, or
        ``None`` to skip SWA data. Stops at the first page that is missing or fails a check
        (bad magic/version/salt/key/dtype/shape/checksum, truncated, not a page file): that
        file is deleted, and ``full_out`` / ``swa_out`` rows from there on are untouched.
        Returns ``(pages read, [whether page i's SWA data was present and copied])``.
        """
        n = len(keys)
        if full_out.dim() != 3 or full_out.shape[0] < n:
            raise ValueError(f"full_out must be [>= {n}, chunks, elems], got {full_out.shape}")
        if swa_out is not None and (swa_out.dim() != 3 or swa_out.shape[0] < n):
            raise ValueError(f"swa_out must be [>= {n}, chunks, elems], got {swa_out.shape}")
        full_spec = [str(full_out.dtype), list(full_out.shape[1:])]
        swa_spec = None if swa_out is None else [str(swa_out.dtype), list(swa_out.shape[1:])]
        flags: list[bool] = []
        for i, key in enumerate(keys):
            path = self.path(key)
            try:
                loaded = self._load(path, key, full_spec, swa_spec)
            except OSError:  # missing, unreadable: a miss, but not proof of corruption
                break
            except Exception:  # NOTE: anything a malformed header can raise is a miss
                loaded = None
            if loaded is None:
                with contextlib.suppress(OSError):
                    path.unlink()  # corrupt or foreign: drop it so a later write can repair
                break
            full_page, swa_page = loaded
            full_out[i].copy_(full_page)
            if swa_page is not None and swa_out is not None:
                swa_out[i].copy_(swa_page)
            flags.append(swa_page is not None and swa_out is not None)
        return len(flags), flags

    def _load(
        self, path: Path, key: str, full_spec: list[object], swa_spec: list[object] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Parse and verify one page file; ``None`` when it is not the page asked for."""
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) != _PREFIX.size:
                return None
            magic, version, head_len = _PREFIX.unpack(prefix)
            if magic != MAGIC or version != VERSION or head_len > _MAX_HEADER:
                return None
            header = json.loads(f.read(head_len).decode())
            if not isinstance(header, dict) or header.get("salt") != self.salt:
                return None
            if header.get("key") != key or header.get("full") != full_spec:
                return None
            file_swa = header.get("swa")
            if file_swa is not None and swa_spec is not None and file_swa != swa_spec:
                return None
            specs = [full_spec] + ([] if file_swa is None else [file_swa])
            sizes = [_nbytes(spec) for spec in specs]
            if os.fstat(f.fileno()).st_size != _PREFIX.size + head_len + sum(sizes):
                return None  # truncated, or trailing bytes
            payload = torch.empty(sum(sizes), dtype=torch.uint8)
            if f.readinto(memoryview(payload.numpy())) != payload.numel():
                return None
        if hashlib.blake2b(payload.numpy(), digest_size=16).hexdigest() != header.get("checksum"):
            return None
        pages, offset = [], 0
        for spec, size in zip(specs, sizes, strict=True):
            dtype, shape = _DTYPES[spec[0]], spec[1]
            pages.append(payload[offset : offset + size].view(dtype).view(shape))
            offset += size
        return pages[0], (pages[1] if len(pages) > 1 else None)


def _nbytes(spec: object) -> int:
    """Bytes of a page from its ``[dtype, shape]`` header entry (``ValueError`` if malformed)."""
    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in _DTYPES):
        raise ValueError(f"bad page spec {spec!r}")
    shape = spec[1]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"bad page shape {shape!r}")
    numel = 1
    for d in shape:
        numel *= d
    return numel * _DTYPES[spec[0]].itemsize
