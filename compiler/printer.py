"""Text and Graphviz views of the IR: stable, diffable, one op per line.

SSA names are renumbered in topological order (`%0`, `%1`, ...); inputs print by name
(`%x`, `%mlp/dense_1/W`); each line ends with the `.dl` line it came from.
"""
from __future__ import annotations

from pathlib import Path

from .shapes import fmt_type


def _names(g) -> dict[int, str]:
    names, k = {}, 0
    for n in g.topo():
        if g.op(n) == "input":
            names[n] = "%" + g[n]["name"]
        else:
            names[n] = f"%{k}"
            k += 1
    return names


def _attr_text(g, n) -> str:
    d = g[n]
    if d["op"] == "const":
        return repr(d["attrs"]["value"])
    parts = []
    for k, v in d["attrs"].items():
        if (k == "dtype" and d["op"] != "cast") or k == "body" or (d["op"] == "get" and k in ("shape", "dtype")):
            continue
        if d["op"] == "scan" and (k == "length" and v is None or k in ("save", "reverse") and not v):
            continue
        if isinstance(v, tuple):
            v = "[" + ", ".join(str(x) for x in v) + "]"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def _line(g, n, names) -> str:
    d = g[n]
    args = [names[a] if g.op(a) != "const" else repr(g.attrs(a)["value"]) for a in d["args"]]
    attrs = _attr_text(g, n)
    call = f"{d['op']}({', '.join(args + ([attrs] if attrs else []))})"
    loc = d["loc"]
    where = f"{Path(loc.file).name}:{loc.line}" if loc else ""
    role = "" if d["role"] == "forward" else f" [{d['role']}]"
    typ = "tuple" if d["dtype"] == "tuple" else fmt_type(d["dtype"], d["shape"])
    return f"  {names[n]:<6} = {call:<58} : {typ:<16} # {where}{role}"


def _scan_body(g, n, indent: str, dims: dict) -> list[str]:
    """A scan's body beneath it, and what its backward pass saves per step."""
    from .ops_scan import scan_layout
    a = g.attrs(n)
    body = a["body"]
    nc, ni, ny = scan_layout(a)
    names = _names(body)
    kinds = ["carry"] * nc + ["step of"] * ni + ["captured"] * (len(body.inputs) - nc - ni)
    outer = g.args(n)
    out = [f"{indent}body ({'reverse, ' if a.get('reverse') else ''}once per step):"]
    onames = _names(g)
    for b, kind, o in zip(body.inputs, kinds, outer):
        out.append(f"{indent}  {names[b]:<12} : {fmt_type(body.dtype(b), body.shape(b)):<16} {kind} {onames[o]}")
    lines = [_line(body, m, names) for m in body.topo() if body.op(m) not in ("input", "const")]
    if body.groups is not None:
        lines = [f"  kernel k{grp.id} ({grp.label(body)}): " + ", ".join(names[m] for m in grp.nodes)
                 for grp in body.groups] + lines
    out += [indent + x for x in lines]
    out.append(indent + "  next: " + ", ".join(f"{names[body.inputs[i]]} = {names[body.outputs[f'c{i}']]}"
                                               for i in range(nc)))
    if ny:
        out.append(indent + "  yield: " + ", ".join(names[body.outputs[f"y{j}"]] for j in range(ny)))
    if a.get("save"):
        saved = [body.inputs[i] for i in range(nc) if body.dtype(body.inputs[i]) != "tuple"]
        per = [(names[b], fmt_type(body.dtype(b), body.shape(b)), _bytes(body, b, dims)) for b in saved]
        text = ", ".join(f"{nm} {t}" for nm, t, _ in per)
        total = sum(x[2] for x in per) if all(x[2] is not None for x in per) else None
        T = g.shape(outer[nc])[0] if ni else a.get("length")
        line = f"{indent}  the backward pass saves per step: {text}"
        if total is not None and isinstance(T, int):
            line += f" = {total:,} bytes; x {T} steps = {total * T / 1024:,.1f} KiB"
            if dims:
                line += " at " + ", ".join(f"{k}={v}" for k, v in dims.items())
        out.append(line)
    return out


def _bytes(g, n, dims):
    import numpy as np
    from .shapes import DTYPES, resolve
    try:
        return int(np.prod(resolve(g.shape(n), dims))) * np.dtype(DTYPES[g.dtype(n)]).itemsize
    except KeyError:
        return None


def to_text(g, stage: str = "", params: dict | None = None, dims: dict | None = None) -> str:
    dims = dims or {}
    names = _names(g)
    out = [f"graph {g.name}" + (f"  (after {stage})" if stage else "")]
    out.append("inputs:")
    for n in g.inputs:
        d = g[n]
        extra = ""
        if params and d["name"] in params:
            extra = f"  init={params[d['name']].init}"
        loc = d["loc"]
        where = f"{Path(loc.file).name}:{loc.line}" if loc else ""
        line = f"  {names[n]:<28} : {fmt_type(d['dtype'], d['shape']):<16} {d['attrs']['kind']:<6}{extra}"
        out.append(f"{line}  # {where}" if where else line)
    consts_hidden = True
    if g.groups is None:
        out.append("ops:")
        for n in g.topo():
            if g.op(n) == "input" or (consts_hidden and g.op(n) == "const"):
                continue
            out.append(_line(g, n, names))
            if g.op(n) == "scan":
                out += _scan_body(g, n, "           ", dims)
    else:
        out.append(f"kernels: {len(g.groups)}")
        for grp in g.groups:
            writes = " ".join(names[n] for n in grp.outputs)
            shape = fmt_type(g.dtype(grp.nodes[-1]), g.shape(grp.nodes[-1]))
            out.append(f" kernel k{grp.id} ({grp.label(g)}, {len(grp.nodes)} op{'s' * (len(grp.nodes) != 1)},"
                       f" writes {writes})")
            for n in grp.nodes:
                tag = "  prologue" if n in grp.prologue else ("  anchor" if n == grp.anchor else "")
                out.append("  " + _line(g, n, names) + tag)
                if g.op(n) == "scan":
                    out += _scan_body(g, n, "             ", dims)
    out.append("outputs:")
    for k, v in g.outputs.items():
        out.append(f"  {k} = {names[v]}")
    if g.grad_of:
        out.append("gradients:")
        for k, v in g.grad_of.items():
            if v in g:
                out.append(f"  d loss / d {k} = {names[v]}")
    if g.updates:
        out.append("updates:")
        for s, v in g.updates.items():
            out.append(f"  {g[s]['name']} <- {names[v]}")
    return "\n".join(out) + "\n"


def _q(s: str) -> str:
    """A DOT string: quotes and backslashes escaped, line breaks as DOT's `\\n` escape."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(g, stage: str = "") -> str:
    names = _names(g)
    out = [f"digraph {_q(g.name)} {{", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    if stage:
        out.append(f"  label={_q(g.name + ' after ' + stage)};")

    def node(n):
        d = g[n]
        if d["op"] == "input":
            label = f"{d['name']}\n{fmt_type(d['dtype'], d['shape'])}"
            style = ', style=filled, fillcolor="#e8f0ff"' if d["attrs"]["kind"] == "param" else ""
            return f"  n{n} [label={_q(label)}, shape=ellipse{style}];"
        label = f"{names[n]} {d['op']}\n{fmt_type(d['dtype'], d['shape'])}"
        if d["op"] == "const":
            label = repr(d["attrs"]["value"])
        color = {"grad": ', color="#c04000"', "update": ', color="#008000"'}.get(d["role"], "")
        return f"  n{n} [label={_q(label)}{color}];"

    if g.groups is not None:
        grouped = set()
        for grp in g.groups:
            out.append(f"  subgraph cluster_k{grp.id} {{ label={_q(f'k{grp.id} {grp.label(g)}')}; style=dashed;")
            for n in grp.nodes:
                out.append("  " + node(n))
                grouped.add(n)
            out.append("  }")
        for n in g.topo():
            if n not in grouped:
                out.append(node(n))
    else:
        for n in g.topo():
            out.append(node(n))
    for a, b in g.g.edges:
        out.append(f"  n{a} -> n{b};")
    out.append("}")
    return "\n".join(out) + "\n"
