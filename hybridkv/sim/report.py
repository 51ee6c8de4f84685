"""Text reports of simulator runs: one run in full, or several side by side; and a plot."""

from __future__ import annotations

import dataclasses
import math
import statistics
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from hybridkv.scheduler import CacheConfig
from hybridkv.scheduler.hf_config import cache_bytes
from hybridkv.sim.models import byte_scale
from hybridkv.sim.run import SimResult, bytes_per_token
from hybridkv.sim.splits import swa_share

SPARK = "▁▂▃▄▅▆▇█"
SPARK_ASCII = " .:-=+*#"
TIERS = ("device", "host", "storage")
TRANSFERS = ("backed_up_tokens", "loaded_tokens", "loaded_swa_tokens", "loaded_states")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, math.ceil(q / 100 * len(ranked)) - 1))]


def sparkline(
    values: Sequence[float],
    width: int = 60,
    lo: float = 0.0,
    hi: float = 1.0,
    ascii_only: bool = False,
) -> str:
    """``values`` averaged into ``width`` buckets, each drawn as one of 8 levels of [lo, hi]."""
    chars = SPARK_ASCII if ascii_only else SPARK
    if not values:
        return ""
    n = min(width, len(values))
    out = []
    for b in range(n):
        chunk = values[b * len(values) // n : (b + 1) * len(values) // n]
        x = (sum(chunk) / len(chunk) - lo) / ((hi - lo) or 1)
        out.append(chars[min(len(chars) - 1, max(0, int(x * len(chars))))])
    return "".join(out)


def summary(res: SimResult) -> dict[str, object]:
    """The report's numbers as a flat dict (what tests and ``--compare`` read)."""
    s = res.stats
    scale = byte_scale(res.model) if res.model is not None else 1
    prefill = res.prefill_tokens
    full = [x.full_used for x in res.samples] or [0.0]
    swa = [x.swa_used for x in res.samples] or [0.0]
    memory = [x.memory_used for x in res.samples] or [0.0]
    out: dict[str, object] = {
        "workload": res.workload,
        "requests": res.requests,
        "added": res.added,
        "finished": res.finished,
        "steps": res.steps,
        "wall_s": res.wall_s,
        "prompt_tokens": res.prompt_tokens,
        "prefill_tokens": prefill,
        "output_tokens": res.output_tokens,
        "served_tokens": res.prompt_tokens + res.output_tokens,
        "computed_tokens": s.get("computed_tokens", 0),
        "prefill_computed_tokens": s.get("prefill_computed_tokens", 0),
    }
    for tier in TIERS:
        out[f"{tier}_hit_rate"] = s.get(f"{tier}_hit_tokens", 0) / prefill if prefill else 0.0
    out["hit_rate"] = sum(out[f"{t}_hit_rate"] for t in TIERS)  # type: ignore[misc]
    for key in TRANSFERS:
        out[key] = s.get(key, 0)
    out |= {
        "overhead_median_us": statistics.median(res.overhead_us) if res.overhead_us else 0.0,
        "overhead_p99_us": percentile(res.overhead_us, 99),
        "full_used_min": min(full),
        "full_used_mean": sum(full) / len(full),
        "full_used_max": max(full),
        "swa_used_min": min(swa),
        "swa_used_mean": sum(swa) / len(swa),
        "swa_used_max": max(swa),
        "memory_bytes": s.get("memory_bytes", 0) * scale,
        "memory_used_mean": sum(memory) / len(memory),
        "memory_used_max": max(memory),
        "output_tokens_per_step": res.output_tokens / res.steps if res.steps else 0.0,
        "evicted_full_tokens": s.get("evicted_full_tokens", 0),
        "evicted_swa_tokens": s.get("evicted_swa_tokens", 0),
        "retractions": s.get("retracted_requests", 0),
        "bytes_moved": bytes_moved(s, res.shape),
        "ooms": res.count("oom"),
        "errors": len(res.errors),
        "truncated": res.truncated,
    }
    return out


def bytes_moved(stats: dict[str, int], cfg: CacheConfig) -> int:
    """Bytes copied between device and host: backups (at every attention layer's bytes per
    token, an upper bound: a backup copies SWA KV only where it has it), and load backs of
    full KV, SWA KV and state snapshots, each at its own size."""
    per = cache_bytes(cfg)
    return (
        stats.get("backed_up_tokens", 0) * bytes_per_token(cfg)
        + stats.get("loaded_tokens", 0) * per["full"]
        + stats.get("loaded_swa_tokens", 0) * per["swa"]
        + stats.get("loaded_states", 0) * per["state"]
    )


def config_dict(cfg: CacheConfig) -> dict[str, object]:
    """``cfg``'s fields as JSON-ready values (dtype as its name)."""
    out = dataclasses.asdict(cfg)
    out["dtype"] = str(cfg.dtype).removeprefix("torch.")
    return out


def to_json(res: SimResult) -> dict[str, object]:
    """What ``--json`` prints for one run: the summary, the config and any errors."""
    out = summary(res) | {"config": config_dict(res.shape)}
    if res.model is not None:
        out["simulated_config"] = config_dict(res.config)
    out["error_list"] = [e._asdict() | {"detail": None} for e in res.errors]
    return out


def describe(cfg: CacheConfig) -> str:
    """One line on the model shape and pools of ``cfg``."""
    full, swa, rec = len(cfg.full_layer_ids), len(cfg.swa_layer_ids), len(cfg.mamba_layer_ids)
    layers = f"{cfg.num_layers} layers ({full} full, {swa} SWA, window {cfg.sliding_window})"
    if not swa:
        layers = f"{cfg.num_layers} full-attention layers"
    if rec:
        kinds = f"{full} full" + (f", {swa} SWA, window {cfg.sliding_window}" if swa else "")
        shape = "x".join(map(str, cfg.state_shape))
        layers = (
            f"{cfg.num_layers} layers ({kinds}, {rec} recurrent of state {shape}, "
            f"{cfg.state_slots} state slots)"
        )
    host = f"host {cfg.host_tokens} tokens, {cfg.write_policy}" if cfg.host_tokens else "host off"
    pools = f"full pool {cfg.full_tokens}" + (f", SWA pool {cfg.swa_tokens}" if swa else "")
    pools += " tokens"
    if cfg.arena:
        pools = f"one arena of {_size(cfg.memory_bytes)} for every pool"
    dtype = str(cfg.dtype).removeprefix("torch.")
    return (
        f"{layers}, page {cfg.page_size}, {cfg.num_kv_heads} kv heads x {cfg.head_dim}, {dtype}; "
        f"{pools}; {host}; storage {cfg.storage or 'off'}; "
        f"backend {cfg.backend or 'auto'} on {cfg.device}; SWA eviction {cfg.swa_eviction}"
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _line(key: str, value: str) -> str:
    return f"  {key:<15}{value}"


def format_report(res: SimResult, ascii_only: bool = False) -> str:
    """The full text report of one run."""
    m, cfg, samples = summary(res), res.shape, res.samples
    served, computed = m["served_tokens"], m["computed_tokens"]
    peak = max((x.running for x in samples), default=0)

    def spark(values: list[float], hi: float = 1.0) -> str:
        return "|" + sparkline(values, hi=hi, ascii_only=ascii_only) + "|"

    hits = "  ".join(f"{t} {_pct(m[f'{t}_hit_rate'])}" for t in TIERS)
    prefill = m["prefill_tokens"]
    hits += f"  computed {_pct(m['prefill_computed_tokens'] / prefill if prefill else 0)}"
    stopped = " -- stopped by --max-steps" if res.truncated else ""
    verified = "on" if res.verify else "OFF"
    lines = [
        f"hybridkv sim: workload {res.workload}",
        _line("config", describe(cfg)),
        *([_line("", "(simulated on one layer of each kind, same pools)")] if res.model else []),
        _line(
            "requests", f"{m['finished']}/{m['requests']} finished ({m['added']} added){stopped}"
        ),
        _line("steps", f"{m['steps']:,} in {m['wall_s']:.1f} s wall (KV verification {verified})"),
        _line("prefix hits", f"{hits}  (of {m['prefill_tokens']:,} prefill tokens)"),
        _line(
            "tokens",
            f"served {served:,} (prompt {m['prompt_tokens']:,} + output {m['output_tokens']:,});"
            f" computed {computed:,} ({_pct(computed / served if served else 0)} of served)",
        ),
        _line(
            "overhead",
            f"schedule+commit per step: median {m['overhead_median_us']:,.0f} us, "
            f"p99 {m['overhead_p99_us']:,.0f} us",
        ),
        _line(
            "pool use",
            f"min/mean/max  full {m['full_used_min']:.2f}/{m['full_used_mean']:.2f}/"
            f"{m['full_used_max']:.2f}  SWA {m['swa_used_min']:.2f}/{m['swa_used_mean']:.2f}/"
            f"{m['swa_used_max']:.2f}  (over {len(samples):,} steps:)",
        ),
        _line(
            "memory use",
            f"mean {m['memory_used_mean']:.2f}, max {m['memory_used_max']:.2f} of "
            f"{_size(m['memory_bytes'])} (pages of any pool holding running or cached KV)",
        ),
        _line("  full used", spark([x.full_used for x in samples])),
        _line("  SWA used", spark([x.swa_used for x in samples])),
        _line("  hit rate", spark([x.hit_rate for x in samples]) + " cumulative"),
        _line("  running", spark([x.running for x in samples], hi=peak) + f" peak {peak}"),
        _line(
            "evictions",
            f"full {m['evicted_full_tokens']:,} tokens, SWA {m['evicted_swa_tokens']:,} tokens",
        ),
        _line("retractions", f"{m['retractions']:,}"),
        _line(
            "host<->device",
            f"{_size(m['bytes_moved'])}: backed up {m['backed_up_tokens']:,} tokens; loaded "
            f"back {m['loaded_tokens']:,} full + {m['loaded_swa_tokens']:,} SWA tokens, "
            f"{m['loaded_states']:,} states",
        ),
        _line("OOMs", str(m["ooms"])),
    ]
    for e in res.errors:
        lines.append(_line("ERROR", f"{e.kind} at step {e.step}: {e.message}"))
    if m["retractions"]:
        lines.append("  (a retracted request prefills again: its hits and tokens count again)")
    return "\n".join(lines)


COLUMNS = (
    ("hit rate", "hit_rate", "{:.1%}"),
    ("computed", "computed_tokens", "{:,}"),
    ("steps", "steps", "{:,}"),
    ("evict full", "evicted_full_tokens", "{:,}"),
    ("evict SWA", "evicted_swa_tokens", "{:,}"),
    ("retract", "retractions", "{:,}"),
    ("med us", "overhead_median_us", "{:,.0f}"),
    ("p99 us", "overhead_p99_us", "{:,.0f}"),
    ("OOMs", "ooms", "{}"),
    ("wall s", "wall_s", "{:.1f}"),
)


def format_compare(rows: Sequence[tuple[str, SimResult | str]]) -> str:
    """A table of runs, one per ``(policy, result)``; a ``str`` result is shown as-is."""
    header = ["policy", *(c[0] for c in COLUMNS)]
    return _runs_table(header, rows, lambda res: _cells(summary(res), COLUMNS))


def _cells(m: dict[str, object], columns: Sequence[tuple[str, str, str]]) -> list[str]:
    return [fmt.format(m[key]) for _, key, fmt in columns]


def _runs_table(
    header: list[str],
    rows: Sequence[tuple[str, SimResult | str]],
    cells: Callable[[SimResult], list[str]],
) -> str:
    """One line per ``(name, result)``: the name and ``cells(result)``, or a ``str`` result
    as-is; then a note per error of each run."""
    table: list[list[str]] = []
    notes: list[str] = []
    for name, res in rows:
        if isinstance(res, str):
            table.append([name, res])
            continue
        table.append([name, *cells(res)])
        notes += [f"{name}: ERROR {e.kind} at step {e.step}: {e.message}" for e in res.errors]
    return "\n".join([_table(header, table), *notes])


def plot(res: SimResult, path: str | Path) -> None:
    """Hit rate by tier and pool occupancy over steps, to ``path`` (needs matplotlib); the
    title carries the workload and config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [x.step for x in res.samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(10, 7))
    tiers = [[getattr(x, f"{t}_hit_rate") for x in res.samples] for t in TIERS]
    ax1.stackplot(steps, *tiers, labels=[f"{t} hits" for t in TIERS], alpha=0.8)
    ax1.plot(steps, [x.hit_rate for x in res.samples], color="black", lw=1, label="total")
    ax1.set_ylabel("prefix hit rate (cumulative)")
    ax1.set_ylim(0, 1)
    ax1.legend(loc="upper left", fontsize="small")
    ax2.plot(steps, [x.full_used for x in res.samples], label="full pool used")
    if res.config.has_swa:
        ax2.plot(steps, [x.swa_used for x in res.samples], label="SWA pool used")
    ax2.set_ylabel("fraction of pool")
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("step")
    ax2.legend(loc="lower right")
    title = f"hybridkv sim: {res.workload}, {res.requests} requests -- {describe(res.shape)}"
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


SPLIT_COLUMNS = (
    ("steps", "steps", "{:,}"),
    ("vs default", "speedup", "{:.2f}x"),
    ("hit rate", "hit_rate", "{:.1%}"),
    ("mem util", "memory_used_mean", "{:.1%}"),
    ("out tok/step", "output_tokens_per_step", "{:.1f}"),
    ("computed", "computed_tokens", "{:,}"),
    ("retract", "retractions", "{:,}"),
    ("evict full", "evicted_full_tokens", "{:,}"),
    ("evict SWA", "evicted_swa_tokens", "{:,}"),
    ("OOMs", "ooms", "{}"),
    ("wall s", "wall_s", "{:.1f}"),
)


def _split_pools(cfg: CacheConfig) -> tuple[float | None, int | None, int | None]:
    """``(SWA share of the bytes, full pool tokens, SWA pool tokens)`` of a static split;
    ``None`` for each in an arena (the pools change with demand)."""
    if cfg.arena:
        return None, None, None
    return swa_share(cfg), cfg.full_tokens, cfg.swa_tokens


def split_row(res: SimResult, default_steps: int) -> dict[str, object]:
    """The summary of one ``--compare splits`` row, with its pools (``None`` in an arena)
    and its speedup in steps over the default split (``default_steps``; 0: that did not
    finish cleanly)."""
    share, full, swa = _split_pools(res.shape)
    speedup = default_steps / res.steps if res.steps and default_steps else 0.0
    return summary(res) | {
        "swa_share": share,
        "full_pool": full,
        "swa_pool": swa,
        "speedup": speedup,
    }


def format_splits(rows: Sequence[tuple[str, SimResult | str]], default_steps: int) -> str:
    """The ``--compare splits`` table: one ``(split, result)`` per line, a ``str`` result
    (why the split cannot run) shown as-is; speedups over ``default_steps``."""
    header = ["split", "SWA share", "full pool", "SWA pool", *(c[0] for c in SPLIT_COLUMNS)]

    def cells(res: SimResult) -> list[str]:
        m = split_row(res, default_steps)
        pools = ["by demand", "arena", "arena"]
        if m["swa_share"] is not None:
            pools = [_pct(m["swa_share"]), f"{m['full_pool']:,}", f"{m['swa_pool']:,}"]
        return pools + _cells(m, SPLIT_COLUMNS)

    return _runs_table(header, rows, cells)


def _table(header: list[str], table: list[list[str]]) -> str:
    """``header`` and ``table`` right-aligned in columns; a two-cell row's second cell spans."""
    full_rows = [r for r in [header, *table] if len(r) > 2]
    widths = [max(len(r[i]) for r in full_rows) for i in range(len(header))]
    widths[0] = max(len(r[0]) for r in [header, *table])
    out = []
    for r in [header, *table]:
        cells = [r[0].ljust(widths[0])]
        if len(r) == 2:
            cells.append(r[1])
        else:
            cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
