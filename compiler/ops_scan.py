"""`scan`: a recurrence over time kept as a loop in the IR, and `get`, its results.

A scan node's arguments are the initial carries, the per-step sequences (time-major,
[T, ...]) and the tensors its body captures from outside (parameters). Its attribute `body`
is a Graph whose inputs are (carries, one step of each sequence, captures) and whose outputs
are the new carries `c0..` and the per-step outputs `y0..`. The scan's results, read with
`get`, are: the final carries, the stacked per-step outputs [T, ...] and, when `save` is set,
the carry entering each step [T, ...] -- what the backward pass needs.

The gradient of a scan is a reverse scan (backpropagation through time): its body recomputes
one forward step from the saved carry and differentiates it (`autodiff.vjp`), carrying the
gradient of the carry backwards and summing the gradients of the captured tensors. Two
exceptions make it cheaper:

- products (`matmul`) of the forward body are saved per step, not recomputed, when their
  stack is at most `SAVE_PRODUCTS_ELEMENTS` elements per example (the forward scan's
  attribute `saved_products` counts them; `dlc ir` shows it): an LSTM's `h @ Wh` is the one
  GEMM of its step. Where a product's one reader adds it to another operand, that sum is
  saved instead (`_past_sum`: the LSTM's pre-activation `x_t Wx + h Wh`);
- a captured tensor whose step gradient is one product `u^T @ v` of a per-step operand `u`
  (a carry or a sequence: an LSTM's `Wh`, from `h^T @ dz`) gets its gradient after the loop,
  as one GEMM over all steps, instead of T small ones summed into a carry.
"""
from __future__ import annotations

import numpy as np

from .ops import OPS, Kind, Op, evaluate, register
from .shapes import FLOATS, ShapeError, dim_factors, fmt_shape, same_dim

SAVE_PRODUCTS_ELEMENTS = 1 << 20      # per example (4 MiB in float32): save a product's stack up to this


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


def _scan_ref(*args, body, n_carry, n_in, reverse=False, save=False, length=None, saved_products=0):
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
    if not a.get("save"):
        raise AssertionError("a scan differentiated without saved carries")
    kept = _save_products(g, n)
    a, body = g.attrs(n), g.attrs(n)["body"]
    ny = scan_layout(a)[2]
    res = results_of(g, n)
    saved = [res[nc + ny + i] for i in range(nc)]
    kept_stacks = res[nc + ny - len(kept):nc + ny]
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
        kt = [bb.input(f"k{k}", body.shape(x), body.dtype(x), "data") for k, x in enumerate(kept)]
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
    for x, k in zip(kept, kt):          # the saved product's (or sum's) value, its gradient rule unchanged
        bb.replace_uses(m[x], k)
        bb.remove(m[x])
    # captures whose gradient is u^T @ v with u a step of a sequence: one GEMM after the loop
    seq_of = {**{ct[i]: saved[i] for i in range(nc)}, **{xt[i]: seqs[i] for i in range(ni)}}
    after = {k: (seq_of[bb.args(gr[pt[j]])[0]], bb.args(gr[pt[j]])[1]) for k, j in enumerate(float_caps)
             if _step_outer_product(bb, gr[pt[j]], seq_of)}
    for k in after:
        bb.inputs.remove(gp[k])
        bb.remove(gp[k])
    summed = [k for k in range(len(float_caps)) if k not in after]
    with bb.at(None, role="grad"):
        for i in range(nc):
            bb.outputs[f"c{i}"] = gr[ct[i]]
        for q, k in enumerate(summed):
            bb.outputs[f"c{nc + q}"] = bb.add("add", gp[k], gr[pt[float_caps[k]]])
        ys = [gr[xt[i]] for i in float_seqs]
        for _, v in after.values():     # a step's v is often its input's gradient already
            if v not in ys:
                ys.append(v)
        for k, y in enumerate(ys):
            bb.outputs[f"y{k}"] = y
    # ---- the reverse scan in the outer graph ----
    def zeros(shape, dtype):
        return g.add("broadcast_to", g.const(0.0, dtype), shape=shape)

    b_inits = [cot.get(i) if cot.get(i) is not None else zeros(g.shape(inits[i]), g.dtype(inits[i]))
               for i in range(nc)]
    b_inits += [zeros(g.shape(caps[float_caps[k]]), g.dtype(caps[float_caps[k]])) for k in summed]
    b_seqs = saved + list(seqs) + [cot[nc + j] for j in cot_ys] + list(kept_stacks)
    back = g.add("scan", *b_inits, *b_seqs, *caps, body=bb, n_carry=len(b_inits), n_in=len(b_seqs),
                 reverse=not a.get("reverse", False), save=False, length=a.get("length"))
    bres = results(g, back)
    grads: list = [None] * len(args)
    for i in range(nc):
        grads[i] = bres[i]
    for q, k in enumerate(summed):
        grads[nc + ni + float_caps[k]] = bres[nc + q]
    nbc = len(b_inits)
    for k, i in enumerate(float_seqs):
        grads[nc + i] = bres[nbc + k]
    for k, (u, v) in after.items():                 # sum over steps and rows: [T*N, K]^T @ [T*N, M]
        v = bres[nbc + ys.index(v)]
        u2 = g.add("reshape", u, shape=(-1, g.shape(u)[-1]))
        v2 = g.add("reshape", v, shape=(-1, g.shape(v)[-1]))
        grads[nc + ni + float_caps[k]] = g.add("matmul", u2, v2, ta=True, tb=False)
    return grads


def _step_outer_product(bb, d: int, seq_of: dict) -> bool:
    """Is backward-body node d a 2-D `u^T @ v` with u one step of a sequence (not a capture)?"""
    if bb.op(d) != "matmul" or not bb.attrs(d).get("ta") or bb.attrs(d).get("tb"):
        return False
    u, v = bb.args(d)
    return u in seq_of and bb.op(v) != "input" and len(bb.shape(u)) == 2 and len(bb.shape(v)) == 2


def _save_products(g, n: int) -> list[int]:
    """Let the forward scan n also yield the products of its body whose stacks are small enough
    (SAVE_PRODUCTS_ELEMENTS per example), for its gradient to read instead of recomputing them.
    Returns those body nodes, yielded last (the saved carries' results move up)."""
    a = g.attrs(n)
    body = a["body"]
    nc, ni, ny = scan_layout(a)
    T = g.shape(g.args(n)[nc])[0] if ni else a["length"]
    keep = [_past_sum(body, x) for x in body.topo() if body.op(x) == "matmul" and x not in body.outputs.values()
            and _per_example(T) * _per_example(*body.shape(x)) <= SAVE_PRODUCTS_ELEMENTS]
    keep = [x for x in dict.fromkeys(keep) if x not in body.outputs.values()]
    if not keep:
        return []
    body = body.copy()                  # the forward program may share it
    for k, x in enumerate(keep):
        body.outputs[f"y{ny + k}"] = x
    for c in g.consumers(n):            # the saved carries come after every yielded output
        if g.op(c) == "get" and g.attrs(c)["index"] >= nc + ny:
            g.attrs(c)["index"] += len(keep)
    g[n]["attrs"] = {**a, "body": body, "saved_products": len(keep)}
    return keep


def _past_sum(body, x: int) -> int:
    """The value to save for product x: x, or the sum its one reader makes of it with another
    operand of the step (an LSTM's z = x_t Wx + h Wh): the backward step then reads z and
    recomputes neither (a sum's gradient needs no operand's value), and the forward writes z
    once for its gates to read, not x and z (32 x [B, 4H] fewer values written and read)."""
    readers = set(body.consumers(x))
    if len(readers) != 1:
        return x
    (c,) = readers
    if body.op(c) not in ("add", "sub") or body.shape(c) != body.shape(x) or body.dtype(c) != body.dtype(x):
        return x
    return c


def _per_example(*dims) -> int:
    """Elements of a shape with its symbolic sizes (the batch) taken as 1."""
    out = 1
    for d in dims:
        out *= dim_factors(d)[0]
    return out


def results_of(g, n: int) -> list[int]:
    """The existing get node of each result of n (made where missing)."""
    types = scan_results([g.shape(a) for a in g.args(n)], [g.dtype(a) for a in g.args(n)], g.attrs(n))
    found = {g.attrs(c)["index"]: c for c in g.consumers(n) if g.op(c) == "get"}
    return [found[i] if i in found else g.add("get", n, index=i, shape=t[0], dtype=t[1])
            for i, t in enumerate(types)]


OPS["get"].grad = None   # handled by autodiff itself (cotangents of a multi-result op)
