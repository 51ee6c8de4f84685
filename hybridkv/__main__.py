"""``python -m hybridkv``: the kernel self-check (Triton interpreter when there is no GPU)."""

import argparse
import os
import sys

import torch

import hybridkv

parser = argparse.ArgumentParser(
    prog="python -m hybridkv",
    description="Check every hybridkv kernel against its torch reference, bit for bit, on "
    "small batches, with timings: natively on a CUDA GPU, in Triton's interpreter "
    "(TRITON_INTERPRET=1, set here) without one. Exit status 0 when all match.",
    epilog="The workload simulator: python -m hybridkv.sim --help. Documentation: README.md "
    "and docs/ (design.md, contract.md, simulator.md).",
)
parser.add_argument("--version", action="version", version=f"hybridkv {hybridkv.__version__}")
parser.parse_args()

if not torch.cuda.is_available():
    # NOTE: before any kernel module is imported: @triton.jit reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridkv.selfcheck import main  # noqa: E402

sys.exit(main())
