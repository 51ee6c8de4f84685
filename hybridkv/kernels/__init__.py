"""Triton kernels, one module per job, each beside its torch reference.

Every public function takes and returns torch tensors and dispatches on ``backend``:
``"triton"`` (native on CUDA, the interpreter when ``TRITON_INTERPRET=1``), ``"torch"``
(the reference), or ``None`` (Triton where it can run, else torch). Value checks that need a
device->host sync run only in debug mode (``HYBRIDKV_DEBUG=1`` or :func:`set_debug`).
"""

from hybridkv.kernels._common import (
    BACKENDS,
    debug_enabled,
    interpreter_on,
    resolve_backend,
    set_debug,
)
from hybridkv.kernels.alloc_decode import alloc_decode, alloc_decode_reference
from hybridkv.kernels.alloc_extend import alloc_extend, alloc_extend_reference
from hybridkv.kernels.free import slots_to_pages, slots_to_pages_reference
from hybridkv.kernels.full_to_swa import full_to_swa, full_to_swa_reference
from hybridkv.kernels.page_copy import page_copy, page_copy_reference
from hybridkv.kernels.page_table import page_table, page_table_reference
from hybridkv.kernels.swa_release import swa_release, swa_release_reference
from hybridkv.kernels.write_req_to_token import write_req_to_token, write_req_to_token_reference

__all__ = [
    "BACKENDS",
    "debug_enabled",
    "alloc_decode",
    "alloc_decode_reference",
    "alloc_extend",
    "alloc_extend_reference",
    "full_to_swa",
    "full_to_swa_reference",
    "interpreter_on",
    "page_copy",
    "page_copy_reference",
    "page_table",
    "page_table_reference",
    "resolve_backend",
    "set_debug",
    "slots_to_pages",
    "slots_to_pages_reference",
    "swa_release",
    "swa_release_reference",
    "write_req_to_token",
    "write_req_to_token_reference",
]
