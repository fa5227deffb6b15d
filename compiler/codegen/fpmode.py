"""The CPU's floating-point mode around a step: subnormals flushed to zero.

A value below float32's smallest normal (1.2e-38) makes every multiply and add that touches
it take a microcode assist, 20-100x slower (x86 and most other cores). Training makes such
values as a matter of course: Adam's first moment of a weight whose gradient stays zero (a
dead ReLU's fan-in) decays by 0.9 a step and is subnormal after about 800 steps. Measured on
LeNet's 256x120 dense layer: its fused gradient + Adam kernel ran 63 us with normal moments,
276 us with subnormal ones.

So the compiled step sets MXCSR's flush-to-zero and denormals-are-zero bits on entry and puts
the caller's mode back before it returns, as TensorFlow's executors and XLA's CPU runtime do.
A subnormal result becomes a signed zero; normal values are untouched (float64's subnormals
lie below 2.2e-308). The mode is per thread: the step's thread is switched for the step, and
each thread of Numba's pool for its share of a split matrix product (cpu.py `_gemm_run`; without
it the LSTM's 2-thread step went from 5.6 to 9-11 ms once its activations turned subnormal).
On a CPU other than x86-64 both calls do nothing.
"""
from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

FTZ_DAZ = 0x8040                     # MXCSR bit 15 (flush to zero) | bit 6 (denormals are zero)
X86 = platform.machine().lower() in ("x86_64", "amd64")

_I32 = ir.IntType(32)
_VOID_PTR_FN = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])


@intrinsic
def _get_mxcsr(typingctx):
    def codegen(context, builder, sig, args):
        slot = cgutils.alloca_once(builder, _I32)
        fn = cgutils.get_or_insert_function(builder.module, _VOID_PTR_FN, "llvm.x86.sse.stmxcsr")
        builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])
        return builder.load(slot)
    return types.uint32(), codegen


@intrinsic
def _set_mxcsr(typingctx, value):
    def codegen(context, builder, sig, args):
        slot = cgutils.alloca_once(builder, _I32)
        builder.store(args[0], slot)
        fn = cgutils.get_or_insert_function(builder.module, _VOID_PTR_FN, "llvm.x86.sse.ldmxcsr")
        builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])
        return context.get_dummy_value()
    return types.void(types.uint32), codegen


if X86:
    @njit(cache=True, inline="always")
    def flush_subnormals():
        """Set flush-to-zero and denormals-are-zero; return the mode to restore."""
        old = _get_mxcsr()
        _set_mxcsr(old | FTZ_DAZ)
        return old

    @njit(cache=True, inline="always")
    def restore_mode(old):
        _set_mxcsr(old)
else:                                # pragma: no cover - not x86-64
    @njit(cache=True, inline="always")
    def flush_subnormals():
        return 0

    @njit(cache=True, inline="always")
    def restore_mode(old):
        pass
