"""The target-independent renderer of kernels and the step function."""
from __future__ import annotations

import math
import re

from .. import cache
from ..memory import Plan
from ..ops import OPS
from ..shapes import dim_factors, fmt_type

NP_DTYPE = {"f32": "np.float32", "f64": "np.float64", "i32": "np.int32", "i64": "np.int64", "bool": "np.bool_"}


def comment(text: str) -> str:
    """Make arbitrary text (a `.dl` source line) safe inside a `#` comment."""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text).strip()


def _attr_text(v) -> str:
    """Attributes as stable text (a scan's body graph by its size, never an object address)."""
    if hasattr(v, "topo"):
        return f"<body: {len(v.nodes())} nodes>"
    return str(v)


def literal(value, dtype: str) -> str:
    if dtype == "bool":
        return "True" if value else "False"
    if isinstance(value, float) and math.isinf(value):
        v = "np.inf" if value > 0 else "-np.inf"
    elif isinstance(value, float) and math.isnan(value):
        v = "np.nan"
    else:
        v = repr(float(value) if dtype in ("f32", "f64") else int(value))
    return f"{NP_DTYPE[dtype]}({v})"


class Renderer:
    """Renders one graph + memory plan into a Python module of Numba kernels."""

    def __init__(self, g, plan: Plan, target):
        self.g, self.plan, self.t = g, plan, target
        self.dim_names: dict[str, str] = {}
        self.int_dims = False
        self.input_kind = {n: g.attrs(n)["kind"] for n in g.inputs}

    # ---- dims ----------------------------------------------------------------------------------
    def dim(self, d) -> str:
        """A dimension as an expression over the step's dim variables (never a `.dl` name).
        While a kernel is rendered (`int_dims`), a fixed size other than 1 is a placeholder
        that becomes one of the kernel's parameters: kernels that differ only in their sizes
        are one kernel (inlined into a compiled step, the sizes are constants again)."""
        coef, syms = dim_factors(d)
        parts = [self.dim_names[s] for s in syms]
        if not parts and coef != 1 and self.int_dims:
            return f"__int{coef}__"
        if coef != 1 or not parts:
            parts.insert(0, str(coef))
        return "*".join(parts)

    def shape_expr(self, shape) -> str:
        inner = ", ".join(self.dim(d) for d in shape)
        return f"({inner},)" if len(shape) == 1 else f"({inner})"

    def dims_used(self, shapes) -> list[str]:
        used = set()
        for s in shapes:
            for d in s:
                used.update(self.dim_names[x] for x in dim_factors(d)[1])
        return sorted(used)

    # ---- comments ------------------------------------------------------------------------------
    def ref(self, n) -> str:
        d = self.g[n]
        if d["op"] == "input":
            return "%" + d["name"]
        if d["op"] == "const":
            return repr(d["attrs"]["value"])
        return f"%{n}"

    def ir_line(self, n) -> str:
        d = self.g[n]
        args = ", ".join(self.ref(a) for a in d["args"])
        attrs = ", ".join(f"{k}={_attr_text(v)}" for k, v in d["attrs"].items() if k not in ("dtype",))
        loc = d["loc"]
        where = ""
        if loc is not None:
            from dsl.diagnostics import source_line
            src = source_line(loc.file, loc.line) or ""
            where = f"  {loc.short()}  {src.strip()}"
        text = f"%{n}: {fmt_type(d['dtype'], d['shape'])} = {d['op']}({args}{', ' + attrs if attrs else ''})"
        return comment(f"{text:<60}{where}")

    # ---- kernels -------------------------------------------------------------------------------
    def kernel(self, grp) -> tuple[str, list[int], list[int], list[str]]:
        """Source of one kernel and its parameters: (source, read nodes, written nodes, dims)."""
        k = _Kernel(self, grp)
        body = self.t.render_kernel(k)
        self.launch = k.launch
        if body is not None:
            return k.finish(body)
        if grp.pattern in ("elementwise",) or (grp.pattern == "opaque" and OPS[self.g.op(grp.nodes[0])].scalar):
            nodes = [n for n in grp.nodes if n != grp.tail]
            body = k.loop_body(nodes, self.g.shape(grp.nodes[-1]) if grp.pattern == "opaque" else None)
        elif grp.pattern == "reduce":
            body = k.reduce_body()
        elif grp.pattern == "anchored":
            body = k.anchor_body()
        elif grp.pattern == "opaque":
            body = k.template_body()
        else:
            raise AssertionError(grp.pattern)
        return k.finish(body + k.tail_lines())


class _Kernel:
    """One kernel being rendered: tracks which arrays it reads and writes."""

    def __init__(self, r: Renderer, grp):
        self.r, self.g, self.grp, self.t = r, r.g, grp, r.t
        self.members = set(grp.nodes)
        self.params: dict[int, str] = {}      # outside node -> parameter name
        self.outs: dict[int, str] = {}        # written node -> parameter name
        self.shapes = []
        self.flat_loop = False                # rendering a flat (1-D) loop
        self.segment = None                   # (loop variable, lo, hi): rendering that part of its range
        self.flat_views: dict[str, str] = {}  # parameter -> its 1-D view
        self.launch = None                    # the launch configuration a target's kernel needs
        # a row-wise tail (softmax) runs in place on its output: its input is written there
        self.tail_in = r.g.args(grp.tail)[0] if grp.tail is not None else None

    def param(self, n) -> str:
        if n not in self.params:
            self.params[n] = f"x{len(self.params)}"
            self.shapes.append(self.g.shape(n))
        return self.params[n]

    def out(self, n) -> str:
        state = self.r.plan.inplace.get(n)
        if state is not None:
            # an in-place update is written through the array's one parameter: two names for
            # one array would stop Numba from vectorizing the loop (it must assume aliasing)
            return self.param(state)
        if n == self.tail_in:
            return self.out(self.grp.tail)
        if n not in self.outs:
            self.outs[n] = f"y{len(self.outs)}"
            self.shapes.append(self.g.shape(n))
        return self.outs[n]

    def index(self, shape, idx: list[str], it_shape) -> str:
        """Read index of a value of `shape` in a loop over `it_shape` (right-aligned broadcast)."""
        if not shape:
            return "()"
        lead = len(it_shape) - len(shape)
        parts = []
        for j, d in enumerate(shape):
            p = lead + j
            parts.append("0" if (d == 1 and it_shape[p] != 1) else idx[p])
        return ", ".join(parts)

    def read(self, a, consumer, pos, idx, it_shape, local: dict) -> str:
        g = self.g
        if a in local:
            return local[a]
        if g.op(a) == "const":
            return literal(g.attrs(a)["value"], g.dtype(a))
        if g.op(a) == "input" and self.r.input_kind[a] == "scalar":
            return self.param(a)
        if self.flat_loop:
            return f"{self.flat_view(self.param(a))}[i]"
        spec = OPS[g.op(consumer)]
        if pos in spec.remaps:              # at the op's own index (shifted, permuted, gathered)
            at = ", ".join(spec.read_at(g.attrs(consumer), pos, list(idx)))
            if "{" in at:                   # it depends on another argument's value (take's ids)
                args = g.args(consumer)
                at = at.format(*[self.read(b, consumer, k, idx, it_shape, local) if f"{{{k}}}" in at else ""
                                 for k, b in enumerate(args)])
            return f"{self.param(a)}[{at}]"
        return f"{self.param(a)}[{self.index(g.shape(a), idx, it_shape)}]"

    def compute(self, n, idx, it_shape, local) -> str:
        """Assign node n's value at the loop index to a local; return the statement."""
        g = self.g
        spec = OPS[g.op(n)]
        tmpl = self.t.scalar_template(spec, g.dtype(n), [g.op(a) == "const" for a in g.args(n)])
        if spec.name == "size":
            x = g.args(n)[0]
            axes = g.attrs(n)["axes"]
            dims = [g.shape(x)[i] for i in axes]
            size = " * ".join(self.r.dim(d) for d in dims) or "1"
            self.shapes.append(tuple(dims))
            expr = tmpl.format(T=NP_DTYPE[g.dtype(n)], size=size)
        else:
            attrs = g.attrs(n)
            ax = idx[attrs["axis"]] if isinstance(attrs.get("axis"), int) and idx else "0"
            if spec.name == "unslice" and self.segment is not None and self.segment[0] == ax:
                # a part of the loop wholly inside or wholly outside [start, stop): no test
                _, lo, hi = self.segment
                inside = attrs["start"] <= lo and hi <= attrs["stop"]
                local[n] = f"v{n}"
                return f"v{n} = " + (self.read(g.args(n)[0], n, 0, idx, it_shape, local) if inside
                                      else literal(0.0, g.dtype(n)))
            args = [self.read(a, n, i, idx, it_shape, local) for i, a in enumerate(g.args(n))]
            expr = tmpl.format(*args, T=NP_DTYPE[g.dtype(n)], last=idx[-1] if idx else "0",
                               flat=self.flat(idx, it_shape), ax=ax, **attrs)
        local[n] = f"v{n}"
        return f"v{n} = {expr}"

    def flat(self, idx, shape) -> str:
        """Row-major linear index of the loop position."""
        if not idx:
            return "0"
        expr = idx[0]
        for v, d in zip(idx[1:], shape[1:]):
            expr = f"({expr}) * {self.r.dim(d)} + {v}"
        return expr

    def loops(self, shape, var: str) -> tuple[list[str], list[str]]:
        idx = [f"{var}{i}" for i in range(len(shape))]
        heads = [self.t.loop_header(v, self.r.dim(d)) for v, d in zip(idx, shape)]
        return idx, heads

    def nest(self, shape, var, body_fn) -> list[str]:
        idx, heads = self.loops(shape, var)
        lines = []
        for depth, h in enumerate(heads):
            lines.append("    " * depth + h)
        inner = body_fn(idx)
        lines += ["    " * len(heads) + s for s in inner]
        return lines

    def stores(self, nodes, idx, shape, local) -> list[str]:
        out = []
        for n in nodes:
            if n in self.grp.outputs or n == self.tail_in:
                ix = ", ".join(idx) if idx else "()"
                out.append(f"{self.out(n)}[{ix}] = {local[n]}")
        return out

    def flat_ok(self, nodes, shape) -> bool:
        """Can the loop run over one flat index? Yes when every array it reads or writes has
        the loop's exact shape and no op reads at a remapped index. (LLVM vectorizes the flat
        loop, selects included; a nest over small inner dimensions it often does not.)"""
        g = self.g
        if len(shape) < 2:
            return False
        for n in nodes:
            spec = OPS[g.op(n)]
            if not spec.flat:
                return False
            for a in g.args(n):
                if a in nodes or g.op(a) == "const" or (g.op(a) == "input" and self.r.input_kind[a] == "scalar"):
                    continue
                if tuple(g.shape(a)) != tuple(shape):
                    return False
        return True

    def flat_view(self, name: str) -> str:
        """A 1-D view of a kernel parameter, made once at the top of the kernel."""
        self.flat_views.setdefault(name, f"{name}_f")
        return self.flat_views[name]

    def loop_body(self, nodes, shape=None) -> list[str]:
        shape = shape if shape is not None else self.g.shape(nodes[-1])
        if self.flat_ok(nodes, shape):
            total = " * ".join(self.r.dim(d) for d in shape)
            self.shapes.append(tuple(shape))
            self.flat_loop = True
            local: dict = {}
            inner = [self.compute(n, ["i"], (total,), local) for n in nodes]
            inner += [f"{self.flat_view(self.out(n))}[i] = {local[n]}" for n in nodes
                      if n in self.grp.outputs or n == self.tail_in]
            self.flat_loop = False
            return [self.t.loop_header("i", total)] + ["    " + x for x in inner]

        def body(idx):
            local: dict = {}
            lines = [self.compute(n, idx, shape, local) for n in nodes]
            return lines + self.stores(nodes, idx, shape, local)
        cuts = self.unslice_cuts(nodes, shape)
        if cuts is None:
            return self.nest(shape, "i", body)
        # the loop over the unslices' axis cut at their bounds: one nest per part, where each
        # unslice is its argument or zero (an LSTM's four gate gradients into one [B, 4H]
        # buffer: four tests a value that kept the loop scalar, 10.1 -> 1.6 us a call)
        axis, bounds = cuts
        lines = []
        idx, heads = self.loops(shape, "i")
        for lo, hi in zip(bounds, bounds[1:]):
            self.segment = (idx[axis], lo, hi)
            heads[axis] = self.t.loop_header(idx[axis], str(hi), str(lo))
            lines += ["    " * d + h for d, h in enumerate(heads)]
            lines += ["    " * len(heads) + x for x in body(idx)]
        self.segment = None
        return lines

    def unslice_cuts(self, nodes, shape) -> tuple[int, list[int]] | None:
        """(axis, sorted bounds from 0 to its size) where the loop's unslices all place their
        argument along one axis of the loop's own shape; None where there are none."""
        g = self.g
        uns = [n for n in nodes if g.op(n) == "unslice"]
        if not uns or any(tuple(g.shape(n)) != tuple(shape) for n in uns):
            return None
        axes = {g.attrs(n)["axis"] for n in uns}
        if len(axes) != 1:
            return None
        axis = axes.pop()
        if not isinstance(axis, int) or not 0 <= axis < len(shape) or not isinstance(shape[axis], int):
            return None
        bounds = sorted({0, shape[axis]} | {g.attrs(n)[k] for n in uns for k in ("start", "stop")})
        return axis, bounds

    def reduce_body(self) -> list[str]:
        g, grp = self.g, self.grp
        r = grp.anchor
        x = g.args(r)[0]
        in_shape = g.shape(x)
        axes = set(g.attrs(r)["axes"])
        keep = g.attrs(r).get("keepdims", False)
        kshape = tuple(1 if i in axes else d for i, d in enumerate(in_shape))
        self.shapes.append(in_shape)
        is_max = g.op(r) == "reduce_max"
        acc_dt = "np.float64" if g.dtype(r) in ("f32", "f64") else NP_DTYPE[g.dtype(r)]
        lowest = {"i32": -2**31, "i64": -2**63, "bool": False}.get(g.dtype(r), "-np.inf")   # max starts below all
        init = self.t.full(self.r.shape_expr(kshape), lowest if is_max else 0, acc_dt)
        lines = [f"acc = {init}"]
        # reduced axes innermost (a row's sum): the running value is a local, kept in a register
        # (`acc[...] +=` in the loop is a load and a store per element that LLVM cannot
        # vectorize, acc possibly aliasing the outputs: 2.7 ns an element against 0.3)
        # When only the innermost axes are reduced, that is all of them (a row's sum: `acc = s`);
        # otherwise the reduced innermost run still sums into a local, added to acc after it (a
        # bias gradient's sum over (0, 2, 3): 690 -> ~150 us a LeNet step)
        k = len(in_shape)
        while k > 0 and (k - 1) in axes:
            k -= 1
        suffix = k < len(in_shape)
        whole = suffix and len(axes) == len(in_shape) - k

        def pro(idx):
            local: dict = {}
            out = [self.compute(n, idx, in_shape, local) for n in grp.prologue]
            out += self.stores(grp.prologue, idx, in_shape, local)
            val = self.read(x, r, 0, idx, in_shape, local)
            aidx = ", ".join("0" if i in axes else v for i, v in enumerate(idx)) or "()"
            tgt = "s" if suffix else f"acc[{aidx}]"
            if is_max:
                out += [f"xv = {val}", f"if xv > {tgt}:", f"    {tgt} = xv"]
            else:
                out.append(f"{tgt} += {val}")
            return out
        if suffix:
            idx, heads = self.loops(in_shape, "i")
            lines += ["    " * d + h for d, h in enumerate(heads[:k])]
            lines.append("    " * k + f"s = {acc_dt}({lowest if is_max else 0})")
            lines += ["    " * (k + d) + h for d, h in enumerate(heads[k:])]
            lines += ["    " * len(heads) + line for line in pro(idx)]
            cell = f"acc[{', '.join('0' if i in axes else v for i, v in enumerate(idx[:k]))}{', ' if k else ''}" \
                   f"{', '.join(['0'] * (len(in_shape) - k))}]"
            if whole:
                lines.append("    " * k + f"{cell} = s")
            elif is_max:
                lines += ["    " * k + f"if s > {cell}:", "    " * (k + 1) + f"{cell} = s"]
            else:
                lines.append("    " * k + f"{cell} += s")
        else:
            lines += self.nest(in_shape, "i", pro)
        out_shape = g.shape(r)
        epi = [n for n in grp.nodes if n not in grp.prologue and n != r]

        def ep(idx):
            if keep:
                aidx = idx
            else:
                it = iter(idx)
                aidx = ["0" if i in axes else next(it) for i in range(len(in_shape))]
            local = {r: f"v{r}"}
            out = [f"v{r} = {NP_DTYPE[g.dtype(r)]}(acc[{', '.join(aidx) or '()'}])"]
            out += [self.compute(n, idx, out_shape, local) for n in epi]
            return out + self.stores([r] + epi, idx, out_shape, local)
        lines += self.nest(out_shape, "j", ep)
        return lines

    def anchor_body(self) -> list[str]:
        """A matmul or convolution writing its result, then its fused elementwise epilogue."""
        g, grp = self.g, self.grp
        m = grp.anchor
        so = g.shape(m)
        epi = [n for n in grp.nodes if n != m and n != grp.tail]
        # where the product lands: m's own buffer, else an epilogue output of its type
        if m in grp.outputs or m == self.tail_in:
            tgt = self.out(m)
        else:
            cands = [n for n in grp.outputs if g.dtype(n) == g.dtype(m) and g.shape(n) == so
                     and n not in self.r.plan.inplace]
            tgt = self.out(cands[-1]) if cands else None
        lines = []
        if tgt is None:
            lines.append(f"acc = {self.t.alloc(self.r.shape_expr(so), NP_DTYPE[g.dtype(m)])}")
            tgt = "acc"
        if g.op(m) == "matmul":
            lines += self.matmul_lines(m, tgt)
        else:
            lines += self.template_lines(m, tgt)
        if epi:
            def ep(idx):
                local = {m: f"v{m}"}
                out = [f"v{m} = {tgt}[{', '.join(idx) or '()'}]"]
                out += [self.compute(n, idx, so, local) for n in epi]
                return out + self.stores(epi, idx, so, local)
            lines += self.nest(so, "i", ep)
        return lines

    def matmul_lines(self, m, tgt) -> list[str]:
        g = self.g
        a, b = g.args(m)
        ta, tb = g.attrs(m).get("ta", False), g.attrs(m).get("tb", False)
        sa, sb, so = g.shape(a), g.shape(b), g.shape(m)
        A, B = self.param(a), self.param(b)
        self.shapes += [sa, sb, so]
        lines = []
        if len(sa) == 2 and len(sb) == 2:
            lines.append(self.t.matmul_call(A + (".T" if ta else ""), B + (".T" if tb else ""), tgt))
        elif len(sb) == 2 and not ta:
            k_in = self.r.dim(sa[-1])
            a2 = f"{A}.reshape((-1, {k_in}))" if len(sa) > 2 else A
            o2 = f"{tgt}.reshape((-1, {self.r.dim(so[-1])}))" if len(so) > 2 else tgt
            lines.append(self.t.matmul_call(a2 + (".T" if ta else ""), B + (".T" if tb else ""), o2))
        elif len(sa) == len(sb) and all(x == y for x, y in zip(sa[:-2], sb[:-2])):
            nb = " * ".join(self.r.dim(d) for d in sa[:-2])
            ra = f"{A}.reshape(({nb}, {self.r.dim(sa[-2])}, {self.r.dim(sa[-1])}))"
            rb = f"{B}.reshape(({nb}, {self.r.dim(sb[-2])}, {self.r.dim(sb[-1])}))"
            ro = f"{tgt}.reshape(({nb}, {self.r.dim(so[-2])}, {self.r.dim(so[-1])}))"
            lines += [f"a3 = {ra}", f"b3 = {rb}", f"o3 = {ro}"]
            batched = self.t.batched_matmul_call("a3", "b3", "o3", bool(ta), bool(tb))
            lines += [batched] if batched else [
                self.t.loop_header("bi", nb),
                "    " + self.t.matmul_call("a3[bi]" + (".T" if ta else ""), "b3[bi]" + (".T" if tb else ""), "o3[bi]")]
        else:
            raise NotImplementedError("matmul with broadcast batch dimensions")
        return lines

    def template_lines(self, n, out: str, src: str | None = None) -> list[str]:
        """An op's loop-nest template, formatted with its arguments and named sizes (its first
        argument read from array `src` if given)."""
        g = self.g
        spec = OPS[g.op(n)]
        tmpl = (self.t.kernel_templates.get((spec.name, g.dtype(n)))      # by (op, dtype), then by op
                or self.t.kernel_templates.get(spec.name, spec.kernel))
        names = {f"x{i}": src if src and i == 0 else self.param(a) for i, a in enumerate(g.args(n))}
        if spec.kernel_sizes is not None:
            sizes = spec.kernel_sizes(g, n)
            self.shapes.append(tuple(sizes.values()))
            names.update({k: str(v) if k in spec.literal_sizes else self.r.dim(v) for k, v in sizes.items()})
            if callable(tmpl):
                tmpl = tmpl(sizes)
        else:                                   # row-wise ops (softmax): rows x last axis
            shape = g.shape(g.args(n)[0])
            self.shapes.append(shape)
            rows = " * ".join(self.r.dim(d) for d in shape[:-1]) or "1"
            ncol = self.r.dim(shape[-1])
            pre = [f"xin = {names['x0']}.reshape(({rows}, {ncol}))", f"yout = {out}.reshape(({rows}, {ncol}))"]
            body = tmpl.format("xin", out="yout", rows=rows, n=ncol, T=NP_DTYPE[g.dtype(n)])
            return pre + body.rstrip().split("\n")
        attrs = {k: v for k, v in g.attrs(n).items() if k not in names and isinstance(v, (int, float))}
        body = tmpl.format(out=out, T=NP_DTYPE[g.dtype(n)], **names, **attrs)
        return body.rstrip().split("\n")

    def template_body(self) -> list[str]:
        n = self.grp.nodes[0]
        return self.template_lines(n, self.out(n))

    def tail_lines(self) -> list[str]:
        """The kernel's row-wise tail (softmax), in place on its output, where the loops above
        wrote its input."""
        t = self.grp.tail
        if t is None:
            return []
        buf = self.out(t)
        return self.template_lines(t, buf, src=buf)

    def finish(self, body):
        body = [f"{v} = {p}.reshape(-1)" for p, v in self.flat_views.items()] + body
        dims = self.r.dims_used(self.shapes)
        return body, list(self.params), list(self.outs), dims, self.params, self.outs


class _Module:
    """The generated program: one module per distinct kernel, and the step's module.

    Kernels are deduplicated by content: a kernel's text, once its locals and dimension
    parameters are renamed in order of appearance, names no buffer and no node, so the same
    computation on other buffers (the second block of a Transformer, a layer's forward in the
    training step and in the evaluation program) is one function, compiled once. Each distinct
    kernel lives in its own module, named by the hash of its text (`dlc_<hash>`), so Numba's
    disk cache shares it between programs and models. The step's module imports them and holds
    the scan loops and the step itself.
    """

    def __init__(self, target, compiled_step: bool = True):
        self.t = target
        self.compiled_step = compiled_step
        self.calls: list[tuple[str, list]] = []    # calls of kernels compiled alone: (name, argument types)
        self.kernels: list[str] = []            # the step module's own functions (scan loops)
        self.imports: list[str] = []            # ... and its kernel imports, with their comments
        self.helpers: list[str] = []
        self.modules: dict[str, str] = {}       # kernel module name -> source
        self.helper_modules: set[str] = set()   # ... of which these hold helpers
        self.by_text: dict[str, str] = {}       # canonical kernel text -> its name here
        self.count = 0                          # kernels rendered (scan loops and their bodies' included)
        self.scan_names: list[str] = []
        self.nscans = 0

    @staticmethod
    def arg_type(g, n) -> tuple:
        """A kernel argument's type: ("array", dtype, ndim) or ("scalar", dtype)."""
        if g.op(n) == "input" and g.attrs(n)["kind"] == "scalar":
            return ("scalar", g.dtype(n))
        return ("array", g.dtype(n), len(g.shape(n)))

    def helper_for(self, op, dtype=None) -> tuple[str, ...]:
        """The helper texts an op's kernel code calls: the target's, by (op, dtype) then by op,
        or else the op's own (an entry is one text or a tuple of them; "" or None: none)."""
        h = self.t.helpers.get((op, dtype)) or self.t.helpers.get(op, OPS[op].helpers)
        return tuple(x for x in ((h,) if isinstance(h, str) or h is None else h) if x)

    def helper_import(self, helper: str) -> str:
        """The import of a helper's functions from its own module, made the first time. Every
        kernel calling `_im2col` or `_exp_f32` shares one compiled helper, typed and compiled
        once per process (and cached on disk), where a copy in each kernel's module was
        compiled again with each (cnn: `_im2col` 12 times, 14 % of its cold compile). The
        module's name is the hash of its text, so a kernel's text, and with it its cache entry,
        changes whenever a helper it calls does."""
        modname, src = helper_module(self.t, helper)
        self.modules.setdefault(modname, src)        # before the kernels that import it
        self.helper_modules.add(modname)
        names = re.findall(r"^def (\w+)\(", helper, re.M)
        return f"from {modname} import {', '.join(names)}"

    def distinct(self, g, r, grp, body: list[str], params: list[str], dims: list[str]) -> str:
        """The name of the kernel with this body, making its module the first time."""
        ren: dict[str, str] = {d: f"n{i}" for i, d in enumerate(dims)}

        def canon(m):
            name = m.group(0)
            if name[0] == "v" and name not in ren:
                ren[name] = f"t{sum(1 for k in ren if k[0] == 'v')}"
            return ren.get(name, name)
        pat = re.compile(r"\b(?:v\d+|d\d+)\b")
        text = "\n".join([f"def kernel({', '.join(params)}):"] + ["    " + line for line in body])
        text = pat.sub(canon, text)
        helpers = []
        for n in grp.nodes:         # the helper functions the text calls (pow by a constant: none)
            for h in self.helper_for(g.op(n), g.dtype(n)):
                if h not in helpers and any(re.search(rf"\b{f}\(", text) for f in re.findall(r"^def (\w+)\(", h, re.M)):
                    helpers.append(h)
        # (helper imports in one order, whatever the order of the ops that need them: the same
        # kernel text is the same module)
        src = "\n".join(["# Generated by dlc: one kernel. Do not edit.", "import math", "import numpy as np",
                          self.t.prelude, ""] + sorted(self.helper_import(h) for h in helpers)
                         + ["", self.t.function_decorator, text, ""]
                         + self.t.kernel_exports() + [""])
        if src not in self.by_text:
            kname = f"k{len(self.by_text)}"
            self.by_text[src] = kname
            modname = f"dlc_{cache.module_key(src, self.t.name)}"
            self.modules[modname] = src
            head = [f"# ---- kernel {kname}: {grp.label(g)}, {len(grp.nodes)} op{'s' * (len(grp.nodes) != 1)} ----"]
            head += ["# " + r.ir_line(n) for n in grp.nodes]
            self.imports.append("\n".join(head + [f"from {modname} import kernel as {kname}, inlined as {kname}i", ""]))
        return self.by_text[src]

    def function(self, g, plan: Plan, fname: str, mode: str, host: bool = False, unread: frozenset = frozenset()
                 ) -> list[str]:
        """One function over graph g: `step` (allocates and returns its outputs) or a scan
        `body` (writes its outputs into trailing destination arguments, except those at the
        positions in `unread`, which nobody reads); compiled, except a Python step and, with
        `host`, a body run from host Python (see `hosted`)."""
        r = Renderer(g, plan, self.t)
        if mode == "body" and not host:
            self.write_outputs_in_place(g, plan, unread)
        binds = []
        for i, n in enumerate(g.inputs):         # dims: bound from the inputs' shapes
            for ax, d in enumerate(g.shape(n)):
                if isinstance(d, str) and "*" not in d and d not in r.dim_names:
                    r.dim_names[d] = f"d{len(r.dim_names)}"
                    binds.append(f"{r.dim_names[d]} = a{i}.shape[{ax}]")
        if mode == "step":
            binds = [x for i, n in enumerate(g.inputs) for x in self.t.bind_input(f"a{i}", r.input_kind[n])] + binds
        lines = []
        # A step run from Python keeps its scratch buffers across calls, one set per set of
        # dimensions (memory.py: fresh large buffers cost a page fault per page each step)
        arena = mode == "step" and not self.compiled_step
        scratch = []
        for grp in plan.order:
            if grp.pattern == "view":
                n = grp.nodes[0]
                plan.storage[n] = f"v{n}"
                lines.append(f"v{n} = {plan.storage[g.args(n)[0]]}.reshape({r.shape_expr(g.shape(n))})")
                continue
            hosted = False
            if grp.pattern == "scan":
                kname = f"scan{self.nscans}"
                config = None                       # host code: launched by a call
                self.nscans += 1
                hosted = self.hosted(g, grp, from_host=host or (mode == "step" and not self.compiled_step))
                body, reads, writes, dims, pnames, onames = self.scan_kernel(r, grp, kname, hosted)
                params = [pnames[x] for x in reads] + [onames[x] for x in writes] + dims
                for n in grp.nodes:
                    for h in self.helper_for(g.op(n), g.dtype(n)):
                        if h not in self.helpers:
                            self.helpers.append(h)
                text = [f"# ---- kernel {kname}: {grp.label(g)}, {len(grp.nodes)} op{'s' * (len(grp.nodes) != 1)} ----"]
                text += ["# " + r.ir_line(n) for n in grp.nodes]
                text += ["# (host Python: a time loop calling its body's kernels)" if hosted else self.inlinable(len(params)),
                         f"def {kname}({', '.join(params)}):"]
                text += ["    " + line for line in body] + [""]
                self.kernels.append("\n".join(text))
                self.scan_names.append(kname)
            else:
                r.int_dims = True
                body, reads, writes, dims, pnames, onames = r.kernel(grp)
                r.int_dims = False
                config = r.launch if r.launch is None else re.sub(r"__int(\d+)__", r"\1", r.launch)
                sizes = list(dict.fromkeys(re.findall(r"__int(\d+)__", "\n".join(body))))
                body = [re.sub(r"__int(\d+)__", lambda m: f"m{sizes.index(m.group(1))}", x) for x in body]
                params = [pnames[x] for x in reads] + [onames[x] for x in writes] + dims
                kname = self.distinct(g, r, grp, body, params + [f"m{i}" for i in range(len(sizes))], dims)
                # called from compiled code (a scan's body), a bare number would be typed as a
                # literal, compiling the kernel again for every size: pass an int64
                dims = dims + (sizes if mode == "step" else [f"np.int64({v})" for v in sizes])
            self.count += 1
            for name, shape, dtype in plan.allocs.get(grp.id, []):
                alloc = self.t.alloc(r.shape_expr(shape), NP_DTYPE[dtype])
                if arena and name not in plan.escaping:
                    scratch.append((name, alloc))
                else:
                    lines.append(f"{name} = {alloc}")
            call_args = [plan.storage[x] for x in reads] + [plan.storage[x] for x in writes] + dims
            # the compiled step inlines each kernel; Python and a scan's body call it
            inline = mode == "step" and self.compiled_step
            lines.append(self.t.launch(kname + "i" if inline and grp.pattern != "scan" else kname, call_args, grp,
                                       config))
            if not inline and not hosted:
                types = [self.arg_type(g, x) for x in reads + writes] + [("int",)] * len(dims)
                self.calls.append((kname, self.t.call_types(types, config)))
        compiled = (mode == "body" and not host) or self.compiled_step
        for st, v in plan.copies:
            lines.append(self.copy(plan.storage[st], plan.storage[v], compiled))
        args = [f"a{i}" for i in range(len(g.inputs))]
        outs = list(g.outputs)
        if mode == "body":
            dests = [f"o{i}" for i in range(len(outs))]
            for i, (dname, k) in enumerate(zip(dests, outs)):
                if i not in unread and plan.storage[g.outputs[k]] != dname:
                    lines.append(self.copy(dname, plan.storage[g.outputs[k]], not host))
            head = [f"# ---- {fname}: one step of a scan ({', '.join(outs)}) ----",
                    "# (host Python)" if host else self.inlinable(len(args + dests)),
                    f"def {fname}({', '.join(args + dests)}):"]
            return head + ["    " + x for x in binds + lines] + ["    return", ""]
        ret = ", ".join(plan.storage[g.outputs[k]] for k in outs)
        if scratch:
            key = ", ".join(r.dim_names.values())
            names = ", ".join(nm for nm, _ in scratch)
            binds += [f"scratch = _arena.get(({key}{',' if len(r.dim_names) == 1 else ''}))",
                      "if scratch is None:",
                      "    if len(_arena) >= 4:      # a few sets of dimensions (the last, smaller batch)",
                      "        _arena.clear()",
                      f"    scratch = _arena[({key}{',' if len(r.dim_names) == 1 else ''})] = "
                      f"({', '.join(a for _, a in scratch)},)",
                      f"{names}{',' if len(scratch) == 1 else ''} = scratch"]
        head = ["# ---- the step: allocate, run every kernel in order ----"]
        head += ["_arena: dict = {}    # dims -> the step's scratch buffers, kept across calls"] if scratch else []
        head += [self.t.step_decorator] if self.compiled_step else ["# (plain Python: each kernel is compiled alone)"]
        head += [f"def {fname}({', '.join(args)}):"]
        enter = [self.t.step_enter] if self.t.step_enter else []
        leave = [self.t.step_exit] if self.t.step_exit else []
        body = binds + lines
        if enter and not self.compiled_step:    # Python: the mode comes back even when a kernel raises
            body = ["try:"] + ["    " + x for x in body] + ["finally:"] + ["    " + x for x in leave]
            leave = []
        return head + ["    " + x for x in enter + body + leave] + \
            [f"    return ({ret}{',' if len(outs) == 1 else ''})", ""]

    @staticmethod
    def write_outputs_in_place(g, plan: Plan, unread) -> None:
        """A compiled scan body's kernels write its outputs straight into their destinations
        (`o<i>`: the next carry, the step's row of a stacked output), not into scratch copied
        there at the end. The destinations are the loop's other ping-pong carry and fresh
        output arrays, so they alias none of the body's inputs. A value that is two outputs
        is written to the first and copied to the second. (An LSTM's forward step copied
        36 K values a step, its backward 24 K: about 10 % of its training step.)"""
        kernel_of = {n: grp for grp in plan.order for n in grp.outputs}
        taken = set()
        for i, k in enumerate(g.outputs):
            v = g.outputs[k]
            grp = kernel_of.get(v)
            if i in unread or v in taken or grp is None or grp.pattern in ("view", "scan"):
                continue
            taken.add(v)
            plan.storage[v] = f"o{i}"
        used = set(plan.storage.values())
        for gid, allocs in plan.allocs.items():
            plan.allocs[gid] = [a for a in allocs if a[0] in used]

    def copy(self, dst: str, src: str, compiled: bool) -> str:
        """`dst[...] = src` element by element (same size, C order). Compiled code calls the
        target's copy helper: Numba compiles a slice assignment's shape check anew at every
        site (about 0.1 s each, half of a GRU decoder's scan compile)."""
        helper = getattr(self.t, "copy_helper", None)
        if not compiled or helper is None:
            return self.t.copy(dst, src)
        if helper not in self.helpers:
            self.helpers.append(helper)
        return f"_copy({dst}, {src})"

    def inlinable(self, nparams: int) -> str:
        """The decorator of a scan loop or body: inlined where it is called, except with more
        than 30 parameters, which Numba's inliner rejects (then called: a few ns per call)."""
        if not self.t.kernel_decorator:            # host code (the CUDA target's scans): not compiled
            return ""
        return self.t.kernel_decorator if nparams <= 30 else self.t.function_decorator

    def hosted(self, g, grp, from_host: bool) -> bool:
        """Does this scan's time loop run in host Python, calling its body's kernels one by one?
        Always on a target that compiles no host code (CUDA). On the CPU, for a scan called
        from host code (a Python step) whose body calls more than the target's
        `host_scan_kernels` kernels: Numba links every kernel a compiled loop calls into the
        loop's own module and optimizes and generates its code again there (translate's greedy
        decoder, 55 kernels a step: 5.3 s of a 15 s cold compile), while calling them from
        Python costs about a microsecond each per time step."""
        if not self.t.kernel_decorator:
            return True
        limit = getattr(self.t, "host_scan_kernels", None)
        if not from_host or limit is None:
            return False
        from ..memory import plan as plan_memory
        body = plan_memory(g.attrs(grp.nodes[0])["body"])
        return sum(1 for x in body.order if x.pattern != "view") > limit

    def scan_kernel(self, r: Renderer, grp, kname: str, hosted: bool = False):
        """The time loop: ping-pong carry buffers, one call of the body function per step."""
        from ..memory import plan as plan_memory
        from ..ops_scan import scan_layout, scan_results
        g = r.g
        n = grp.nodes[0]
        a = g.attrs(n)
        body = a["body"]
        nc, ni, ny = scan_layout(a)
        bname = f"{kname}_body"
        gets = {g.attrs(x)["index"]: x for x in grp.nodes if g.op(x) == "get"}
        unread = frozenset(nc + j for j in range(ny) if nc + j not in gets)
        self.kernels.append("\n".join(self.function(body, plan_memory(body), bname, "body", host=hosted,
                                                     unread=unread)))
        k = _Kernel(r, grp)
        args = g.args(n)
        names = [k.param(x) for x in args]
        types = scan_results([g.shape(x) for x in args], [g.dtype(x) for x in args], a)
        outs = {i: k.out(x) for i, x in sorted(gets.items())}
        k.shapes += [t[0] for t in types]
        T = f"{names[nc]}.shape[0]" if ni else str(a["length"])
        lines = [f"T = {T}"]
        for i in range(nc):
            shape = g.shape(args[i])
            lines.append(f"cb{i} = {self.t.alloc(r.shape_expr((2,) + tuple(shape)), NP_DTYPE[g.dtype(args[i])])}")
            lines.append(self.copy(f"cb{i}[0]", names[i], not hosted))
        ydest = []
        for j in range(ny):
            if nc + j in outs:
                ydest.append(f"{outs[nc + j]}[t]")
            else:                                   # an output nobody reads: a scratch step buffer
                shape, dtype = types[nc + j]
                lines.append(f"ys{j} = {self.t.alloc(r.shape_expr(shape[1:]), NP_DTYPE[dtype])}")
                ydest.append(f"ys{j}")
        lines.append(self.t.loop_header("s", "T"))
        lines.append(f"    t = {'T - 1 - s' if a.get('reverse') else 's'}")
        lines.append("    cur = s % 2")
        for i in range(nc):
            if a.get("save") and nc + ny + i in outs:
                lines.append("    " + self.copy(f"{outs[nc + ny + i]}[t]", f"cb{i}[cur]", not hosted))
        call = [f"cb{i}[cur]" for i in range(nc)] + [f"{names[nc + j]}[t]" for j in range(ni)]
        call += names[nc + ni:] + [f"cb{i}[1 - cur]" for i in range(nc)] + ydest
        lines.append(f"    {bname}({', '.join(call)})")
        for i in range(nc):
            if i in outs:
                lines.append(self.copy(outs[i], f"cb{i}[T % 2]", not hosted))
        return k.finish(lines)

    def source(self, g, step_lines) -> str:
        head = [f"# Generated by dlc for `{comment(g.name)}`. Do not edit.", "import math", "import numpy as np",
                self.t.prelude] + ([self.t.step_imports] if self.t.step_imports else []) + [""]
        helpers = [self.helper_import(h) for h in self.helpers]
        return "\n".join(head + helpers + [""] + self.imports + self.kernels + step_lines) + "\n"


def generate(g, plan: Plan, target, compiled_step: bool = True) -> tuple[str, dict]:
    """The step module's source and its calling convention for the runtime. `meta["modules"]`
    holds the kernel modules (name -> source) that the step module imports; `meta["calls"]`
    the calls of kernels compiled alone (from a Python step, from scan bodies) with their
    argument types. With `compiled_step` the step is one `@njit` function with every kernel
    inlined; without, plain Python calling each kernel."""
    mod = _Module(target, compiled_step)
    step = mod.function(g, plan, "step", "step")
    source = mod.source(g, step)
    meta = {"outputs": list(g.outputs), "kernels": mod.count, "distinct_kernels": len(mod.by_text) + len(mod.scan_names),
            "modules": mod.modules, "helper_modules": mod.helper_modules, "calls": mod.calls,
            "names": list(mod.by_text.values()) + mod.scan_names}
    return source, meta


def helper_module(target, helper: str) -> tuple[str, str]:
    """The name and source of the module holding `helper` (a target's or an op's helper text)."""
    src = "\n".join(["# Generated by dlc: helper functions of the kernels. Do not edit.", "import math",
                     "import numpy as np", target.prelude, "", helper.rstrip("\n"), ""])
    return f"dlc_{cache.module_key(src, target.name)}", src
