"""JSONL traces: one request per line, read into (and written from) a :class:`Workload`.

Each line is a JSON object::

    {"t": 12, "input_ids": [101, 7, ...], "max_new_tokens": 64, "session": "user-3"}

- ``t``: arrival step (int >= 0); a follow-up turn arrives no earlier than its previous turn
  finishes, so within a session ``t`` is the earliest step.
- ``input_ids``: the prompt of a session's first line; on a later line of the same session,
  only the tokens that turn appends (the simulator prepends the previous prompt and that
  turn's actual output, as a chat client would).
- ``max_new_tokens``: positive int.
- ``session`` (optional): str or int; a line without one is a session of its own.

Blank lines are skipped. Anything else wrong is a ``ValueError`` naming the line and the
field; nothing is returned from a trace with a bad line.
"""

from __future__ import annotations

import json
from pathlib import Path

from hybridkv.sim.workloads import Session, Turn, Workload

FIELDS = ("t", "input_ids", "max_new_tokens", "session")


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_line(text: str, lineno: int) -> tuple[str | None, Turn]:
    """Parse one trace line into ``(session or None, Turn)``; ``ValueError`` naming the field."""

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"trace line {lineno}: field {field!r}: {why}")

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"trace line {lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"trace line {lineno}: expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in FIELDS:
            raise bad(key, f"unknown field (expected {', '.join(FIELDS)})")
    for key in ("t", "input_ids", "max_new_tokens"):
        if key not in obj:
            raise bad(key, "missing")
    t, ids, n = obj["t"], obj["input_ids"], obj["max_new_tokens"]
    if not _int(t) or t < 0:
        raise bad("t", f"must be an int >= 0, got {t!r}")
    if not isinstance(ids, list) or not ids:
        raise bad("input_ids", "must be a non-empty list of token ids")
    for i, tok in enumerate(ids):
        if not _int(tok) or tok < 0:
            raise bad("input_ids", f"element {i} must be an int >= 0, got {tok!r}")
    if not _int(n) or n < 1:
        raise bad("max_new_tokens", f"must be a positive int, got {n!r}")
    session = obj.get("session")
    if session is not None and (not isinstance(session, str | int) or isinstance(session, bool)):
        raise bad("session", f"must be a string or an int, got {session!r}")
    return (None if session is None else str(session)), Turn(tuple(ids), n, t)


def parse_trace(lines: list[str], name: str = "trace", max_context: int | None = None) -> Workload:
    """Build a workload from trace lines (see the module docstring).

    ``max_context``: if given, a line whose session would grow past it (prompt plus
    ``max_new_tokens``) is an error naming the line.
    """
    sessions: dict[str, list[Turn]] = {}
    totals: dict[str, int] = {}
    last_t: dict[str, int] = {}
    for lineno, text in enumerate(lines, 1):
        if not text.strip():
            continue
        sid, turn = parse_line(text, lineno)
        if sid is None:
            sid = f"<line {lineno}>"
        if turn.t < last_t.get(sid, 0):
            raise ValueError(
                f"trace line {lineno}: field 't': {turn.t} is before the previous turn of "
                f"session {sid!r} (t={last_t[sid]})"
            )
        total = totals.get(sid, 0) + len(turn.new_ids) + turn.max_new_tokens
        if max_context is not None and total > max_context:
            raise ValueError(
                f"trace line {lineno}: field 'input_ids': session {sid!r} grows to {total} "
                f"tokens (prompt + max_new_tokens) > {max_context}, the most the config holds"
            )
        sessions.setdefault(sid, []).append(turn)
        totals[sid], last_t[sid] = total, turn.t
    if not sessions:
        raise ValueError("trace has no requests")
    return Workload(name, tuple(Session(sid, tuple(turns)) for sid, turns in sessions.items()))


def load_trace(path: str | Path, max_context: int | None = None) -> Workload:
    """Read a JSONL trace file; ``ValueError`` naming the line and field of a bad line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read trace {str(path)!r}: {e.strerror}") from None
    return parse_trace(text.splitlines(), path.name, max_context)


def dump_trace(workload: Workload) -> list[str]:
    """Trace lines of ``workload`` (``t`` of a follow-up turn is its earliest step; think
    gaps after a previous turn are not representable and are dropped)."""
    lines = []
    for session in workload.sessions:
        for turn in session.turns:
            row = {
                "t": turn.t,
                "input_ids": list(turn.new_ids),
                "max_new_tokens": turn.max_new_tokens,
                "session": session.sid,
            }
            lines.append(json.dumps(row, separators=(",", ":")))
    return lines
