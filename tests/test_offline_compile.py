"""The offline compile's signature: every constexpr must be given (one left out would compile as
an i32 argument, i.e. a kernel no launch runs)."""

import pytest
import triton
import triton.language as tl

from nsa.ops.offline_compile import launch_signature


@triton.jit
def _kernel(X, OUT, n, scale, BLOCK: tl.constexpr, ADD: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n) * scale
    if ADD:
        x += tl.load(OUT + offs, mask=offs < n)
    tl.store(OUT + offs, x, mask=offs < n)


def test_signature_kinds():
    sig = launch_signature(_kernel, {"BLOCK": 64, "ADD": True}, {"X": "*bf16", "OUT": "*bf16"}, {"scale"})
    assert sig == {"X": "*bf16", "OUT": "*bf16", "n": "i32", "scale": "fp32", "BLOCK": "constexpr",
                   "ADD": "constexpr"}


def test_a_constexpr_left_out_is_named():
    with pytest.raises(ValueError, match=r"_kernel needs values for its constexprs \['ADD'\]"):
        launch_signature(_kernel, {"BLOCK": 64}, {"X": "*bf16", "OUT": "*bf16"}, {"scale"})
