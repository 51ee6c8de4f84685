"""Without Triton (macOS, Windows): the package imports and every kernel runs as torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # an import of triton now raises ImportError
    sys.modules["triton.language"] = None
    import torch
    from hybridkv import CacheConfig, MemoryManager, Request, kernels
    from hybridkv.kernels._triton import HAS_TRITON
    from hybridkv.sim import cli

    assert not HAS_TRITON and not kernels.interpreter_on()
    assert kernels.resolve_backend(None, torch.device("cpu")) == "torch"
    try:
        kernels.resolve_backend("triton", torch.device("cpu"))
    except ValueError as e:
        assert "needs Triton installed" in str(e)
    else:
        raise AssertionError("backend='triton' accepted without Triton")
    mm = MemoryManager(CacheConfig(num_layers=2, swa_layer_ids=(1,), num_kv_heads=1,
                                   head_dim=8, sliding_window=32, device="cpu"))
    mm.add_request(Request("a", list(range(40)), 4))
    while (plan := mm.schedule()) is not None:
        mm.commit(plan, [0] * len(plan.reqs))
    mm.check()
    mm.close()
    from hybridkv.selfcheck import main
    assert main() == 0
    print("ok")
    """
)


def test_package_works_without_triton() -> None:
    """Blocking the triton import: kernels resolve to torch, a manager runs, self-check says so."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "Triton is not installed" in out.stdout and out.stdout.endswith("ok\n")
