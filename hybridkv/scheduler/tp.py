"""Tensor-parallel agreement: every rank must build the same tree and the same plans.

Ranks run the same requests but may see different local results (a storage backend
that holds less of a prefix, a prefetch that finished on one rank only, a smaller host
pool). Every decision input that can differ is MIN-reduced across ``tp_group``, one
packed all-reduce per call, so all ranks decide on the smallest value any of them can serve
(the largest, for a cost, reduced negated). Which calls a step makes depends only on
reduced values and on what every rank has alike (queues, request rows): see
:class:`~hybridkv.scheduler.prefill.Prefill`.

NOTE: a rank must never skip the call because its own values look trivial (nothing
matched, nothing to prefetch). The other ranks are blocked in the same all-reduce and
wait for it forever: SGLang deadlocked exactly so (issues 27489, 33442). ``reduce_min``
therefore makes the call for every input, empty included, and ``calls`` lets tests and
``check()`` assert that every rank made the same number of them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.distributed as dist

from hybridkv.errors import ensure


class TPSync:
    """MIN-reduces decision inputs across a torch.distributed group, one packed all-reduce per call.

    ``group``: a ``torch.distributed.ProcessGroup``, or None for a single rank (then
    ``reduce_min`` returns its input and makes no call). Gloo groups reduce an int64 CPU
    tensor; NCCL groups one on ``torch.cuda.current_device()``.
    """

    def __init__(self, group: object | None) -> None:
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise ValueError(
                f"tp_group must be a torch.distributed ProcessGroup or None, "
                f"got {type(group).__name__}"
            )
        self.group = group
        self.world_size: int = 1 if group is None else dist.get_world_size(group)
        self.calls: int = 0
        self._device = torch.device("cpu")
        if group is not None and dist.get_backend(group) == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())

    def reduce_min(self, values: Sequence[int]) -> list[int]:
        """Element-wise MIN of ``values`` over all ranks; every rank gets the same list.

        ``values``: ints (Python or numpy), the same count on every rank. Returns a new
        list of Python ints; does not mutate ``values``. Makes exactly one collective call
        per invocation, whatever the values (see the module note), and counts it in
        ``calls``.
        """
        ints = [operator.index(v) for v in values]
        if self.group is None:
            return ints
        # NOTE: a header of -len(values) leads the packed tensor. It keeps the tensor
        # non-empty, so even an empty call is a real collective on every backend, and a
        # rank that passed fewer values than another (a bug that gloo can let through
        # silently on the shorter rank) sees -MIN(-len) = the longest length and raises.
        packed = torch.tensor([-len(ints), *ints], dtype=torch.int64, device=self._device)
        dist.all_reduce(packed, op=dist.ReduceOp.MIN, group=self.group)
        self.calls += 1
        out = packed.tolist()
        if -out[0] != len(ints):
            raise RuntimeError(
                f"TP ranks passed different numbers of values to reduce_min: "
                f"{len(ints)} here, {-out[0]} on another rank"
            )
        return out[1:]

    def check(self) -> None:
        """Raise :class:`~hybridkv.errors.CheckError` unless every rank has made as many
        collective calls as this one. Itself one call (counted, on every rank alike)."""
        low, minus_high = self.reduce_min([self.calls, -self.calls])
        ensure(
            low == -minus_high,
            f"TP ranks made different numbers of collective calls: {self.calls} here, "
            f"{low} to {-minus_high} across the group",
        )
