"""Every Triton kernel compiles ahead of time for sm_90 (Hopper), on the CPU, no GPU needed.

The interpreter (``TRITON_INTERPRET=1``, the rest of the suite) runs kernels as numpy and
tolerates what a GPU compile rejects (a runtime value as a shape, a bad cast, a layout
conversion). Here each kernel goes through the real compiler down to a cubin (Triton ships
``ptxas``), with exactly the argument types its launcher passes: the launchers run on the
benchmark cases with their kernels replaced by recorders, and every recorded signature is
compiled. That needs un-interpreted ``JITFunction`` objects, which ``@triton.jit`` builds only
when ``TRITON_INTERPRET`` is unset at import: so the work runs in a subprocess
(``python tests/test_compile.py``) without it.

Works with Triton 3.6 and 3.9: ``ASTSource`` takes the constexprs as ``constexprs`` (or
``constants`` in releases that spell it so), found with ``inspect.signature``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import time
from typing import Any
from unittest import mock

import torch

KERNEL_MODULES = [
    "alloc_decode",
    "alloc_extend",
    "free",
    "full_to_swa",
    "page_copy",
    "page_table",
    "swa_release",
    "write_req_to_token",
]
TARGET = ("cuda", 90, 32)  # sm_90, warp size 32
_POINTER_TYPES = {
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.int16: "*i16",
    torch.int8: "*i8",
    torch.bool: "*i1",
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
}


def _type_of(value: object) -> str:
    """The Triton signature type of one launch argument, as the JIT would type it."""
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


def _kernel_name(module: str) -> str:
    return "_slots_to_pages_kernel" if module == "free" else f"_{module}_kernel"


def record_launches() -> dict[str, tuple[Any, dict[tuple, tuple[dict, dict]]]]:
    """Run every launcher on the benchmark cases with its kernel replaced by a recorder.

    Returns ``{kernel name: (JITFunction, {key: (signature, constexprs)})}``: each distinct
    signature a launcher passed (positional arguments typed, keyword arguments constexprs).
    """
    from hybridkv.kernels import _common, cases, page_copy

    recorded: dict[str, tuple[Any, dict[tuple, tuple[dict, dict]]]] = {}

    class Recorder:
        def __init__(self, fn: Any) -> None:
            self.fn = fn
            recorded[fn.__name__] = (fn, {})

        def __getitem__(self, grid: object) -> Any:
            def launch(*args: object, **kwargs: object) -> None:
                signature = {n: _type_of(v) for n, v in zip(self.fn.arg_names, args, strict=False)}
                signature.update({n: "constexpr" for n in kwargs})
                key = (*signature.items(), *kwargs.items())
                recorded[self.fn.__name__][1][key] = (signature, dict(kwargs))

            return launch

    modules = [importlib.import_module(f"hybridkv.kernels.{m}") for m in KERNEL_MODULES]
    originals = [
        getattr(mod, _kernel_name(m)) for mod, m in zip(modules, KERNEL_MODULES, strict=True)
    ]
    real_interpreter_on = _common.interpreter_on
    # NOTE: the launchers refuse backend="triton" on CPU tensors unless the interpreter is
    # on; nothing is launched here, so let them through.
    _common.interpreter_on = lambda: True
    try:
        for mod, m, fn in zip(modules, KERNEL_MODULES, originals, strict=True):
            setattr(mod, _kernel_name(m), Recorder(fn))
        for page_size in (1, 16, 64):  # PAGE_SIZE is a constexpr: each compiles anew
            with mock.patch.object(cases, "PAGE_SIZE", page_size):
                for job in cases.JOBS:
                    for batch in (1, 64):
                        cases.build_case(job, batch).run("triton")
        # A pool that cannot be widened: the copy moves int16 elements.
        pool = torch.zeros(4, 3, 5, dtype=torch.float16)
        pages = torch.tensor([1, 2])
        page_copy(pool, pool.clone(), pages, pages, backend="triton")
    finally:
        _common.interpreter_on = real_interpreter_on
        for mod, m, fn in zip(modules, KERNEL_MODULES, originals, strict=True):
            setattr(mod, _kernel_name(m), fn)
    return recorded


def compile_for_target(fn: Any, signature: dict, constexprs: dict) -> Any:
    """``triton.compile`` of one signature for :data:`TARGET`, Triton 3.6 or 3.9."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource).parameters
    key = "constexprs" if "constexprs" in params else "constants"
    src = ASTSource(fn, signature, **{key: constexprs})
    return triton.compile(src, target=GPUTarget(*TARGET))


def _bad_kernel_source() -> Any:
    """A kernel the interpreter runs and the compiler rejects: a runtime value as a shape."""
    import triton
    import triton.language as tl

    @triton.jit
    def _runtime_shape_kernel(x_ptr, n):
        tl.store(x_ptr + tl.arange(0, 16), tl.zeros([n], dtype=tl.int64))

    return _runtime_shape_kernel


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the compile needs un-interpreted kernels")
        return 2
    start = time.perf_counter()
    recorded = record_launches()
    names = {_kernel_name(m) for m in KERNEL_MODULES}
    missing = names - {name for name, (_, sigs) in recorded.items() if sigs}
    if missing:
        print(f"no launch recorded for {sorted(missing)}")
        return 1
    failures = []
    count = 0
    for name, (fn, signatures) in sorted(recorded.items()):
        for signature, constexprs in signatures.values():
            try:
                compiled = compile_for_target(fn, signature, constexprs)
                assert compiled.asm.get("cubin"), "no cubin"
                count += 1
            except Exception as e:  # noqa: BLE001 - report every failing kernel, then fail
                failures.append(f"{name} {signature} {constexprs}: {type(e).__name__}: {e}")
    try:
        compile_for_target(_bad_kernel_source(), {"x_ptr": "*i64", "n": "i32"}, {})
        failures.append("the harness compiled a kernel with a runtime shape: it proves nothing")
    except Exception:  # noqa: BLE001 - any compile error is the expected outcome
        pass
    print(f"compiled {count} signatures of {len(recorded)} kernels for sm_90 in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


def test_every_kernel_compiles_for_sm90() -> None:
    """Each kernel, with every signature its launcher passes, compiles to an sm_90 cubin."""
    import hybridkv

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(hybridkv.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "compiled" in proc.stdout


if __name__ == "__main__":
    sys.exit(main())
