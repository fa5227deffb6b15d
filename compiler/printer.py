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


def _type(g, n) -> str:
    return "tuple" if g.dtype(n) == "tuple" else fmt_type(g.dtype(n), g.shape(n))


def to_dot(g, stage: str = "") -> str:
    """Graphviz: a box per op (its SSA name, op and attributes; its type; the `.dl` line), an
    ellipse per input (parameters shaded), gradient ops red and updates green, a dashed
    cluster per fused kernel."""
    names = _names(g)
    out = [f"digraph {_q(g.name)} {{", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];',
           '  edge [color="#555555", arrowsize=0.6];']
    if stage:
        out.append(f"  label={_q(g.name + ' after ' + stage)}; labelloc=t; fontname=\"sans-serif\";")

    def node(n):
        d = g[n]
        if d["op"] == "input":
            label = f"{d['name']}\n{_type(g, n)}"
            style = ', style=filled, fillcolor="#e8f0ff"' if d["attrs"]["kind"] == "param" else ""
            return f"  n{n} [label={_q(label)}, shape=ellipse{style}];"
        if d["op"] == "const":
            return f"  n{n} [label={_q(repr(d['attrs']['value']))}, shape=plaintext];"
        attrs = _attr_text(g, n)
        label = f"{names[n]} = {d['op']}" + (f"({attrs})" if attrs else "") + f"\n{_type(g, n)}"
        if d["loc"]:
            label += f"\n{Path(d['loc'].file).name}:{d['loc'].line}"
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


FORMATS = ("svg", "png")


def render(dot: str, fmt: str) -> bytes:
    """Lay out DOT text with Graphviz's `dot` (svg or png); a DlcError when it is not installed."""
    import shutil
    import subprocess

    from dsl.diagnostics import DlcError
    exe = shutil.which("dot")
    if exe is None:
        raise DlcError(f"--format {fmt} needs Graphviz's `dot` program, which is not installed",
                       notes=["install Graphviz (apt-get install graphviz, brew install graphviz), or write "
                              "--format dot and render it elsewhere"])
    r = subprocess.run([exe, f"-T{fmt}"], input=dot.encode(), capture_output=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"dot failed: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<style>
body {{ margin: 0; font: 14px/1.4 system-ui, sans-serif; color: #222; display: flex; height: 100vh; }}
#graph {{ flex: 3; overflow: auto; border-right: 1px solid #ccc; background: #fff; }}
#side {{ flex: 2; overflow: auto; background: #fafafa; }}
header {{ padding: 8px 12px; background: #2b3a55; color: #fff; position: sticky; top: 0; }}
header a {{ color: #cde; }} header h1 {{ font-size: 16px; margin: 0; }} header p {{ margin: 2px 0 0; font-size: 12px; opacity: .85; }}
pre {{ margin: 0; padding: 8px 12px; font: 12px/1.45 ui-monospace, monospace; }}
pre span {{ display: block; white-space: pre; }} pre span:hover {{ background: #eef; cursor: pointer; }}
pre span.hit {{ background: #ffe58a; }} svg g.node.hit > polygon, svg g.node.hit > ellipse {{ fill: #ffe58a; }}
svg g.node {{ cursor: pointer; }} .legend b {{ padding: 0 6px; border-radius: 3px; }}
#graph.fit svg {{ width: 100%; height: auto; }}
button {{ position: fixed; left: 8px; top: 8px; z-index: 1; }}
</style></head><body>
<button onclick="document.getElementById('graph').classList.toggle('fit')">fit / 100%</button>
<div id="graph" class="fit">{svg}</div>
<div id="side"><header><h1>{title}</h1><p>{summary}</p>
<p class="legend"><b style="background:#e8f0ff;color:#222">parameter</b> <b style="border:1px solid #c04000">gradient</b>
<b style="border:1px solid #008000">update</b> dashed box: one fused kernel. Click a node or a line.</p></header>
<pre>{listing}</pre></div>
<script>
function pick(id) {{
  document.querySelectorAll('.hit').forEach(e => e.classList.remove('hit'));
  const line = document.getElementById('L' + id);
  if (line) {{ line.classList.add('hit'); line.scrollIntoView({{block: 'center'}}); }}
  document.querySelectorAll('svg g.node').forEach(g => {{
    if (g.querySelector('title').textContent === 'n' + id) {{ g.classList.add('hit'); g.scrollIntoView({{block: 'center', inline: 'center'}}); }}
  }});
}}
document.querySelectorAll('svg g.node').forEach(g => g.addEventListener('click', () => pick(g.querySelector('title').textContent.slice(1))));
document.querySelectorAll('pre span[id]').forEach(s => s.addEventListener('click', () => pick(s.id.slice(1))));
document.body.dataset.nodes = document.querySelectorAll('svg g.node').length;
</script></body></html>
"""


def to_html(g, stage: str = "", svg: str | None = None, pages: list[str] | None = None) -> str:
    """One self-contained page (no network: styles, script and the Graphviz SVG inline): the
    graph beside its listing, one line per node; clicking either highlights both. `pages`:
    the stages written beside it as STAGE.html, linked from the header."""
    import html
    names = _names(g)

    def line(n):
        d = g[n]
        text = f"  {names[n]:<28} : {_type(g, n)}  {d['attrs']['kind']}" if d["op"] == "input" else _line(g, n, names)
        return f'<span id="L{n}">{html.escape(text)}</span>'
    lines = ["<span><b>inputs</b></span>"] + [line(n) for n in g.inputs]
    if g.groups is None:
        lines += ["<span><b>ops</b></span>"] + [line(n) for n in g.topo() if g.op(n) not in ("input", "const")]
    else:
        for grp in g.groups:
            lines.append(f"<span><b>kernel k{grp.id} ({html.escape(grp.label(g))})</b></span>")
            lines += [line(n) for n in grp.nodes]
    if svg is None:
        svg = "<p style='padding:12px'>Graphviz's <code>dot</code> is not installed: the listing only.</p>"
    else:
        svg = svg[svg.index("<svg"):]                  # drop the XML prolog and DOCTYPE
    kernels = f", {len(g.groups)} kernels" if g.groups is not None else ""
    summary = f"{sum(1 for n in g.topo() if g.op(n) not in ('input', 'const'))} ops, {len(g.inputs)} inputs{kernels}"
    title = f"{g.name}" + (f" after {stage}" if stage else "")
    if pages:
        summary += "<br>" + " · ".join(f"<b>{p}</b>" if p == stage else f'<a href="{p}.html">{p}</a>' for p in pages)
    return _HTML.format(title=html.escape(title), summary=summary, svg=svg, listing="".join(lines))
