"""Pass `simplify`: constant folding and algebraic identities.

Folds ops whose arguments are all constants (with the op's NumPy reference), and rewrites
x+0, x-0, x*1, x/1, --x, x**1, x**2 -> x*x, x**3 -> x*x*x, reshape(constant) -> broadcast, and no-op reshapes, broadcasts and casts.
A matmul operand that is a transpose of the last two axes becomes the matmul's `ta`/`tb` flag
(BLAS reads it transposed: no copy; attention's k^T and its gradients' transposes).
"""
import numpy as np

from ..ops import OPS


def _const(g, n):
    return g[n]["attrs"]["value"] if g.op(n) == "const" else None


def _rewrite(g, n):
    """Return the node n should be replaced by, or None."""
    op, args = g.op(n), g.args(n)
    if op in ("input", "const", "size"):
        return None
    if args and all(g.op(a) == "const" for a in args) and g.shape(n) == () and OPS[op].ref is not None:
        vals = [np.array(_const(g, a)) for a in args]
        with np.errstate(all="ignore"):
            v = OPS[op].ref(*vals, **g.attrs(n))
        if g.dtype(n) in ("f32", "f64", "i32", "i64"):
            return g.const(np.asarray(v).item(), g.dtype(n))
        return None
    same = lambda a: g.shape(a) == g.shape(n) and g.dtype(a) == g.dtype(n)  # noqa: E731
    c = [_const(g, a) for a in args]
    if op == "add":
        if c[1] == 0 and same(args[0]):
            return args[0]
        if c[0] == 0 and same(args[1]):
            return args[1]
    if op == "sub" and c[1] == 0 and same(args[0]):
        return args[0]
    if op == "mul":
        if c[1] == 1 and same(args[0]):
            return args[0]
        if c[0] == 1 and same(args[1]):
            return args[1]
    if op == "div" and c[1] == 1 and same(args[0]):
        return args[0]
    if op == "neg" and g.op(args[0]) == "neg":
        return g.args(args[0])[0]
    if op == "pow" and c[1] == 1 and same(args[0]):
        return args[0]
    if op == "pow" and c[1] == 2:
        with g.at(g[n]["loc"], g[n]["role"]):
            return g.add("mul", args[0], args[0])
    if op in ("reshape", "broadcast_to", "cast") and same(args[0]):
        return args[0]
    if op == "reshape" and g.op(args[0]) == "const":       # a filled array, not a view of nothing
        with g.at(g[n]["loc"], g[n]["role"]):
            return g.add("broadcast_to", args[0], shape=g.shape(n))
    if op == "matmul":
        for i, flag in enumerate(("ta", "tb")):
            t = args[i]
            r = len(g.shape(t))
            if g.op(t) != "transpose" or tuple(g.attrs(t)["perm"]) != tuple(range(r - 2)) + (r - 1, r - 2):
                continue
            if flag == "ta" and r != 2 and r != len(g.shape(args[1])):
                continue                           # (a transposed left operand: 2-D or batched alike)
            new = list(args)
            new[i] = g.args(t)[0]
            with g.at(g[n]["loc"], g[n]["role"]):
                return g.add("matmul", *new, **{**g.attrs(n), flag: not g.attrs(n).get(flag, False)})
    if op == "reshape" and g.op(args[0]) == "reshape":
        with g.at(g[n]["loc"], g[n]["role"]):
            return g.add("reshape", g.args(args[0])[0], shape=g.shape(n))
    return None


def simplify(g, ctx):
    changed = True
    while changed:
        changed = False
        for n in g.topo():
            if n not in g:
                continue
            r = _rewrite(g, n)
            if r is not None and r != n:
                g.replace_uses(n, r)
                g.remove(n)
                changed = True
    return g
