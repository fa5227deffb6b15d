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
        if k == "dtype" and d["op"] != "cast":
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
    return f"  {names[n]:<6} = {call:<58} : {fmt_type(d['dtype'], d['shape']):<16} # {where}{role}"


def to_text(g, stage: str = "", params: dict | None = None) -> str:
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
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(g, stage: str = "") -> str:
    names = _names(g)
    out = [f"digraph {_q(g.name)} {{", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    if stage:
        out.append(f"  label={_q(g.name + ' after ' + stage)};")

    def node(n):
        d = g[n]
        if d["op"] == "input":
            label = f"{d['name']}\\n{fmt_type(d['dtype'], d['shape'])}"
            style = ', style=filled, fillcolor="#e8f0ff"' if d["attrs"]["kind"] == "param" else ""
            return f"  n{n} [label={_q(label)}, shape=ellipse{style}];"
        label = f"{names[n]} {d['op']}\\n{fmt_type(d['dtype'], d['shape'])}"
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
