"""Memory limits: every size a user can ask for (generated data, layer widths, the batch) is
checked against the memory it implies before anything is allocated.

The limit is the machine's available memory (`MemAvailable`, else physical memory);
`DLC_MEMORY_LIMIT` (bytes, or with a K/M/G/T suffix) sets it explicitly.
"""
from __future__ import annotations

import math
import os

import numpy as np

from dsl.diagnostics import DlcError, Loc

_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def memory_limit() -> int:
    env = os.environ.get("DLC_MEMORY_LIMIT", "").strip().upper().removesuffix("B").removesuffix("I")
    if env:
        unit = env[-1] if env[-1] in _UNITS else ""
        try:
            return int(float(env[:len(env) - len(unit)]) * _UNITS[unit])
        except ValueError:
            raise DlcError("DLC_MEMORY_LIMIT must be a size such as 8G, "
                           f"got {os.environ['DLC_MEMORY_LIMIT']!r}") from None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2 ** 40


def human(nbytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(nbytes) < 1024 or unit == "PiB":
            return f"{nbytes:,.0f} bytes" if unit == "bytes" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def require(nbytes: float, what: str, loc: Loc | None = None, notes: list[str] | None = None) -> None:
    """Refuse, before allocating, a request for more memory than the limit."""
    limit = memory_limit()
    if nbytes > limit:
        raise DlcError(f"{what} needs about {human(nbytes)}, more than the {human(limit)} of memory available",
                       loc, (notes or []) + ["DLC_MEMORY_LIMIT sets the limit"])


def array_bytes(shape, itemsize: int) -> int:
    return math.prod(int(d) for d in shape) * itemsize


def check_program(prog, batch: int, batch_loc: Loc | None = None, training: bool = True) -> None:
    """Refuse a program whose parameters or activations at `batch` cannot fit, naming the
    largest parameter (a layer a million times too wide) or the batch."""
    from compiler.driver import DTYPES, resolve

    def nbytes(shape, dtype):
        return array_bytes(shape, np.dtype(DTYPES[dtype]).itemsize)
    tensors = [(name, info) for table in (prog.params, prog.states) for name, info in table.items()]
    weights = sum(nbytes(info.shape, info.dtype) for _, info in tensors)
    acts = 0
    g = prog.graph
    for n in g.nodes():
        try:
            acts += nbytes(resolve(g.shape(n), {"B": batch}), g.dtype(n))
        except (KeyError, TypeError):       # a size bound only at run time
            continue
    # training keeps, per parameter, its gradient and up to two optimizer moments; each
    # activation has a gradient in the backward pass
    total = (4 * weights + 2 * acts) if training else (weights + acts)
    if tensors:
        name, info = max(tensors, key=lambda t: nbytes(t[1].shape, t[1].dtype))
        shape = ", ".join(f"{d:,}" if isinstance(d, int) else str(d) for d in info.shape)
        require(total - 2 * acts if training else weights, f"this model's {human(weights)} of parameters", info.loc,
                [f"the largest is `{name}`, {info.dtype}[{shape}] ({human(nbytes(info.shape, info.dtype))})"])
    require(total, f"a batch of {batch:,} (about {human(acts)} of activations)", batch_loc,
            ["a smaller batch fits in less"])
