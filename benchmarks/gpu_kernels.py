"""GPU benchmarks: every kernel job, Triton vs torch, at batch 1, 64 and 1024; a markdown table.

    python benchmarks/gpu_kernels.py             # needs a CUDA device
    python benchmarks/gpu_kernels.py --dry-run   # CPU: build every input, run each provider once

Each provider calls the public function with ``backend="triton"`` or ``"torch"``, passing the
host-known sizes a real caller passes; its metadata checks are included, its sync-needing
value checks only with ``HYBRIDKV_DEBUG=1`` (the header says which); page copies add ``copy_``,
a contiguous copy of the same bytes between the same two memories (device, or pinned host).
Times are the median, 20th and 80th percentiles of ``triton.testing.do_bench``; GB/s is
``Case.nbytes`` over the median.
``--dry-run`` times one call with ``time.perf_counter`` and runs the torch backend for every
provider: it checks the inputs and the table, not the speed.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # hybridkv from this checkout

import torch  # noqa: E402
import triton  # noqa: E402

from hybridkv.kernels import debug_enabled  # noqa: E402
from hybridkv.kernels.cases import BATCHES, CPU_KV, GPU_KV, JOBS, Case, build_case  # noqa: E402

QUANTILES = [0.5, 0.2, 0.8]
PROVIDERS = ("triton", "torch")


@dataclass(frozen=True, slots=True)
class Row:
    job: str
    batch: int
    provider: str
    median_us: float
    p20_us: float
    p80_us: float
    nbytes: int

    @property
    def gbps(self) -> float:
        """Bytes moved per second at the median time, in GB/s (1e9 bytes)."""
        return self.nbytes / (self.median_us * 1e-6) / 1e9 if self.median_us > 0 else 0.0


def measure(fn: Callable[[], object], dry_run: bool) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of ``fn``'s time in µs; one ``perf_counter`` call when dry."""
    if dry_run:
        start = time.perf_counter()
        fn()
        us = (time.perf_counter() - start) * 1e6
        return us, us, us
    ms = triton.testing.do_bench(fn, quantiles=QUANTILES)
    return ms[0] * 1e3, ms[1] * 1e3, ms[2] * 1e3


def bench_case(case: Case, dry_run: bool) -> list[Row]:
    """One row per provider of ``case``."""
    providers: list[tuple[str, Callable[[], object]]] = []
    for provider in PROVIDERS:
        backend = "torch" if dry_run else provider

        def call(backend: str = backend) -> object:
            return case.run(backend)

        providers.append((provider, call))
    if case.baseline is not None:
        providers.append(("copy_", case.baseline))
    rows = []
    for provider, fn in providers:
        median, p20, p80 = measure(fn, dry_run)
        rows.append(Row(case.job, case.batch, provider, median, p20, p80, case.nbytes))
    return rows


def header(device: torch.device, dry_run: bool) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    lines = [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"device: {name or device.type}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {triton.__version__}",
        f"page copies: {GPU_KV if device.type == 'cuda' else CPU_KV}",
        f"debug checks (HYBRIDKV_DEBUG): {'on' if debug_enabled() else 'off'}",
    ]
    if dry_run:
        lines.append(
            "DRY RUN on CPU: every provider ran the torch backend once; times mean nothing"
        )
    return "\n".join(f"- {line}" for line in lines)


def format_table(rows: list[Row]) -> str:
    """The rows as a markdown table: job, batch, provider, µs (median, p20, p80), GB/s."""
    out = [
        "| job | batch | provider | µs median | µs p20 | µs p80 | GB/s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.job} | {r.batch} | {r.provider} | {r.median_us:.1f} | {r.p20_us:.1f} "
            f"| {r.p80_us:.1f} | {r.gbps:.2f} |"
        )
    return "\n".join(out)


def cases(device: torch.device, jobs: list[str], batches: list[int]) -> Iterator[Case]:
    """Cases built one at a time, so only one case's pools are alive at once."""
    kv = GPU_KV if device.type == "cuda" else CPU_KV
    for job in jobs:
        for batch in batches:
            yield build_case(job, batch, device, kv=kv, host="cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: run each provider once")
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_kernels.py needs a CUDA device and torch.cuda.is_available() is False; "
            "use --dry-run to check the inputs and the table on CPU.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    rows: list[Row] = []
    for case in cases(device, args.jobs, args.batches):
        case.run("torch")  # the public checks accept the inputs (and everything is warm)
        rows.extend(bench_case(case, args.dry_run))
        print(f"{case.job} batch {case.batch}: done", file=sys.stderr, flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(header(device, args.dry_run))
    print()
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
