"""``python -m hybridkv.sim``: replay a workload through the manager and print a report.

Exit status: 0 when the run is clean, 1 when it hit an OOM, a KV verification failure, an
invariant violation or a stall, 2 for bad arguments, a bad trace or a config that cannot
work (nothing is run then).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from hybridkv.scheduler import CacheConfig
from hybridkv.scheduler.hf_config import from_hf_config
from hybridkv.sim import report, splits
from hybridkv.sim.models import PRESETS, stand_in
from hybridkv.sim.run import SimResult, max_context, run, validate
from hybridkv.sim.trace import dump_trace, load_trace
from hybridkv.sim.workloads import GENERATORS, Workload

GiB = 1 << 30
# The default model's pools, sized so the default chat workload evicts but does not thrash.
SMALL_POOLS = dict(full_tokens=32768, swa_tokens=12288, host_tokens=65536)
DEFAULT_MEMORY_GIB = 4.0  # a --model or --hf-config run without --memory
HELP_EPILOG = """\
workloads (token counts; time in engine steps):
  chat    multi-turn sessions opening with one of 6 shared system prompts (200-800
          tokens, Zipf-like popularity); 1-6 turns of 16-160 new tokens and 16-160
          output tokens; a session every ~6 steps; 240 requests by default
  agent   a shared 1200-token tool prompt and a task, then 4-16 rounds of a 16-64
          token tool call and a 64-480 token tool result; 160 requests by default
  docqa   one-turn questions (12-64 tokens) about 8 long documents (1000-3000
          tokens); a question every ~2 steps; 240 requests by default
  trace   a JSONL file, one request a line (docs/simulator.md):
          {"t": 0, "input_ids": [1, 2], "max_new_tokens": 64, "session": "a"}

models: the default "small" (8 layers: 2 full, 6 SWA, window 256) uses the
--full-tokens/--swa-tokens pools; the other presets and --hf-config size pools from
--memory (default 4 GiB) and simulate on one layer of each kind (docs/simulator.md).

exit status: 0 clean, 1 an OOM, KV verification failure, invariant violation or stall,
2 bad arguments, trace or config (nothing run).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hybridkv.sim",
        description="Replay a serving workload through hybridkv's MemoryManager with a "
        "model-free engine that verifies every request's KV each step.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w = p.add_argument_group("workload")
    w.add_argument(
        "--workload",
        choices=[*GENERATORS, "trace"],
        default=None,
        help="generated workload, or 'trace' (default: chat; trace with --trace)",
    )
    w.add_argument("--trace", metavar="FILE", help="JSONL trace (format: docs/simulator.md)")
    w.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="requests (turns) to generate (default: per workload, above)",
    )
    w.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    w.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps (default: none)")
    w.add_argument("--dump-trace", metavar="FILE", help="write the workload as JSONL and exit")
    m = p.add_argument_group("model")
    src = m.add_mutually_exclusive_group()
    src.add_argument(
        "--model", choices=sorted(PRESETS), default="small", help="model shape (default small)"
    )
    src.add_argument(
        "--hf-config", metavar="PATH", help="a Hugging Face config.json (or its directory)"
    )
    m.add_argument(
        "--memory",
        type=float,
        metavar="GiB",
        help="device memory for the KV and state pools, GiB (default: --full-tokens and "
        f"--swa-tokens for small, {DEFAULT_MEMORY_GIB:g} GiB otherwise)",
    )
    m.add_argument(
        "--swa-ratio",
        type=float,
        default=0.8,
        metavar="R",
        help="with --memory: SWA pool tokens per full pool token (default 0.8)",
    )
    m.add_argument(
        "--state-share",
        type=float,
        default=0.5,
        metavar="F",
        help="with --memory: fraction of it for recurrent-state slots (default 0.5)",
    )
    c = p.add_argument_group("cache config")
    c.add_argument(
        "--full-tokens",
        type=int,
        metavar="TOKENS",
        help=f"full pool, tokens (default {SMALL_POOLS['full_tokens']} for small, else from "
        "--memory)",
    )
    c.add_argument(
        "--swa-tokens",
        type=int,
        metavar="TOKENS",
        help=f"SWA pool, tokens (default {SMALL_POOLS['swa_tokens']} for small, else from "
        "--memory)",
    )
    c.add_argument(
        "--host-tokens",
        type=int,
        metavar="TOKENS",
        help=f"host tier, tokens; 0: off (default {SMALL_POOLS['host_tokens']} for small, "
        "twice the full pool otherwise)",
    )
    c.add_argument("--page-size", type=int, default=16, metavar="TOKENS", help="(default 16)")
    c.add_argument(
        "--window", type=int, metavar="TOKENS", help="sliding window (default: the model's)"
    )
    c.add_argument(
        "--write-policy",
        default="write_through",
        choices=["write_through", "write_back", "write_through_selective"],
        help="host tier backups (default write_through)",
    )
    c.add_argument("--storage", metavar="DIR", help="storage tier directory (default: off)")
    c.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    c.add_argument(
        "--swa-eviction", choices=["window", "lru"], default="window", help="(default window)"
    )
    c.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    s = p.add_argument_group("scheduler")
    s.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=CacheConfig.chunked_prefill_size,
        metavar="TOKENS",
        help=f"longest prefill chunk (default {CacheConfig.chunked_prefill_size})",
    )
    s.add_argument(
        "--max-running",
        type=int,
        default=CacheConfig.max_running_requests,
        metavar="N",
        help=f"most running requests (default {CacheConfig.max_running_requests})",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--compare",
        nargs="?",
        const="policies",
        choices=["policies", "splits"],
        help="run the workload several ways and print one table: 'policies' (the default) "
        "the prefix cache and tier policies; 'splits' the arena and static "
        "full/SWA splits of the same --memory, SWA shares 10%%..90%% and --swa-ratio",
    )
    o.add_argument("--json", action="store_true", help="print results as JSON, no text report")
    o.add_argument(
        "--plot", metavar="PNG", help="plot hit rate by tier and pool use (needs matplotlib)"
    )
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


def _is_small(args: argparse.Namespace) -> bool:
    return not args.hf_config and args.model == "small"


def _default_host(args: argparse.Namespace, cfg: CacheConfig) -> int:
    if args.host_tokens is not None:
        return args.host_tokens
    return SMALL_POOLS["host_tokens"] if _is_small(args) else 2 * cfg.full_tokens


def make_model(args: argparse.Namespace, **changes: object) -> tuple[CacheConfig, bool]:
    """The real model's config of the flags (``changes`` applied last), and whether the run
    needs a stand-in (every model but the default small one). ``ValueError`` if it cannot
    work."""
    hf = args.hf_config if args.hf_config else PRESETS[args.model]
    small = _is_small(args)
    memory = args.memory
    if memory is None and not small:
        memory = DEFAULT_MEMORY_GIB
    overrides: dict[str, object] = dict(
        page_size=args.page_size,
        write_policy=args.write_policy,
        swa_eviction=args.swa_eviction,
        backend=None if args.backend == "auto" else args.backend,
        chunked_prefill_size=args.chunked_prefill_size,
        max_running_requests=args.max_running,
        host_tokens=0,  # NOTE: the tiers go on last, so their errors name the tier flags
        storage=None,
        vocab_size=None,  # NOTE: workload ids are synthetic (and salted), not the model's
    )
    if memory is None:
        overrides |= {k: v for k, v in SMALL_POOLS.items() if k != "host_tokens"}
    for key in ("full_tokens", "swa_tokens"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.window is not None:
        overrides["sliding_window"] = args.window
    if args.device is not None:
        overrides["device"] = args.device
    budget = None if memory is None else int(memory * GiB)
    cfg = from_hf_config(
        hf,
        budget,
        swa_full_tokens_ratio=args.swa_ratio,
        state_share=args.state_share,
        **overrides,
    )
    tiers = dict(host_tokens=_default_host(args, cfg), storage=args.storage)
    return cfg.replace(**(tiers | changes)), not small


def make_config(args: argparse.Namespace, **changes: object) -> CacheConfig:
    """The real model's CacheConfig of the flags (``ValueError`` if it cannot work)."""
    return make_model(args, **changes)[0]


def make_configs(
    args: argparse.Namespace, **changes: object
) -> tuple[CacheConfig, CacheConfig | None]:
    """``(config to run on, real model config or None)``: see :mod:`hybridkv.sim.models`."""
    cfg, needs_stand_in = make_model(args, **changes)
    return (stand_in(cfg), cfg) if needs_stand_in else (cfg, None)


def make_workload(args: argparse.Namespace, max_context: int) -> Workload:
    if args.workload == "trace":
        if not args.trace:
            raise ValueError("--workload trace needs --trace FILE")
        return load_trace(args.trace, max_context)
    gen = GENERATORS[args.workload]
    kwargs = {} if args.requests is None else {"requests": args.requests}
    return gen(seed=args.seed, max_context=max_context, **kwargs)


class Progress:
    """A tqdm bar of finished requests on stderr (``None`` when quiet)."""

    def __init__(self, label: str, total: int, quiet: bool) -> None:
        # NOTE: off a terminal (a log, CI) a redraw is a line: draw one every 5 s there
        every = 0.2 if sys.stderr.isatty() else 5.0
        self.bar = None
        if not quiet:
            self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, mininterval=every)

    def __call__(self, res: SimResult) -> None:
        if self.bar is not None:
            self.bar.update(res.finished - self.bar.n)
            self.bar.set_postfix(step=res.steps, refresh=False)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(
    args: argparse.Namespace,
    workload: Workload,
    configs: tuple[CacheConfig, CacheConfig | None],
    label: str,
    salt: bool = False,
) -> SimResult:
    bar = Progress(label, workload.num_requests, args.quiet)
    res = run(
        workload,
        configs[0],
        salt=salt,
        max_steps=args.max_steps,
        check_every=args.check_every,
        progress=bar,
        model=configs[1],
    )
    bar.done()
    for e in res.errors:
        if e.detail:
            print(f"{label}: {e.kind} at step {e.step}:\n{e.detail}", file=sys.stderr)
    return res


def compare(
    args: argparse.Namespace, workload: Workload, base: CacheConfig
) -> list[tuple[str, SimResult | str]]:
    """The workload under each policy; a config that raises shows as ``n/a``."""
    device_only = dict(host_tokens=0, storage=None)
    host = dict(host_tokens=_default_host(args, base) or 4 * base.full_tokens)
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
                configs = make_configs(args, **changes)
            except ValueError as e:
                rows.append((name, f"n/a ({e})"))
                continue
            rows.append((name, _run(args, workload, configs, name, salt)))
    return rows


def compare_splits(
    args: argparse.Namespace, workload: Workload, base: CacheConfig
) -> list[tuple[str, SimResult | str]]:
    """The workload, device-only, under the arena, the default
    split (``--swa-ratio``) and the static splits of :data:`splits.SHARES` of the same
    budget; a split that cannot work shows as ``n/a``."""
    if args.memory is None and _is_small(args):
        raise ValueError("--compare splits needs --memory (the budget the splits share)")
    budget = int((args.memory or DEFAULT_MEMORY_GIB) * GiB)
    device_only: dict[str, object] = dict(host_tokens=0, storage=None)
    rows: list[tuple[str, dict[str, object]]] = [("arena", device_only | {"memory_bytes": budget})]
    rows.append((f"default (ratio {args.swa_ratio:g})", device_only))
    for share in splits.SHARES:
        pools = splits.split_pools(base, budget, share, args.state_share)
        rows.append((f"SWA {share:.0%}", device_only | pools))
    out: list[tuple[str, SimResult | str]] = []
    for name, changes in rows:
        try:
            configs = make_configs(args, **changes)
            validate(workload, configs[0])
        except ValueError as e:
            out.append((name, f"n/a ({e})"))
            continue
        out.append((name, _run(args, workload, configs, name)))
    return out


def _default_steps(rows: list[tuple[str, SimResult | str]]) -> int:
    """Steps of the default split's row (0 where it did not finish cleanly)."""
    res = next(r for n, r in rows if n.startswith("default"))
    return res.steps if isinstance(res, SimResult) and not res.errors else 0


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
        tiers = dict(host_tokens=0, storage=None) if args.compare else {}
        configs = make_configs(args, **tiers)
        cfg = configs[1] or configs[0]
        workload = make_workload(args, max_context(cfg))
        if args.dump_trace:
            Path(args.dump_trace).write_text("\n".join(dump_trace(workload)) + "\n")
            print(f"wrote {workload.num_requests} requests to {args.dump_trace}")
            return 0
        if args.compare == "splits":
            rows = compare_splits(args, workload, cfg)
            default_steps = _default_steps(rows)
            if args.json:
                out = [{"split": n, **_json_split(r, default_steps)} for n, r in rows]
                doc = {
                    "workload": workload.name,
                    "memory_bytes": int((args.memory or DEFAULT_MEMORY_GIB) * GiB),
                    "rows": out,
                }
                print(json.dumps(doc, indent=1))
            else:
                print(
                    f"hybridkv sim --compare splits: workload {workload.name}, "
                    f"{workload.num_requests} requests, {args.memory or DEFAULT_MEMORY_GIB:g}"
                    f" GiB device-only\n  model: {report.describe(cfg)}\n"
                )
                print(report.format_splits(rows, default_steps))
            results = [r for _, r in rows if not isinstance(r, str)]
        elif args.compare:
            rows = compare(args, workload, cfg)
            if args.json:
                out = [{"policy": n, **_json_row(r)} for n, r in rows]
                print(json.dumps({"workload": workload.name, "rows": out}, indent=1))
            else:
                print(
                    f"hybridkv sim --compare: workload {workload.name}, "
                    f"{workload.num_requests} requests\n  config: {report.describe(cfg)}\n"
                )
                print(report.format_compare(rows))
            results = [r for _, r in rows if not isinstance(r, str)]
        else:
            results = [_run(args, workload, configs, workload.name)]
            if args.json:
                print(json.dumps(report.to_json(results[0]), indent=1))
            else:
                print(report.format_report(results[0], ascii_only))
    except ValueError as e:
        print(f"hybridkv.sim: error: {e}", file=sys.stderr)
        return 2
    if args.plot:
        report.plot(results[-1], args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 1 if any(r.errors for r in results) else 0


def _json_row(res: SimResult | str) -> dict[str, object]:
    return {"skipped": res} if isinstance(res, str) else report.to_json(res)


def _json_split(res: SimResult | str, default_steps: int) -> dict[str, object]:
    if isinstance(res, str):
        return {"skipped": res}
    return report.to_json(res) | report.split_row(res, default_steps)


def _can_encode(stream: TextIO, text: str) -> bool:
    try:
        text.encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True
