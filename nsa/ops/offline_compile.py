"""Compile Triton kernels for an NVIDIA target without a GPU (Triton's bundled ptxas), as a launch
would specialise them, and read back their register and spill-stack use.

Used by the checks that catch compiled-mode problems the CPU interpreter cannot see
(:mod:`nsa.ops.decode.compile_check`, ``scripts/gpu/check_attention_kernels.py --resources``).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable


def _constexpr_names(fn) -> list[str]:
    """``fn``'s parameters annotated ``tl.constexpr`` (a JIT function, or its interpreted form)."""
    import inspect

    params = inspect.signature(getattr(fn, "fn", fn)).parameters.values()
    return [p.name for p in params if "constexpr" in str(p.annotation)]


def launch_signature(fn, constexprs: dict, pointers: dict[str, str], floats=frozenset()) -> dict[str, str]:
    """Triton signature of ``fn``'s arguments: ``constexpr`` for the keys of ``constexprs``, the
    pointer type ``pointers`` gives by name (``"*bf16"``), ``fp32`` for ``floats``, ``i32`` for
    the rest (sizes and strides)."""
    # A constexpr left out would compile as an i32 argument: a kernel the launches never run.
    missing = [name for name in _constexpr_names(fn) if name not in constexprs]
    if missing:
        raise ValueError(f"launch_signature: {fn.__name__} needs values for its constexprs {missing}")

    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        return pointers.get(name, "fp32" if name in floats else "i32")
    return {name: kind(name) for name in fn.arg_names}


def compile_as_launched(fn, signature: dict[str, str], constexprs: dict, *, arch: int, num_warps: int,
                        num_stages: int, aligned: Callable[[str], bool], maxnreg: int | None = None):
    """``fn`` compiled for ``sm_<arch>`` with the specialisation a real launch gets: every pointer
    16-byte aligned, and the integer arguments ``aligned(name)`` picks (strides) divisible by 16.
    ``maxnreg`` caps registers per thread as ``triton.Config(maxnreg=...)`` does.

    Without those hints Triton cannot prove the loads vectorisable, does not pipeline them, and
    the result shows spills the launched kernel does not have.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    hints = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(fn.arg_names)
             if name not in constexprs and (signature[name].startswith("*") or aligned(name))}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=hints)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(compiled) -> tuple[int, int] | None:
    """``(registers, spill stack bytes)`` per thread of a compiled kernel (cuobjdump), ``None``
    when the tool's output cannot be read."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=False).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def async_copies(compiled) -> int:
    """Asynchronous global-to-shared copies (``cp.async`` or TMA) in a compiled kernel's TTGIR: how
    Triton's software pipeliner keeps a loop's loads in flight; a loop that loads and has none
    waits for each."""
    ttgir = compiled.asm["ttgir"]
    return ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy_global_to_local")


def run_compiling(code: str, timeout: float = 1200) -> str:
    """Run Python ``code`` in a fresh interpreter without ``TRITON_INTERPRET`` (a process whose
    kernels were defined under the interpreter cannot compile them) and return its standard
    output; ``RuntimeError`` with its error output when it fails."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compiling failed (exit {done.returncode}): "
                           f"{done.stdout[-1000:]}{done.stderr[-3000:]}")
    return done.stdout
