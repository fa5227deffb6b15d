"""Lowering of indexing and slicing, `x[i, a:b, ...]`, onto existing primitives.

Python's rules, checked at compile time: an integer picks one position and drops its axis,
`a:b` keeps the axis (either bound may be left out), negative positions count from the end,
and one `...` stands for as many full slices as the rank needs. Every position must be inside
its axis (an out-of-range index or slice is an error, never clamped), so the kernels never
read out of bounds. An axis of symbolic size (the batch, a sequence length) can be taken
whole, or at its first (0) or last (-1) position, the only ones known to exist: such a pick
is a masked sum over the axis (`_pick`), since `slice` needs a fixed size.

A tensor is sliced with `slice` (one per cut axis) and a `reshape` drops the indexed axes. A
single integer tensor indexing the rows of a 2-D table is a gather (`take`). Lists and the
tuples of several return values are indexed at compile time.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsl.diagnostics import DlcError, Loc

from .shapes import INTS, fmt_shape


@dataclass(frozen=True)
class Item:
    """One evaluated subscript: kind "index" (value), "slice" (start, stop) or "ellipsis"."""
    kind: str
    loc: Loc
    value: object = None
    start: object = None
    stop: object = None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def index(lw, value, items: list[Item], loc: Loc):
    """`value[items]` for a tensor, a list or a tuple."""
    from .lower import Tensor
    if isinstance(value, (list, tuple)):
        return _index_sequence(value, items, loc)
    if not isinstance(value, Tensor):
        raise DlcError(f"cannot index {lw._describe(value)}", loc)
    return Tensor(_index_tensor(lw, value.node, items, loc))


def _bound(v, what: str, loc: Loc) -> int:
    if not _is_int(v):
        raise DlcError(f"{what} must be an integer known at compile time, got {_what(v)}", loc)
    return v


def _what(v) -> str:
    from .lower import SymDim, Tensor
    if isinstance(v, SymDim):
        return f"the symbolic size {v}"
    if isinstance(v, Tensor):
        return "a tensor"
    return repr(v)


def _index_sequence(seq, items: list[Item], loc: Loc):
    if len(items) != 1 or items[0].kind == "ellipsis":
        raise DlcError(f"a list of {len(seq)} takes one index or slice", loc)
    it = items[0]
    n = len(seq)
    if it.kind == "index":
        i = _bound(it.value, "an index", it.loc)
        if not -n <= i < n:
            raise DlcError(f"index {i} is out of range for a list of {n}", it.loc)
        return seq[i]
    start, stop = _slice_bounds(it, n, "the list")
    return seq[start:stop]


def _slice_bounds(it: Item, size: int, what: str) -> tuple[int, int]:
    start = 0 if it.start is None else _bound(it.start, "a slice bound", it.loc)
    stop = size if it.stop is None else _bound(it.stop, "a slice bound", it.loc)
    lo = start + size if start < 0 else start
    hi = stop + size if stop < 0 else stop
    if not 0 <= lo < hi <= size:
        text = f"{'' if it.start is None else start}:{'' if it.stop is None else stop}"
        raise DlcError(f"slice {text} is out of range for {what} (size {size})", it.loc,
                       ["a slice must select at least one position inside the axis"])
    return lo, hi


def _index_tensor(lw, x: int, items: list[Item], loc: Loc) -> int:
    g = lw.g
    shape = g.shape(x)
    rank = len(shape)
    ell = [i for i, it in enumerate(items) if it.kind == "ellipsis"]
    if len(ell) > 1:
        raise DlcError("an index has at most one `...`", items[ell[1]].loc)
    used = len(items) - len(ell)
    if used > rank:
        raise DlcError(f"{used} indices for a tensor of rank {rank} {fmt_shape(shape)}", loc)
    if ell:
        i = ell[0]
        full = [Item("slice", items[i].loc)] * (rank - used)
        items = items[:i] + full + items[i + 1:]
    else:
        items = items + [Item("slice", loc)] * (rank - used)

    tensors = [(ax, it) for ax, it in enumerate(items) if it.kind == "index" and _is_tensor(it.value)]
    if tensors:
        return _gather(lw, x, items, tensors, loc)

    cuts, picks, drop = [], [], []
    for ax, (it, size) in enumerate(zip(items, shape)):
        if it.kind == "slice" and it.start is None and it.stop is None:
            continue                                   # `:` takes the whole axis, any size
        what = f"axis {ax}"
        if it.kind == "index":
            _bound(it.value, "an index", it.loc)
        if not isinstance(size, int):
            if it.kind == "index" and it.value in (0, -1):
                picks.append((ax, it.value))
                drop.append(ax)
                continue
            raise DlcError(f"cannot {'index' if it.kind == 'index' else 'slice'} {what} of {fmt_shape(shape)}: "
                           f"its size {size} is only known at run time", it.loc,
                           ["an axis of symbolic size can be taken whole (`:`), or at its first (0) or "
                            "last (-1) position"])
        if it.kind == "index":
            i = _bound(it.value, "an index", it.loc)
            if not -size <= i < size:
                raise DlcError(f"index {i} is out of range for {what} of {fmt_shape(shape)} (size {size})", it.loc)
            i = i + size if i < 0 else i
            cuts.append((ax, i, i + 1))
            drop.append(ax)
        else:
            lo, hi = _slice_bounds(it, size, f"{what} of {fmt_shape(shape)}")
            if (lo, hi) != (0, size):
                cuts.append((ax, lo, hi))
    with g.at(loc):
        for ax, lo, hi in cuts:
            x = g.add("slice", x, axis=ax, start=lo, stop=hi)
        for ax, k in picks:
            x = _pick(g, x, ax, k)
        if drop:
            x = g.add("reshape", x, shape=tuple(d for ax, d in enumerate(g.shape(x)) if ax not in drop))
    return x


def _pick(g, x: int, ax: int, k: int) -> int:
    """Position k (0 or -1) of an axis of symbolic size, kept as an axis of size 1: the sum
    over the axis of x where the position is k, else 0. It reads every position (one fused
    reduction), never outside the axis."""
    pos = g.add("iota", x, axis=ax, dtype="i64")
    if k >= 0:
        target = g.const(k, "i64")
    else:
        target = g.add("sub", g.add("size", x, axes=(ax,), dtype="i64"), g.const(-k, "i64"))
    hit = g.add("where", g.add("eq", pos, target), x, g.const(0, g.dtype(x)))
    return g.add("reduce_sum", hit, axes=(ax,), keepdims=True)


def _is_tensor(v) -> bool:
    from .lower import Tensor
    return isinstance(v, Tensor)


def _gather(lw, x: int, items, tensors, loc: Loc) -> int:
    """`table[ids]`: rows of a 2-D table at integer ids (an embedding lookup)."""
    g = lw.g
    ax, it = tensors[0]
    if len(tensors) > 1:
        raise DlcError("one tensor index at a time: `table[ids]`", tensors[1][1].loc)
    rest_full = all(o.kind == "slice" and o.start is None and o.stop is None for o in items[1:])
    if ax != 0 or len(g.shape(x)) != 2 or not rest_full:
        raise DlcError("a tensor index selects rows of a 2-D table: `table[ids]` (or `table[ids, :]`)", it.loc,
                       [f"the indexed tensor is {lw._describe(_T(x))}"])
    ids = it.value.node
    if g.dtype(ids) not in INTS:
        raise DlcError(f"indices must be integers, got {lw._describe(it.value)}", it.loc)
    with g.at(loc):
        return g.add("take", x, ids)


def _T(n):
    from .lower import Tensor
    return Tensor(n)
