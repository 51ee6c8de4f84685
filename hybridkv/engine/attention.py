"""Paged attention over a plan's FlashInfer-style page tables.

A request's table lists whole pages from the one holding its first attended position::

    pos:     0   4   8   12  16  20         page_size 4, window 8, extend [16, 19)
    table:           [p2][p3][p4]           SWA: from the page holding 16 - 8 = 8
    keys:            8 ..........18         kv_start = 8, kv_len = 2 * 4 + 3 = 11
    query 16 reads:   9 ...... 16           (16 - j < 8), query 18 reads 11 .. 18

:func:`paged_attention_torch` is the reference (any device); :class:`FlashInferAttention`
runs FlashInfer's paged prefill kernel on CUDA when ``flashinfer`` is installed.
"""

from __future__ import annotations

import torch

from hybridkv.engine.model import LayerSpec

try:  # NOTE: optional; never installed on CPU machines.
    import flashinfer  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    flashinfer = None


def paged_attention_torch(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    qo_indptr: list[int],
    q_starts: list[int],
    kv_indptr: list[int],
    kv_indices: torch.Tensor,
    kv_last_page_len: list[int],
    kv_starts: list[int],
    spec: LayerSpec,
) -> torch.Tensor:
    """Causal (sliding-window) attention of each request's queries over its paged keys.

    Args:
        q: ``[T, heads, head_dim]``, request ``i``'s rows ``qo_indptr[i]:qo_indptr[i+1]`` at
            positions ``q_starts[i] + 0, 1, ...``.
        k_pages, v_pages: ``[pages, page_size, kv_heads, head_dim]``.
        kv_indptr, kv_indices, kv_last_page_len: the page table (CSR); request ``i``'s keys
            are at positions ``kv_starts[i] + 0, 1, ...`` (``kv_starts[i]`` page-aligned).
        spec: the layer's window, scaling, softcap and sinks.

    Returns ``[T, heads, head_dim]`` in ``q``'s dtype; scores in q's dtype and softmax in
    fp32, as HF's eager attention does. Nothing is mutated.
    """
    ps = k_pages.shape[1]
    n_rep = q.shape[1] // k_pages.shape[2]
    out = torch.empty_like(q)
    for i in range(len(q_starts)):
        lo, hi = qo_indptr[i], qo_indptr[i + 1]
        if hi == lo:
            continue
        pages = kv_indices[kv_indptr[i] : kv_indptr[i + 1]].long()
        n_kv = (pages.numel() - 1) * ps + kv_last_page_len[i]
        k = k_pages[pages].flatten(0, 1)[:n_kv].repeat_interleave(n_rep, dim=1)
        v = v_pages[pages].flatten(0, 1)[:n_kv].repeat_interleave(n_rep, dim=1)
        qi = q[lo:hi]
        s = torch.einsum("qhd,khd->hqk", qi, k.to(q.dtype)) * spec.scaling
        if spec.softcap is not None:
            s = torch.tanh(s / spec.softcap) * spec.softcap
        q_pos = torch.arange(q_starts[i], q_starts[i] + hi - lo, device=q.device)
        k_pos = torch.arange(kv_starts[i], kv_starts[i] + n_kv, device=q.device)
        dist = q_pos[:, None] - k_pos[None, :]
        keep = dist >= 0
        if spec.window is not None:
            keep &= dist < spec.window
        s = s.masked_fill(~keep, float("-inf")).float()
        if spec.sinks is not None:
            sink = spec.sinks.float().view(-1, 1, 1).expand(-1, s.shape[1], 1)
            s = torch.cat([s, sink], dim=-1)
            p = torch.softmax(s - s.amax(-1, keepdim=True), dim=-1)[..., :-1]
        else:
            p = torch.softmax(s, dim=-1)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", p.to(q.dtype), v.to(q.dtype))
    return out


class FlashInferAttention:
    """FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper`` (NHD), planned once per step and
    table; prefill chunks and decodes share it (a decode is a one-row query).

    NOTE: untested in CI (no GPU, no flashinfer there); the torch reference is the oracle.
    Sinks (GPT-OSS) are not passed, so such layers stay on the torch path.
    """

    def __init__(self, device: torch.device, workspace_bytes: int = 128 << 20) -> None:
        if flashinfer is None:
            raise RuntimeError("flashinfer is not installed")
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self._wrappers: dict[tuple, object] = {}

    @staticmethod
    def supports(spec: LayerSpec, device: torch.device) -> bool:
        return flashinfer is not None and device.type == "cuda" and spec.sinks is None

    def attend(
        self,
        qo_indptr: torch.Tensor,
        table: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        spec: LayerSpec,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
    ) -> torch.Tensor:
        """Same contract as :func:`paged_attention_torch` for the plan's ``qo_indptr`` and one
        of its tables; the first layer of each (table, window, scaling, softcap) plans the
        wrapper that later layers of the step reuse."""
        key = (table[1].data_ptr(), spec.window, spec.scaling, spec.softcap)
        wrapper = self._wrappers.get(key)
        if wrapper is None:
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
            kv_indptr, kv_indices, last = table
            wrapper.plan(
                qo_indptr.to(q.device, torch.int32),
                kv_indptr,
                kv_indices,
                last,
                q.shape[1],
                k_pages.shape[2],
                q.shape[2],
                k_pages.shape[1],
                causal=True,
                # NOTE: FlashInfer's window_left counts keys left of the query; HF's window
                # counts the query too.
                window_left=-1 if spec.window is None else spec.window - 1,
                logits_soft_cap=spec.softcap or 0.0,
                sm_scale=spec.scaling,
                q_data_type=k_pages.dtype,
                kv_data_type=k_pages.dtype,
            )
            self._wrappers[key] = wrapper
        return wrapper.run(q.to(k_pages.dtype), (k_pages, v_pages)).to(q.dtype)

    def reset(self) -> None:
        """Forget the last step's plans (call once per step, before its first layer)."""
        self._wrappers.clear()
