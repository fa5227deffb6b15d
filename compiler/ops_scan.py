"""`scan`: a recurrence over time kept as a loop in the IR, and `get`, its results.

A scan node's arguments are the initial carries, the per-step sequences (time-major,
[T, ...]) and the tensors its body captures from outside (parameters). Its attribute `body`
is a Graph whose inputs are (carries, one step of each sequence, captures) and whose outputs
are the new carries `c0..` and the per-step outputs `y0..`. The scan's results, read with
`get`, are: the final carries, the stacked per-step outputs [T, ...] and, when `save` is set,
the carry entering each step [T, ...] -- what the backward pass needs.

The gradient of a scan is a reverse scan (backpropagation through time): its body recomputes
one forward step from the saved carry and differentiates it (`autodiff.vjp`), carrying the
gradient of the carry backwards and summing the gradients of the captured tensors.
"""
from __future__ import annotations

import numpy as np

from .ops import OPS, Kind, Op, evaluate, register
from .shapes import FLOATS, ShapeError, fmt_shape, same_dim


def scan_layout(a: dict) -> tuple[int, int, int]:
    """(carries, sequences, results per kind) of a scan's attributes."""
    return a["n_carry"], a["n_in"], len([k for k in a["body"].outputs if k.startswith("y")])


def scan_results(shapes, dtypes, a) -> list[tuple[tuple, str]]:
    """Types of a scan's results: final carries, stacked outputs, saved carries."""
    body = a["body"]
    nc, ni, ny = scan_layout(a)
    T = shapes[nc][0] if ni else a["length"]
    out = [(shapes[i], dtypes[i]) for i in range(nc)]
    for j in range(ny):
        y = body.outputs[f"y{j}"]
        out.append(((T,) + tuple(body.shape(y)), body.dtype(y)))
    if a.get("save"):
        out += [((T,) + tuple(shapes[i]), dtypes[i]) for i in range(nc)]
    return out


def _scan_infer(s, d, a):
    body = a["body"]
    nc, ni, ny = scan_layout(a)
    if len(body.inputs) != len(s):
        raise ShapeError(f"scan body takes {len(body.inputs)} inputs, given {len(s)}")
    for i, b in enumerate(body.inputs):
        want = body.shape(b)
        got = s[i][1:] if nc <= i < nc + ni else s[i]
        if len(want) != len(got) or not all(same_dim(x, y) for x, y in zip(want, got)) or body.dtype(b) != d[i]:
            raise ShapeError(f"scan input {i} is {d[i]}{fmt_shape(got)}, its body expects "
                             f"{body.dtype(b)}{fmt_shape(want)}")
    if ni:
        T = s[nc][0]
        for i in range(nc, nc + ni):
            if not same_dim(s[i][0], T):
                raise ShapeError(f"sequences differ in length: {s[nc][0]} and {s[i][0]}")
    for i in range(nc):
        c = body.outputs[f"c{i}"]
        if body.shape(c) != tuple(s[i]) or body.dtype(c) != d[i]:
            raise ShapeError(f"carry {i} enters as {d[i]}{fmt_shape(s[i])} but leaves the step as "
                             f"{body.dtype(c)}{fmt_shape(body.shape(c))}")
    return (), "tuple"


def _scan_ref(*args, body, n_carry, n_in, reverse=False, save=False, length=None):
    """Run the body step by step with the NumPy references."""
    carries = [np.asarray(a) for a in args[:n_carry]]
    seqs = args[n_carry:n_carry + n_in]
    caps = args[n_carry + n_in:]
    T = len(seqs[0]) if n_in else length
    ny = len([k for k in body.outputs if k.startswith("y")])
    ys = [[None] * T for _ in range(ny)]
    saved = [[None] * T for _ in range(n_carry)]
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        feeds = dict(zip(body.inputs, carries + [s[t] for s in seqs] + list(caps)))
        vals = evaluate(body, feeds)
        for i in range(n_carry):
            saved[i][t] = carries[i]
        carries = [vals[body.outputs[f"c{i}"]] for i in range(n_carry)]
        for j in range(ny):
            ys[j][t] = vals[body.outputs[f"y{j}"]]
    out = carries + [np.stack(y) for y in ys]
    if save:
        out += [np.stack(s) for s in saved]
    return tuple(out)


scan = register(Op("scan", Kind.OPAQUE, _scan_infer, ref=_scan_ref))


def _get_infer(s, d, a):
    if d[0] != "tuple":
        raise ShapeError("get reads a result of a multi-result op")
    return tuple(a["shape"]), a["dtype"]


get = register(Op("get", Kind.OPAQUE, _get_infer, ref=lambda t, *, index, shape, dtype: t[index]))


def results(g, n: int) -> list[int]:
    """get nodes for every result of the multi-result node n (made if missing)."""
    types = scan_results([g.shape(a) for a in g.args(n)], [g.dtype(a) for a in g.args(n)], g.attrs(n))
    return [g.add("get", n, index=i, shape=t[0], dtype=t[1]) for i, t in enumerate(types)]


def inline(body, g, mapping: dict) -> dict:
    """Copy body's ops into g, its inputs replaced per `mapping`; returns the node map."""
    m = dict(mapping)
    for n in body.topo():
        if n in m:
            continue
        d = body[n]
        with g.at(d["loc"], d["role"]):
            m[n] = g.add(d["op"], *[m[a] for a in d["args"]], name=d["name"], **d["attrs"])
    return m


@scan.def_grad
def _(g, n, cot: dict):
    from .autodiff import vjp
    from .ir import Graph
    a = g.attrs(n)
    body = a["body"]
    nc, ni, ny = scan_layout(a)
    args = g.args(n)
    inits, seqs, caps = args[:nc], args[nc:nc + ni], args[nc + ni:]
    res = results_of(g, n)
    if not a.get("save"):
        raise AssertionError("a scan differentiated without saved carries")
    saved = [res[nc + ny + i] for i in range(nc)]
    float_caps = [j for j, c in enumerate(caps) if g.dtype(c) in FLOATS]
    float_seqs = [i for i, s in enumerate(seqs) if g.dtype(s) in FLOATS]
    cot_ys = [j for j in range(ny) if (nc + j) in cot]
    # ---- the backward body: one forward step recomputed, then differentiated ----
    bb = Graph(body.name + ".grad")
    with bb.at(None, role="grad"):
        gc = [bb.input(f"dc{i}", body.shape(body.inputs[i]), body.dtype(body.inputs[i]), "data") for i in range(nc)]
        gp = [bb.input(f"dp{j}", g.shape(caps[j]), g.dtype(caps[j]), "data") for j in float_caps]
        ct = [bb.input(f"c{i}", body.shape(body.inputs[i]), body.dtype(body.inputs[i]), "data") for i in range(nc)]
        xt = [bb.input(f"x{i}", body.shape(body.inputs[nc + i]), body.dtype(body.inputs[nc + i]), "data")
              for i in range(ni)]
        dyt = [bb.input(f"dy{j}", body.shape(body.outputs[f"y{j}"]), body.dtype(body.outputs[f"y{j}"]), "data")
               for j in cot_ys]
        pt = [bb.input(f"p{j}", g.shape(c), g.dtype(c), "data") for j, c in enumerate(caps)]
    m = inline(body, bb, dict(zip(body.inputs, ct + xt + pt)))
    seeds: dict[int, int] = {}

    def seed(node, c):
        with bb.at(None, role="grad"):
            seeds[node] = c if node not in seeds else bb.add("add", seeds[node], c)

    for i in range(nc):
        seed(m[body.outputs[f"c{i}"]], gc[i])
    for k, j in enumerate(cot_ys):
        seed(m[body.outputs[f"y{j}"]], dyt[k])
    wrt = ct + [xt[i] for i in float_seqs] + [pt[j] for j in float_caps]
    gr = vjp(bb, seeds, wrt)
    with bb.at(None, role="grad"):
        for i in range(nc):
            bb.outputs[f"c{i}"] = gr[ct[i]]
        for k, j in enumerate(float_caps):
            bb.outputs[f"c{nc + k}"] = bb.add("add", gp[k], gr[pt[j]])
        for k, i in enumerate(float_seqs):
            bb.outputs[f"y{k}"] = gr[xt[i]]
    # ---- the reverse scan in the outer graph ----
    def zeros(shape, dtype):
        return g.add("broadcast_to", g.const(0.0, dtype), shape=shape)

    b_inits = [cot.get(i) if cot.get(i) is not None else zeros(g.shape(inits[i]), g.dtype(inits[i]))
               for i in range(nc)]
    b_inits += [zeros(g.shape(caps[j]), g.dtype(caps[j])) for j in float_caps]
    b_seqs = saved + list(seqs) + [cot[nc + j] for j in cot_ys]
    back = g.add("scan", *b_inits, *b_seqs, *caps, body=bb, n_carry=len(b_inits), n_in=len(b_seqs),
                 reverse=not a.get("reverse", False), save=False, length=a.get("length"))
    bres = results(g, back)
    grads: list = [None] * len(args)
    for i in range(nc):
        grads[i] = bres[i]
    for k, j in enumerate(float_caps):
        grads[nc + ni + j] = bres[nc + k]
    nbc = len(b_inits)
    for k, i in enumerate(float_seqs):
        grads[nc + i] = bres[nbc + k]
    return grads


def results_of(g, n: int) -> list[int]:
    """The existing get node of each result of n (made where missing)."""
    types = scan_results([g.shape(a) for a in g.args(n)], [g.dtype(a) for a in g.args(n)], g.attrs(n))
    found = {g.attrs(c)["index"]: c for c in g.consumers(n) if g.op(c) == "get"}
    return [found[i] if i in found else g.add("get", n, index=i, shape=t[0], dtype=t[1])
            for i, t in enumerate(types)]


OPS["get"].grad = None   # handled by autodiff itself (cotangents of a multi-result op)
