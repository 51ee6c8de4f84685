"""A model-free engine: K/V are codes of each token's prefix, checked before every step.

The code of position ``p`` is a rolling hash of ``tokens[:p+1]``, stored as small integers
(exact in every float dtype). Reading a wrong page, a stale slot or another request's KV
shows up as a code mismatch. Recurrent layers get the same treatment: a request's state
after ``n`` tokens is a code of ``tokens[:n]``, checked whenever a step resumes from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridkv.scheduler import MemoryManager, Request, StepPlan

_MOD = (1 << 61) - 1
_BASE = 1_000_003


@dataclass(slots=True)
class _Seq:
    tokens: list[int]
    hashes: list[int] = field(default_factory=list)

    def hash_upto(self, n: int) -> list[int]:
        """Prefix hashes of positions ``[0, n)``."""
        h = self.hashes[-1] if self.hashes else 0
        for t in self.tokens[len(self.hashes) : n]:
            h = (h * _BASE + t + 1) % _MOD
            self.hashes.append(h)
        return self.hashes[:n]


class FakeEngine:
    """Drives a :class:`MemoryManager` like a forward loop and verifies KV integrity."""

    def __init__(self, mm: MemoryManager, vocab: int = 32000, verify: bool = True) -> None:
        self.mm = mm
        self.vocab = vocab
        self.verify = verify
        self.seqs: dict[str, _Seq] = {}
        cfg = mm.config
        self.window = cfg.window
        self.full_layer = cfg.full_layer_ids[0] if cfg.full_layer_ids else None
        self.swa_layer = cfg.swa_layer_ids[0] if cfg.swa_layer_ids else None
        self.attn_layers = cfg.full_layer_ids + list(cfg.swa_layer_ids)
        self.mamba_layers = list(cfg.mamba_layer_ids)
        self.outputs: dict[str, list[int]] = {}

    def add(self, request: Request) -> None:
        self.mm.add_request(request)
        self.seqs[request.rid] = _Seq(list(request.input_ids))
        self.outputs[request.rid] = []

    def step(self) -> tuple[StepPlan | None, list[str]]:
        """One schedule/forward/commit round; returns the plan and the finished rids."""
        plan = self.mm.schedule()
        if plan is None:
            return None, []
        plan.wait()  # before attention reads the prefix: load backs land first
        if self.verify:
            for sreq in plan.reqs:
                self._verify_prefix(sreq.rid, sreq.extend_start)
                if self.mamba_layers:
                    self._verify_state(sreq.rid, sreq.state_slot, sreq.extend_start)
        codes = []
        for sreq in plan.reqs:
            hashes = self.seqs[sreq.rid].hash_upto(sreq.extend_start + sreq.extend_len)
            codes.extend(hashes[sreq.extend_start :])
        k, v = self._kv(codes)
        for layer in self.attn_layers:
            self.mm.kv.set_kv(layer, plan.out_cache_loc, k, v)
        if self.mamba_layers:
            self._write_states(plan)
        tokens = []
        for sreq in plan.reqs:
            h = self.seqs[sreq.rid].hashes[sreq.extend_start + sreq.extend_len - 1]
            tokens.append(int(h % self.vocab))
        finished = self.mm.commit(plan, tokens)
        for sreq, token in zip(plan.reqs, tokens, strict=True):
            if sreq.produces_token and sreq.rid in self.seqs:
                self.seqs[sreq.rid].tokens.append(token)
                self.outputs[sreq.rid].append(token)
        for rid in finished:
            del self.seqs[rid]
        return plan, finished

    def _kv(self, codes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.mm.config
        c = torch.tensor(codes, dtype=torch.int64)
        shape = (len(codes), cfg.num_kv_heads, cfg.head_dim)
        k = (c % 256).to(cfg.dtype)[:, None, None].expand(shape)
        v = ((c >> 8) % 256).to(cfg.dtype)[:, None, None].expand(shape)
        return k.to(self.mm.device), v.to(self.mm.device)

    def _state(self, h: int | None) -> torch.Tensor:
        """The state code of a prefix hash (``None``: the empty prefix, all zeros)."""
        shape = self.mm.config.state_shape
        x = torch.zeros(shape, dtype=torch.int64).flatten()
        if h is not None:
            k = min(x.numel(), 7)
            x[:k] = torch.tensor([(h >> (8 * i)) % 255 + 1 for i in range(k)])
        return x.view(shape).to(self.mm.config.dtype)

    def _write_states(self, plan: StepPlan) -> None:
        slots, states = [], []
        for sreq in plan.reqs:
            h = self.seqs[sreq.rid].hashes[sreq.extend_start + sreq.extend_len - 1]
            slots.append(sreq.state_slot)
            states.append(self._state(h))
        slot_t = torch.tensor(slots, dtype=torch.int64, device=self.mm.device)
        x = torch.stack(states).to(self.mm.device)
        for j, layer in enumerate(self.mamba_layers):
            self.mm.states.set_state(layer, slot_t, x + j)

    def _verify_state(self, rid: str, slot: int, n: int) -> None:
        """Assert the state slot holds the state after exactly ``n`` tokens in every layer."""
        assert slot > 0, f"{rid}: no state slot"
        h = self.seqs[rid].hash_upto(n)[-1] if n else None
        want = self._state(h)
        slot_t = torch.tensor([slot], dtype=torch.int64, device=self.mm.device)
        for j, layer in enumerate(self.mamba_layers):
            got = self.mm.states.get_state(layer, slot_t)[0].cpu()
            expected = want + j if n else want
            assert torch.equal(got, expected), f"{rid}: state after {n} tokens corrupted"

    def _verify_prefix(self, rid: str, n: int) -> None:
        """Assert positions ``[0, n)`` read back their codes (SWA layers: the last window)."""
        slots = self.mm.req_slots(rid)
        assert slots.numel() == n, f"{rid}: {slots.numel()} slots with KV, expected {n}"
        if n == 0:
            return
        want_k, want_v = self._kv(self.seqs[rid].hash_upto(n))
        if self.full_layer is not None:
            k, v = self.mm.kv.get_kv(self.full_layer, slots)
            assert torch.equal(k, want_k) and torch.equal(v, want_v), f"{rid}: full KV corrupted"
        if self.swa_layer is not None:
            lo = max(0, n - self.window)
            k, v = self.mm.kv.get_kv(self.swa_layer, slots[lo:])
            ok = torch.equal(k, want_k[lo:]) and torch.equal(v, want_v[lo:])
            assert ok, f"{rid}: SWA KV of the last window corrupted"
