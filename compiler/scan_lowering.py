"""Lowering a `scan`: its body becomes a graph of its own, run once per time step by a `scan`
node (`compiler/ops_scan.py`); tensors of the enclosing graph that the body reads are captured
as inputs of the body."""
from __future__ import annotations

from dsl import ast as A
from dsl.diagnostics import DlcError

from .ir import Graph
from .ops_scan import results
from .program import Frame, Outer, Tensor
from .shapes import fmt_type


def lower_scan(lw, st: A.Scan, frame: Frame):
    """Lower a scan: its body becomes a graph of its own, run once per time step."""
    if lw.scans:
        raise DlcError("a scan inside another scan's body is not supported yet", st.loc)
    loc = lw.loc_of(st, frame)
    outer = lw.g
    seqs, T = [], None
    for name, e in st.ins:
        v = lw.eval(e, frame)
        if isinstance(v, range):
            if T is not None or seqs:
                raise DlcError("a scan steps over sequences or over one range(...), not both", e.loc)
            T = len(v)
            continue
        if not isinstance(v, Tensor) or len(outer.shape(v.node)) < 2:
            raise DlcError(f"`{name}` steps through axis 1 of a batch-first sequence [N, T, ...]; "
                           f"got {lw._describe(v)}", e.loc)
        seqs.append((name, v.node))
    if seqs and T is None:
        lens = {outer.shape(n)[1] for _, n in seqs}
        if len(lens) > 1:
            raise DlcError(f"the sequences of a scan differ in length: {sorted(map(str, lens))}", st.loc)
    if not seqs and T is None:
        raise DlcError("a scan needs a sequence to step through (`x in xs`) or `t in range(n)`", st.loc)
    carries = []
    for name, e in st.carries:
        v = lw.eval(e, frame)
        if not isinstance(v, Tensor):
            raise DlcError(f"carry `{name}` needs a tensor as its initial value, got {lw._describe(v)}", e.loc)
        carries.append((name, v.node))
    body = Graph(f"{outer.name}.scan")
    inner = Frame({k: (Outer(v.node) if isinstance(v, Tensor) else v) for k, v in frame.vars.items()},
                  dict(frame.dims), frame.scope, frame.fn, frame.user_loc)
    inner.yielded = []
    inner.counters = frame.counters          # the body is in its enclosing call's scope
    with body.at(loc):
        for name, n in carries:
            inner.vars[name] = Tensor(body.input(name, outer.shape(n), outer.dtype(n), "data"))
        for name, n in seqs:
            s = outer.shape(n)
            inner.vars[name] = Tensor(body.input(name, (s[0],) + tuple(s[2:]), outer.dtype(n), "data"))
    for name, e in st.ins:
        if name not in inner.vars or isinstance(inner.vars[name], Outer):
            inner.vars[name] = None           # the step of a range(...) has no value
    lw.scans.append({"graph": body, "captures": {}})
    lw.g = body
    try:
        lw.run_stmts(st.body, inner)
    finally:
        lw.g = outer
        cap = lw.scans.pop()
    if st.targets and len(inner.yielded) != len(st.targets):
        raise DlcError(f"the scan assigns {len(st.targets)} name{'s' * (len(st.targets) != 1)} but its body "
                       f"yields {len(inner.yielded)} value{'s' * (len(inner.yielded) != 1)}", st.loc)
    for i, (name, n) in enumerate(carries):
        v = inner.vars.get(name)
        if not isinstance(v, Tensor):
            raise DlcError(f"carry `{name}` must stay a tensor in the scan body", st.loc)
        if body.shape(v.node) != outer.shape(n):
            raise DlcError(f"carry `{name}` enters the step as {fmt_type(outer.dtype(n), outer.shape(n))} but "
                           f"leaves it as {fmt_type(body.dtype(v.node), body.shape(v.node))}", st.loc)
        out = v.node
        if body.dtype(out) != outer.dtype(n):
            with body.at(loc):
                out = body.add("cast", out, dtype=outer.dtype(n))
        body.outputs[f"c{i}"] = out
    if "rng" in cap:                 # random draws in the body: step t's seed is the scan's seed + t
        body.inputs.remove(cap["rng"])
        body.inputs.insert(len(carries), cap["rng"])
        with body.at(loc):
            body.outputs[f"c{len(carries)}"] = body.add("add", cap["rng"], body.const(1, "i64"))
        with outer.at(loc):
            carries.append(("", outer.add("broadcast_to", lw.rng_input(), shape=(1,))))
    for j, y in enumerate(inner.yielded):
        if not isinstance(y, Tensor):
            y = lw.to_tensor(y, None, st.loc)
        body.outputs[f"y{j}"] = y.node
    with outer.at(loc):
        perms = [(1, 0) + tuple(range(2, len(outer.shape(n)))) for _, n in seqs]
        tm = [outer.add("transpose", n, perm=p) for (_, n), p in zip(seqs, perms)]
        node = outer.add("scan", *[n for _, n in carries], *tm, *cap["captures"].keys(), body=body,
                         n_carry=len(carries), n_in=len(seqs), reverse=False, save=True, length=T)
        res = results(outer, node)
        for i, (name, _) in enumerate(carries):
            if name:
                frame.vars[name] = Tensor(res[i])
        for j, name in enumerate(st.targets):
            r = res[len(carries) + j]
            perm = (1, 0) + tuple(range(2, len(outer.shape(r))))
            frame.vars[name] = Tensor(outer.add("transpose", r, perm=perm))

def capture(lw, node: int) -> int:
    """An outer tensor used in a scan body becomes an input of the body."""
    cap = lw.scans[-1]
    if node not in cap["captures"]:
        g = lw.root if node in lw.root else lw.g
        kind = "scalar" if g.op(node) == "input" and g.attrs(node)["kind"] == "scalar" else "data"
        with cap["graph"].at(None):
            cap["captures"][node] = cap["graph"].input(f"cap{len(cap['captures'])}", g.shape(node),
                                                       g.dtype(node), kind)
    return cap["captures"][node]
