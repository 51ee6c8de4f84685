"""``python -m hybridkv``: the kernel self-check (Triton interpreter when there is no GPU)."""

import os
import sys

import torch

if not torch.cuda.is_available():
    # NOTE: before any kernel module is imported: @triton.jit reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridkv.selfcheck import main  # noqa: E402

sys.exit(main())
