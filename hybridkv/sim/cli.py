"""``python -m hybridkv.sim``: replay a workload through the manager and print a report.

Exit status: 0 when the run is clean, 1 when it hit an OOM, a KV verification failure, an
invariant violation or a stall, 2 for bad arguments, a bad trace or a config that cannot
work (nothing is run then).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch

from hybridkv.scheduler import CacheConfig
from hybridkv.sim import report
from hybridkv.sim.run import SimResult, max_context, run
from hybridkv.sim.trace import dump_trace, load_trace
from hybridkv.sim.workloads import GENERATORS, Workload

# A small hybrid model: 2 full-attention layers, 6 sliding-window layers (window 256).
# The pools are sized so the default chat workload evicts but does not thrash.
MODEL = dict(num_layers=8, swa_layer_ids=(1, 2, 3, 5, 6, 7), num_kv_heads=2, head_dim=32)
DEFAULTS = dict(full_tokens=32768, swa_tokens=12288, host_tokens=65536, page_size=16, window=256)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hybridkv.sim",
        description="Replay a serving workload through hybridkv's MemoryManager with a "
        "model-free engine that verifies every request's KV each step.",
    )
    w = p.add_argument_group("workload")
    w.add_argument(
        "--workload",
        choices=[*GENERATORS, "trace"],
        default=None,
        help="generated workload, or 'trace' (default: chat; trace with --trace)",
    )
    w.add_argument("--trace", metavar="FILE", help="JSONL trace (see hybridkv/sim/trace.py)")
    w.add_argument("--requests", type=int, metavar="N", help="requests (turns) to generate")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps")
    w.add_argument("--dump-trace", metavar="FILE", help="write the workload as JSONL and exit")
    c = p.add_argument_group("cache config")
    c.add_argument("--full-tokens", type=int, default=DEFAULTS["full_tokens"])
    c.add_argument("--swa-tokens", type=int, default=DEFAULTS["swa_tokens"])
    c.add_argument(
        "--host-tokens",
        type=int,
        default=DEFAULTS["host_tokens"],
        help="host tier size in tokens (0: off)",
    )
    c.add_argument("--page-size", type=int, default=DEFAULTS["page_size"])
    c.add_argument("--window", type=int, default=DEFAULTS["window"], help="sliding window")
    c.add_argument(
        "--write-policy",
        default="write_through",
        choices=["write_through", "write_back", "write_through_selective"],
    )
    c.add_argument("--storage", metavar="DIR", help="storage tier directory (default: off)")
    c.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    c.add_argument("--swa-eviction", choices=["window", "lru"], default="window")
    c.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    o = p.add_argument_group("output")
    o.add_argument(
        "--compare",
        action="store_true",
        help="run the workload under several policies and print one table",
    )
    o.add_argument("--plot", metavar="PNG", help="plot hit rate and pool use (needs matplotlib)")
    o.add_argument(
        "--check-every",
        type=int,
        default=100,
        metavar="N",
        help="call mm.check() every N steps (0: only at the end; default 100)",
    )
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        metavar="N",
        help="torch intra-op CPU threads (default 1; 0 keeps torch's default)",
    )
    return p


def make_config(args: argparse.Namespace, **changes: object) -> CacheConfig:
    """The CacheConfig of the flags (``ValueError`` if it cannot work)."""
    kwargs = dict(
        MODEL,
        dtype=torch.bfloat16,
        page_size=args.page_size,
        full_tokens=args.full_tokens,
        swa_tokens=args.swa_tokens,
        sliding_window=args.window,
        host_tokens=args.host_tokens,
        write_policy=args.write_policy,
        storage=args.storage,
        swa_eviction=args.swa_eviction,
        backend=None if args.backend == "auto" else args.backend,
    )
    if args.device is not None:
        kwargs["device"] = args.device
    return CacheConfig(**(kwargs | changes))  # type: ignore[arg-type]


def make_workload(args: argparse.Namespace, max_context: int) -> Workload:
    if args.workload == "trace":
        if not args.trace:
            raise ValueError("--workload trace needs --trace FILE")
        return load_trace(args.trace, max_context)
    gen = GENERATORS[args.workload]
    kwargs = {} if args.requests is None else {"requests": args.requests}
    return gen(seed=args.seed, max_context=max_context, **kwargs)


class Progress:
    """A plain-text progress bar on ``stream``: redrawn in place on a terminal, a line per
    10% elsewhere."""

    def __init__(self, label: str, stream: TextIO | None, width: int = 30) -> None:
        self.label, self.stream, self.width = label, stream, width
        self.tty = stream is not None and stream.isatty()
        self.last, self.decile = 0.0, -1

    def __call__(self, res: SimResult) -> None:
        if self.stream is None:
            return
        frac = res.finished / res.requests if res.requests else 1.0
        now = time.monotonic()
        if self.tty and now - self.last < 0.2 or not self.tty and int(frac * 10) == self.decile:
            return
        self.last, self.decile = now, int(frac * 10)
        bar = "#" * int(frac * self.width)
        text = (
            f"{self.label} [{bar:<{self.width}}] {res.finished}/{res.requests} requests, "
            f"step {res.steps}, {res.wall_s:.0f} s"
        )
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _run(
    args: argparse.Namespace, workload: Workload, cfg: CacheConfig, label: str, salt: bool = False
) -> SimResult:
    bar = Progress(label, None if args.quiet else sys.stderr)
    res = run(
        workload,
        cfg,
        salt=salt,
        max_steps=args.max_steps,
        check_every=args.check_every,
        progress=bar,
    )
    bar.done()
    for e in res.errors:
        if e.detail:
            print(f"{label}: {e.kind} at step {e.step}:\n{e.detail}", file=sys.stderr)
    return res


def compare(args: argparse.Namespace, workload: Workload) -> list[tuple[str, SimResult | str]]:
    """The workload under each policy; a config that raises shows as ``n/a``."""
    device_only = dict(host_tokens=0, storage=None)
    host = dict(host_tokens=args.host_tokens or 4 * args.full_tokens)
    rows: list[tuple[str, SimResult | str]] = []
    with tempfile.TemporaryDirectory(prefix="hybridkv-sim-") as tmp:
        policies: list[tuple[str, dict[str, object], bool]] = [
            ("no prefix cache", device_only | {"swa_eviction": "window"}, True),
            ("prefix cache, LRU SWA eviction", device_only | {"swa_eviction": "lru"}, False),
            ("prefix cache, window SWA eviction", device_only | {"swa_eviction": "window"}, False),
            ("+host tier", host | {"storage": None}, False),
            ("+host tier +storage", host | {"storage": args.storage or tmp}, False),
        ]
        for name, changes, salt in policies:
            try:
                cfg = make_config(args, **changes)
            except ValueError as e:
                rows.append((name, f"n/a ({e})"))
                continue
            rows.append((name, _run(args, workload, cfg, name, salt)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workload is None:
        args.workload = "trace" if args.trace else "chat"
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(
            "hybridkv.sim: error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr
        )
        return 2
    if args.torch_threads:
        # NOTE: the manager works on small index tensors from one thread; on a shared or
        # oversubscribed CPU, intra-op threads stall those ops for whole time slices
        # (seen: 10x slower steps on 2 busy cores).
        torch.set_num_threads(args.torch_threads)
    ascii_only = not _can_encode(sys.stdout, report.SPARK)
    try:
        # --compare sets the tiers per row; its base is device-only
        cfg = make_config(args, host_tokens=0, storage=None) if args.compare else make_config(args)
        workload = make_workload(args, max_context(cfg))
        if args.dump_trace:
            Path(args.dump_trace).write_text("\n".join(dump_trace(workload)) + "\n")
            print(f"wrote {workload.num_requests} requests to {args.dump_trace}")
            return 0
        if args.compare:
            rows = compare(args, workload)
            print(
                f"hybridkv sim --compare: workload {workload.name}, "
                f"{workload.num_requests} requests\n  config: {report.describe(cfg)}\n"
            )
            print(report.format_compare(rows))
            results = [r for _, r in rows if not isinstance(r, str)]
        else:
            results = [_run(args, workload, cfg, workload.name)]
            print(report.format_report(results[0], ascii_only))
    except ValueError as e:
        print(f"hybridkv.sim: error: {e}", file=sys.stderr)
        return 2
    if args.plot:
        report.plot(results[-1], args.plot)
        print(f"plot written to {args.plot}")
    return 1 if any(r.errors for r in results) else 0


def _can_encode(stream: TextIO, text: str) -> bool:
    try:
        text.encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True
