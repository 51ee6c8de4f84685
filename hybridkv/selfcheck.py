"""Self-check: every kernel job against its torch reference, with timings, on one screen."""

from __future__ import annotations

import platform
import statistics
import sys
import time

import torch

import hybridkv
from hybridkv.kernels import interpreter_on, resolve_backend
from hybridkv.kernels._triton import HAS_TRITON, triton
from hybridkv.kernels.cases import JOBS, build_case

BATCHES = (1, 8)


def _tensors(x: object) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def _same(a: object, b: object) -> bool:
    """Exactly equal results: every tensor (outputs and mutated arguments) bit for bit."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or a.__class__ is not b.__class__:
        return False
    for x, y in zip(ta, tb, strict=True):
        if x.dtype.is_floating_point:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        if x.shape != y.shape or not torch.equal(x.cpu(), y.cpu()):
            return False
    return True


def _median_us(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def main() -> int:
    # NOTE: these are small calls; intra-op threads only add scheduling noise to their timings.
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = resolve_backend(None, device)
    mode = "native" if device.type == "cuda" else "interpreter" if interpreter_on() else "off"
    print(f"hybridkv {hybridkv.__version__} self-check")
    print(
        f"backend {backend} (Triton {mode}) | device {device} | torch {torch.__version__} | "
        f"triton {triton.__version__} | python {platform.python_version()}"
    )
    if not HAS_TRITON:
        print("Triton is not installed (it has wheels for Linux only): every kernel runs as")
        print("its torch reference, so there is nothing to check against it.")
        return 0
    print(f"{'job':<20}{'batch':>6}  {'result':<8}{'triton us':>12}{'torch us':>12}")
    failures = 0
    for job in JOBS:
        for batch in BATCHES:
            torch.manual_seed(0)
            triton_case = build_case(job, batch, device)
            torch.manual_seed(0)
            torch_case = build_case(job, batch, device)
            got = triton_case.run("triton")
            want = torch_case.run_reference()
            ok = _same((got, triton_case.args), (want, torch_case.args))
            failures += not ok
            t_us = _median_us(lambda c=triton_case: c.run("triton"), 3)
            r_us = _median_us(torch_case.run_reference, 3)
            print(
                f"{job:<20}{batch:>6}  {'exact' if ok else 'MISMATCH':<8}{t_us:>12.0f}{r_us:>12.0f}"
            )
    total = len(JOBS) * len(BATCHES)
    if failures:
        print(f"{failures} of {total} checks FAILED")
        return 1
    print(
        f"all {total} checks passed (timings under the interpreter are not GPU timings)"
        if mode == "interpreter"
        else f"all {total} checks passed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
