"""Workloads for the simulator: sessions of turns, and seeded generators of them.

A session is a conversation; a turn is one request of it. Turn ``k`` of a session is sent
once turn ``k-1`` has finished, and its prompt is everything before plus its new tokens::

    turn k:  | prompt of turn k-1 | output of turn k-1 | new_ids of turn k |
    turn 0:  | new_ids of turn 0 (the whole prompt)   |

Every generator is deterministic in its ``seed`` and stops each session before its context
(prompt + ``max_new_tokens``, outputs being exactly ``max_new_tokens`` long) passes
``max_context``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

VOCAB = 32000


@dataclass(frozen=True, slots=True)
class Turn:
    """One request of a session.

    ``new_ids``: tokens appended this turn (on turn 0, the whole prompt). The turn arrives at
    step ``max(t, finish of the previous turn + gap)``.
    """

    new_ids: tuple[int, ...]
    max_new_tokens: int
    t: int = 0
    gap: int = 0


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    turns: tuple[Turn, ...]

    def context_lens(self) -> list[int]:
        """Prompt length of each turn (outputs are exactly ``max_new_tokens`` long)."""
        lens, total = [], 0
        for turn in self.turns:
            total += len(turn.new_ids)
            lens.append(total)
            total += turn.max_new_tokens
        return lens


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    sessions: tuple[Session, ...]

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def _tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(VOCAB) for _ in range(n))


class _Builder:
    """Collects sessions until ``requests`` turns exist; keeps contexts within ``max_context``."""

    def __init__(self, name: str, requests: int, max_context: int) -> None:
        if requests < 1:
            raise ValueError(f"requests must be positive, got {requests}")
        self.name, self.left, self.max_context = name, requests, max_context
        self.sessions: list[Session] = []

    @property
    def full(self) -> bool:
        return self.left == 0

    def add(self, sid: str, turns: list[Turn]) -> None:
        kept, total = [], 0
        for turn in turns[: self.left]:
            if total + len(turn.new_ids) + turn.max_new_tokens > self.max_context:
                break
            kept.append(turn)
            total += len(turn.new_ids) + turn.max_new_tokens
        if kept:
            self.sessions.append(Session(sid, tuple(kept)))
            self.left -= len(kept)

    def build(self) -> Workload:
        return Workload(self.name, tuple(self.sessions))


def chat(
    requests: int = 240,
    seed: int = 0,
    *,
    system_prompts: int = 6,
    system_len: tuple[int, int] = (200, 800),
    turns: tuple[int, int] = (1, 6),
    user_len: tuple[int, int] = (16, 160),
    output_len: tuple[int, int] = (16, 160),
    arrival_every: float = 6.0,
    think: tuple[int, int] = (0, 20),
    max_context: int = 8192,
) -> Workload:
    """Multi-turn chat: sessions arrive (exponential gaps, ``arrival_every`` steps on average)
    and open with one of a few shared system prompts, picked by a skewed (Zipf-like) weight."""
    rng = random.Random(seed)
    prompts = [_tokens(rng, rng.randint(*system_len)) for _ in range(system_prompts)]
    weights = [1 / (i + 1) for i in range(system_prompts)]
    out, t = _Builder("chat", requests, max_context), 0.0
    while not out.full:
        system = rng.choices(prompts, weights)[0]
        session = []
        for k in range(rng.randint(*turns)):
            user = _tokens(rng, rng.randint(*user_len))
            new = system + user if k == 0 else user
            session.append(Turn(new, rng.randint(*output_len), int(t), rng.randint(*think)))
        out.add(f"chat{len(out.sessions)}", session)
        t += rng.expovariate(1 / arrival_every)
    return out.build()


def agent(
    requests: int = 160,
    seed: int = 0,
    *,
    tools_len: int = 1200,
    task_len: tuple[int, int] = (50, 300),
    steps: tuple[int, int] = (4, 16),
    call_len: tuple[int, int] = (16, 64),
    tool_output_len: tuple[int, int] = (64, 480),
    arrival_every: float = 25.0,
    tool_latency: tuple[int, int] = (0, 4),
    max_context: int = 8192,
) -> Workload:
    """Agentic loops: a shared tool-definition prompt and a task, then rounds of a short
    tool call (the output) and a long tool result (the next turn's new tokens), so each
    context grows to thousands of tokens."""
    rng = random.Random(seed)
    tools = _tokens(rng, tools_len)
    out, t = _Builder("agent", requests, max_context), 0.0
    while not out.full:
        session = [
            Turn(tools + _tokens(rng, rng.randint(*task_len)), rng.randint(*call_len), int(t))
        ]
        for _ in range(rng.randint(*steps) - 1):
            result = _tokens(rng, rng.randint(*tool_output_len))
            session.append(Turn(result, rng.randint(*call_len), int(t), rng.randint(*tool_latency)))
        out.add(f"agent{len(out.sessions)}", session)
        t += rng.expovariate(1 / arrival_every)
    return out.build()


def docqa(
    requests: int = 240,
    seed: int = 0,
    *,
    documents: int = 8,
    doc_len: tuple[int, int] = (1000, 3000),
    question_len: tuple[int, int] = (12, 64),
    answer_len: tuple[int, int] = (16, 128),
    arrival_every: float = 2.0,
    max_context: int = 8192,
) -> Workload:
    """Long-document QA: independent one-turn questions about a few long documents, arriving
    interleaved; every question after the first about a document can hit its prefix."""
    rng = random.Random(seed)
    docs = [_tokens(rng, rng.randint(*doc_len)) for _ in range(documents)]
    out, t = _Builder("docqa", requests, max_context), 0.0
    while not out.full:
        doc = rng.randrange(documents)
        prompt = docs[doc] + _tokens(rng, rng.randint(*question_len))
        out.add(f"doc{doc}q{len(out.sessions)}", [Turn(prompt, rng.randint(*answer_len), int(t))])
        t += rng.expovariate(1 / arrival_every)
    return out.build()


GENERATORS = {"chat": chat, "agent": agent, "docqa": docqa}
