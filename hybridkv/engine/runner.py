"""Engine: greedy generation of a Hugging Face model through a :class:`MemoryManager`.

A step is the engine contract: ``plan = mm.schedule()``, one forward over every token of
the plan (all requests flattened into one row, each at its own positions), K/V written at
``plan.out_cache_loc`` layer by layer, paged attention over ``plan.full_pages`` /
``plan.swa_pages``, then ``mm.commit(plan, next_token_ids)``.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from hybridkv.engine.attention import FlashInferAttention, paged_attention_torch
from hybridkv.engine.model import HFModel, LayerSpec
from hybridkv.scheduler import CacheConfig, MemoryManager, Request, StepPlan


@dataclass(frozen=True)
class _Table:
    """One page table as host lists, with each request's first key position."""

    kv_indptr: list[int]
    kv_indices: torch.Tensor
    kv_last_page_len: list[int]
    kv_starts: list[int]
    raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class _Step:
    """What every layer of one step's forward shares."""

    plan: StepPlan
    qo_indptr: torch.Tensor  # [batch + 1], each request's rows of the flat batch
    qo: list[int]
    q_starts: list[int]  # each request's extend_start
    full: _Table
    swa: _Table | None


class Engine:
    """Runs ``model`` (a transformers ``*ForCausalLM`` or an :class:`HFModel`) over a
    :class:`MemoryManager` built from ``cache_config`` (default: the model's shape with
    ``overrides`` for pools and policies).

    ``record_logits=True`` keeps every computed position's logits in ``self.logits[rid]``
    (``{position: [vocab]}``, a position computed twice, e.g. after a retraction, keeps
    the last) and each finished request's whole sequence in ``self.sequences`` (its prompt
    length in ``self.prompt_lens``).
    ``attention``: ``"auto"`` (FlashInfer on CUDA when installed, else torch) or ``"torch"``.
    """

    def __init__(
        self,
        model: torch.nn.Module | HFModel,
        cache_config: CacheConfig | None = None,
        *,
        record_logits: bool = False,
        attention: str = "auto",
        **overrides: object,
    ) -> None:
        self.model = model if isinstance(model, HFModel) else HFModel(model)
        cfg = cache_config if cache_config is not None else self.model.cache_config(**overrides)
        _check_fits(self.model, cfg)
        self.mm = MemoryManager(cfg)
        self.record_logits = record_logits
        if attention not in ("auto", "torch"):
            raise ValueError("attention must be 'auto' or 'torch'")
        self._fi = None
        if attention == "auto" and any(
            FlashInferAttention.supports(s, self.mm.device) for s in self.model.specs
        ):
            self._fi = FlashInferAttention(self.mm.device)
        self.seqs: dict[str, list[int]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.logits: dict[str, dict[int, torch.Tensor]] = {}
        self.sequences: dict[str, list[int]] = {}
        self.prompt_lens: dict[str, int] = {}
        self.last_plan: StepPlan | None = None  # the plan of the latest step, for inspection
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._rids = itertools.count()

    # ---------------------------------------------------------------- requests

    def add(self, rid: str, prompt: list[int], max_new_tokens: int) -> None:
        """Queue a request (``ValueError`` from the manager for bad or never-fitting input)."""
        self.mm.add_request(Request(rid, list(prompt), max_new_tokens))
        self.seqs[rid] = list(prompt)
        self.outputs[rid] = []
        self.prompt_tokens += len(prompt)
        if self.record_logits:
            self.logits[rid] = {}
            self.prompt_lens[rid] = len(prompt)

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int | list[int]
    ) -> list[list[int]]:
        """Greedy-decode every prompt (all at once, sharing cached prefixes with earlier
        calls); returns the new tokens of each prompt, in order."""
        if isinstance(max_new_tokens, int):
            max_new_tokens = [max_new_tokens] * len(prompts)
        rids = [f"g{next(self._rids)}" for _ in prompts]
        for rid, prompt, n in zip(rids, prompts, max_new_tokens, strict=True):
            self.add(rid, prompt, n)
        self.run()
        return [self.outputs.pop(rid) for rid in rids]

    def run(self) -> None:
        """Step until every queued request has finished."""
        while self.seqs:
            if self.step() is None:
                raise RuntimeError(f"nothing schedulable with {len(self.seqs)} requests left")

    # ---------------------------------------------------------------- steps

    def step(self) -> list[str] | None:
        """One schedule / forward / commit; the finished rids, or None when nothing ran."""
        plan = self.last_plan = self.mm.schedule()
        if plan is None:
            return None
        tokens = self._forward(plan)
        finished = self.mm.commit(plan, tokens)
        for sreq, tok in zip(plan.reqs, tokens, strict=True):
            if sreq.produces_token and sreq.rid in self.seqs:
                self.seqs[sreq.rid].append(tok)
                self.outputs[sreq.rid].append(tok)
                self.generated_tokens += 1
        for rid in finished:
            seq = self.seqs.pop(rid)
            if self.record_logits:
                self.sequences[rid] = seq
        return finished

    @torch.no_grad()
    def _forward(self, plan: StepPlan) -> list[int]:
        """The model over every token of ``plan``; greedy next tokens (0 where none)."""
        model, dev = self.model, self.mm.device
        reqs = plan.reqs
        ids, pos = [], []
        for r in reqs:
            ids += self.seqs[r.rid][r.extend_start : r.extend_start + r.extend_len]
            pos += range(r.extend_start, r.extend_start + r.extend_len)
        qo_t = plan.qo_indptr
        qo = plan.batch.qo_indptr.tolist()
        q_starts = [r.extend_start for r in reqs]
        full, swa = self._tables(plan)
        h = model.embed(torch.tensor(ids, dtype=torch.int64, device=dev))
        rope = model.rotary(h, torch.tensor(pos, dtype=torch.int64, device=dev))
        if self._fi is not None:
            self._fi.reset()
        step = _Step(plan, qo_t, qo, q_starts, full, swa)
        for spec in model.specs:
            h = model.layer(spec.layer_id, h, rope, functools.partial(self._attend, step, spec))
        last = [qo[i + 1] - 1 for i, r in enumerate(reqs) if r.produces_token]
        if self.record_logits:
            logits = model.logits(h)
            for i, r in enumerate(reqs):
                rows = logits[qo[i] : qo[i + 1]].float().cpu()
                for j in range(r.extend_len):
                    self.logits[r.rid][r.extend_start + j] = rows[j]
            picked = logits[last]
        else:
            picked = model.logits(h[:, last])
        best = iter(picked.argmax(-1).tolist())
        return [next(best) if r.produces_token else 0 for r in reqs]

    def _attend(
        self, step: _Step, spec: LayerSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Layer ``spec``'s attention: write the step's K/V, read the paged context."""
        lid, plan = spec.layer_id, step.plan
        table = step.full if spec.window is None else step.swa
        # NOTE: the contract asks for the wait before the read only; waiting before the
        # write too costs this engine nothing and keeps the layer's copies in order.
        plan.wait(lid)
        self.mm.kv.set_kv(lid, plan.out_cache_loc, k, v)
        k_pages, v_pages = self.mm.kv.paged(lid)
        if self._fi is not None and FlashInferAttention.supports(spec, q.device):
            return self._fi.attend(step.qo_indptr, table.raw, spec, q, k_pages, v_pages)
        return paged_attention_torch(
            q, k_pages, v_pages, step.qo, step.q_starts, table.kv_indptr, table.kv_indices,
            table.kv_last_page_len, table.kv_starts, spec,
        )  # fmt: skip

    def _tables(self, plan: StepPlan) -> tuple[_Table, _Table | None]:
        """The plan's tables as host lists, with each request's first key position: 0 for
        full layers, ``plan.swa_table_starts`` for SWA ones."""
        ps = self.mm.config.page_size
        seq_lens = [r.extend_start + r.extend_len for r in plan.reqs]
        full = _table(plan.full_pages, [0] * len(seq_lens), seq_lens, ps)
        swa = None
        if plan.swa_pages is not None:
            starts = plan.swa_table_starts.tolist()
            swa = _table(plan.swa_pages, starts, seq_lens, ps)
        return full, swa

    # ---------------------------------------------------------------- reports

    def stats(self) -> dict[str, float]:
        """The manager's stats plus ``hit_rate``: prompt tokens served from a cache (device,
        host or storage) over prompt tokens submitted."""
        st: dict[str, float] = dict(self.mm.stats())
        hits = st["device_hit_tokens"] + st["host_hit_tokens"] + st["storage_hit_tokens"]
        st["hit_rate"] = hits / max(1, self.prompt_tokens)
        st["generated_tokens"] = self.generated_tokens
        return st

    def close(self) -> None:
        self.mm.close()


def _table(pages: object, starts: list[int], seq_lens: list[int], ps: int) -> _Table:
    indptr = pages.kv_indptr.tolist()
    last = pages.kv_last_page_len.tolist()
    for i, (start, end) in enumerate(zip(starts, seq_lens, strict=True)):
        n_kv = (indptr[i + 1] - indptr[i] - 1) * ps + last[i]
        if end > start and n_kv != end - start:
            raise AssertionError(f"page table of request {i} holds {n_kv} keys, not {end - start}")
    raw = (pages.kv_indptr, pages.kv_indices, pages.kv_last_page_len)
    return _Table(indptr, pages.kv_indices, last, starts, raw)


def _check_fits(model: HFModel, cfg: CacheConfig) -> None:
    """``ValueError`` when ``cfg`` cannot hold ``model``'s KV."""
    want = {
        "num_layers": len(model.specs),
        "num_kv_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "swa_layer_ids": tuple(s.layer_id for s in model.specs if s.window is not None),
    }
    for name, value in want.items():
        if getattr(cfg, name) != value:
            raise ValueError(
                f"cache_config.{name} is {getattr(cfg, name)!r}, the model has {value!r}"
            )
    if cfg.mamba_layer_ids:
        raise ValueError("cache_config.mamba_layer_ids: the model has no recurrent layers")
    if model.window is not None and cfg.sliding_window < model.window:
        raise ValueError(
            f"cache_config.sliding_window {cfg.sliding_window} is shorter than the model's "
            f"window {model.window}"
        )
