"""Type checking in the front end: sizes in types (`[N, 2 * D]`), dtype names, and a value
against a declared type (a `def`'s arguments and result), binding the names of sizes."""
from __future__ import annotations

import difflib

from dsl import ast as A
from dsl.diagnostics import DlcError, Loc

from .program import Frame, Tensor
from .shapes import FLOATS, dim_div, dim_mul, fmt_type, same_dim


def suggest(name, options) -> list[str]:
    """A note naming the closest of `options` to a misspelt `name`, if any."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return [f"did you mean `{close[0]}`?"] if close else []


def eval_dim(lw, d, frame: Frame):
    """A size in a type: an int, or a symbolic size (a name, or a product/quotient of names)."""
    if isinstance(d, A.DimInt):
        return d.value
    if isinstance(d, A.DimName):
        if d.name in frame.dims:
            return frame.dims[d.name]
        v = frame.vars.get(d.name)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise DlcError(f"unknown dimension `{d.name}`", lw.loc_of(d, frame),
                       suggest(d.name, list(frame.dims) + [k for k, x in frame.vars.items() if isinstance(x, int)]))
    if isinstance(d, A.DimBin):
        a, b = eval_dim(lw, d.left, frame), eval_dim(lw, d.right, frame)
        if isinstance(a, int) and isinstance(b, int):
            if d.op == "/" and (b == 0 or a % b):
                raise DlcError(f"dimension {a} / {b} is not a whole number", lw.loc_of(d, frame))
            return {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[d.op]
        if d.op == "*":
            return dim_mul(a, b)
        if d.op == "/":
            r = dim_div(a, b)
            if r is not None:
                return r
        raise DlcError(f"cannot compute dimension {a} {d.op} {b}", lw.loc_of(d, frame))
    raise DlcError("`...` is only allowed in an argument's type", lw.loc_of(d, frame))


def input_shape(typ, what: str) -> tuple:
    """The shape of a program input's declared type: names and integers as dimensions
    (`what` names the inputs in the error, e.g. "model inputs")."""
    shape = []
    for d in typ.dims:
        if isinstance(d, A.DimName):
            shape.append(d.name)
        elif isinstance(d, A.DimInt):
            shape.append(d.value)
        else:
            raise DlcError(f"{what} take names and integers as dimensions", d.loc)
    return tuple(shape)


def dtype_of(lw, name: str, loc: Loc) -> str:
    """A dtype name as written; float types become the program's float dtype."""
    if name not in ("f32", "f64", "i32", "i64", "bool"):
        raise DlcError(f"unknown dtype `{name}`", loc, ["dtypes: f32, f64, i32, i64, bool"])
    return lw.float_dtype if name in FLOATS else name

def check_type(lw, typ, v, frame: Frame, what: str, loc: Loc):
    """`v` against the declared type `typ`; names of sizes not bound yet are bound in `frame`."""
    if isinstance(typ, A.ScalarType):
        ok = {"int": lambda x: isinstance(x, int) and not isinstance(x, bool),
              "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
              "bool": lambda x: isinstance(x, bool), "str": lambda x: isinstance(x, str)}.get(typ.name)
        if ok is None:
            raise DlcError(f"unknown type `{typ.name}`", typ.loc, ["scalar types: int, float, bool, str"])
        if not ok(v):
            raise DlcError(f"{what} must be {typ.name}, got {lw._describe(v)}", loc)
        return
    if not isinstance(v, Tensor):
        raise DlcError(f"{what} must be a tensor, got {lw._describe(v)}", loc)
    shape, dtype = lw.g.shape(v.node), lw.g.dtype(v.node)
    want = f"{typ.dtype or ''}[{', '.join(dim_text(d) for d in typ.dims)}]"
    got = fmt_type(dtype, shape)
    if typ.dtype is not None and dtype_of(lw, typ.dtype, typ.loc) != dtype:
        raise DlcError(f"{what} must be {want}, got {got}", loc)
    dims = list(typ.dims)
    ell = [i for i, d in enumerate(dims) if isinstance(d, A.DimEllipsis)]
    if len(ell) > 1:
        raise DlcError("a type has at most one `...`", typ.loc)
    if ell:
        i = ell[0]
        head, tail = dims[:i], dims[i + 1:]
        if len(shape) < len(head) + len(tail):
            raise DlcError(f"{what} must be {want}, got {got} (rank {len(shape)})", loc)
        pairs = list(zip(head, shape[:len(head)])) + list(zip(tail, shape[len(shape) - len(tail):]))
    else:
        if len(shape) != len(dims):
            raise DlcError(f"{what} must be {want}, got {got} (rank {len(shape)}, expected {len(dims)})", loc)
        pairs = list(zip(dims, shape))
    for d, actual in pairs:
        if isinstance(d, A.DimName) and d.name not in frame.dims and not isinstance(frame.vars.get(d.name), int):
            frame.dims[d.name] = actual
            continue
        expected = eval_dim(lw, d, frame)
        if not same_dim(expected, actual):
            why = (f"`{dim_text(d)}` is {expected} here, but the tensor has {actual}"
                   if not isinstance(d, A.DimInt) else f"expected size {expected}, found {actual}")
            raise DlcError(f"{what} must be {want}, got {got}", loc, [why])


def dim_text(d) -> str:
    if isinstance(d, A.DimName):
        return d.name
    if isinstance(d, A.DimInt):
        return str(d.value)
    if isinstance(d, A.DimEllipsis):
        return "..."
    return f"{dim_text(d.left)}{d.op}{dim_text(d.right)}"
