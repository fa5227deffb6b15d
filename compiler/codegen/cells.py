"""Address cells: how a compiled kernel calls a function that is compiled on its own.

A Numba function that calls another one links the callee's code into its own module, and LLVM
optimizes and generates all of it again there. For the CPU target's parallel matrix-product
driver (cpu.py `_gemm_run`, a `parallel=True` function) that cost each kernel with a product
about 0.1 s of its compile, and every such kernel had to wait until the driver itself was
compiled (1-1.6 s, once per machine).

Instead, the driver is a C callback (`numba.cfunc`) compiled on its own, and its address is
stored in a cell: a process-lifetime 64-bit integer registered with LLVM under a symbol name.
Kernels read the cell and call through it; their code refers to the symbol only by name, so it
can be compiled (and cached on disk) before the driver exists, in any process. The cell is
filled before the first call (`Executable` runs its helpers' `_dlc_ready` first).
"""
from __future__ import annotations

import ctypes

from llvmlite import binding as _llvm
from llvmlite import ir

_CELLS: dict[str, ctypes.c_int64] = {}
_KEEP: list = []


def address_cell(symbol: str) -> ctypes.c_int64:
    """The cell registered under `symbol`, made on first use and kept for the life of the
    process (code finalized against it keeps its address, whatever module asked for it)."""
    c = _CELLS.get(symbol)
    if c is None:
        c = _CELLS[symbol] = ctypes.c_int64(0)
        _llvm.add_symbol(symbol, ctypes.addressof(c))
    return c


def keep(obj) -> None:
    """Keep `obj` (a compiled callback whose address is in a cell) alive with the process."""
    _KEEP.append(obj)


def load_cell(builder, symbol: str):
    """LLVM IR: the value of the cell `symbol` (an external i64 global), in `builder`."""
    g = builder.module.globals.get(symbol)
    if g is None:
        g = ir.GlobalVariable(builder.module, ir.IntType(64), symbol)
        g.linkage = "external"
    return builder.load(g)
