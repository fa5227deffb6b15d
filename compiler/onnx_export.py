"""dlc's graph IR -> an ONNX model (the `onnx` package's helper API, opset 18).

    model = to_onnx(graph, weights, name="mlp")     # weights: parameter/state name -> array

`graph` is a forward program after the autodiff-free passes (simplify, cse, dce), before
fusion. Its data inputs become the model's inputs (symbolic dimensions such as `B` stay
symbolic), parameters and state its initializers, and its outputs the model's. Each IR op has
one entry in `EXPORTERS`: a function that emits the ONNX nodes computing it. A program using
an op without one (random draws, `scan`) is refused with an error naming the op and its line.

A random draw (`normal`, `uniform`, ...) becomes an input of the model, `noise_K`, shaped like
the draw: ONNX has no generator with dlc's counter-based stream, so the caller feeds the noise
(dlc's own draws reproduce dlc's output exactly, any other noise samples the same model).

Symbolic sizes a shape needs at run time (a `reshape` to `[B, 128]`, an `iota` over `T`) are
computed in the model from the shape of the data input that binds the symbol.
"""
from __future__ import annotations

import numpy as np

from dsl.diagnostics import DlcError

from .shapes import DTYPES, dim_factors, promote

OPSET = 18

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:          # pragma: no cover - the `onnx` extra is not installed
    onnx = None

ONNX_DTYPES = {"f32": 1, "f64": 11, "i32": 6, "i64": 7, "bool": 9}     # TensorProto's codes


def require_onnx():
    if onnx is None:
        raise DlcError("ONNX export and import need the `onnx` package: pip install 'dlc[onnx]'")


class Exporter:
    """Builds the ONNX graph: node outputs are named `t{n}` after IR node n, data inputs and
    initializers by their dlc names."""

    def __init__(self, graph, weights: dict, parent: "Exporter | None" = None):
        self.g, self.weights, self.parent = graph, weights, parent
        self.root = parent.root if parent else self    # a scan body's exporter shares names and constants
        self.nodes, self.inits, self.names = [], [], {}
        self._k = 0
        self._consts: dict = {}
        self._dims: dict = {}
        self.noise: list = []           # value infos of the random draws, which become inputs

    # ---- emitting --------------------------------------------------------------------------
    def fresh(self, hint: str = "v") -> str:
        self.root._k += 1
        return f"_{hint}{self.root._k}"

    def node(self, op: str, inputs: list[str], out: str | None = None, n_out: int = 1, **attrs):
        """Emit a node; its output's name (a list of n_out names for several)."""
        outs = [out] if out else [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype: str | np.dtype) -> str:
        if self.parent is not None:             # outer-scope values are visible in a body
            return self.root.const(value, dtype)
        a = np.asarray(value, DTYPES[dtype] if isinstance(dtype, str) else dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            name = self.fresh("c")
            self.inits.append(numpy_helper.from_array(a, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values) -> str:
        return self.const(np.asarray(values, np.int64), np.int64)

    def cast(self, x: str, frm: str, to: str) -> str:
        return x if frm == to else self.node("Cast", [x], to=ONNX_DTYPES[to])

    def arg(self, n: int, i: int, dtype: str | None = None) -> str:
        """The ONNX name of node n's i-th argument, cast to `dtype` if given."""
        a = self.g.args(n)[i]
        return self.cast(self.names[a], self.g.dtype(a), dtype) if dtype else self.names[a]

    # ---- sizes known at run time -------------------------------------------------------------
    def dim(self, d) -> str:
        """A 1-element int64 tensor holding dimension d (an int, a symbol or a product)."""
        if self.parent is not None:
            return self.root.dim(d)
        if d in self._dims:
            return self._dims[d]
        coef, syms = dim_factors(d)
        out = None
        for s in syms:
            t = self._symbol(s)
            out = t if out is None else self.node("Mul", [out, t])
        if out is None:
            out = self.ints([coef])
        elif coef != 1:
            out = self.node("Mul", [out, self.ints([coef])])
        self._dims[d] = out
        return out

    def _symbol(self, s: str) -> str:
        for n in self.g.inputs:
            shape = self.g.shape(n)
            if self.g.attrs(n)["kind"] == "data" and s in shape:
                k = shape.index(s)
                return self.node("Shape", [self.names[n]], start=k, end=k + 1)
        raise DlcError(f"cannot export: the size `{s}` is bound by no data input")

    def shape(self, shape) -> str:
        """A shape as a 1-D int64 tensor: a constant when every dimension is fixed."""
        if all(isinstance(d, int) for d in shape):
            return self.ints(list(shape))
        return self.node("Concat", [self.dim(d) for d in shape], axis=0) if shape else self.ints([])

    # ---- the whole graph ---------------------------------------------------------------------
    def run(self, name: str):
        g = self.g
        inputs = []
        for n in g.inputs:
            kind, nm = g.attrs(n)["kind"], g[n]["name"]
            if not g.consumers(n) and n not in g.outputs.values():
                continue
            self.names[n] = nm
            if kind == "data":
                dims = [d if isinstance(d, int) else str(d) for d in g.shape(n)]
                inputs.append(helper.make_tensor_value_info(nm, ONNX_DTYPES[g.dtype(n)], dims))
            elif kind in ("param", "state"):
                if nm not in self.weights:
                    raise DlcError(f"cannot export: no value for {kind} `{nm}`")
                w = np.asarray(self.weights[nm], DTYPES[g.dtype(n)])
                self.inits.append(numpy_helper.from_array(w, nm))
            elif any(g.op(c) not in RANDOM for c in g.consumers(n)):
                raise DlcError(f"cannot export: the program reads the run-time scalar `{nm}`", g[n]["loc"])
        for n in g.topo():
            op = g.op(n)
            if op == "input" or n in self.names:      # (an add folded into a Conv's bias)
                continue
            fn = EXPORTERS.get(op)
            if fn is None:
                raise DlcError(f"cannot export op `{op}`: dlc's ONNX exporter has no entry for it", g[n]["loc"],
                               ["recurrent models (`scan`) are not exported yet"] if op == "scan" else [])
            self.names[n] = fn(self, n)
        inputs += self.noise
        outputs = []
        for key, n in g.outputs.items():
            self.node("Identity", [self.names[n]], out=key)
            dims = [d if isinstance(d, int) else str(d) for d in g.shape(n)]
            outputs.append(helper.make_tensor_value_info(key, ONNX_DTYPES[g.dtype(n)], dims))
        needed, kept = set(g.outputs), []
        for node in reversed(self.nodes):          # drop what a folded pattern left unread
            if any(o in needed for o in node.output):
                kept.append(node)
                needed.update(node.input)
                needed.update(_body_reads(node))  # a Scan body reads outer values by name
        inits = [t for t in self.inits if t.name in needed]
        graph = helper.make_graph(kept[::-1], name, inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="dlc")
        model.ir_version = 8          # readable by onnxruntime releases from 1.14 on
        return model


def _body_reads(node) -> set[str]:
    """The names a node's subgraphs (a Scan's body, nested too) read."""
    out = set()
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            for m in a.g.node:
                out.update(m.input)
                out |= _body_reads(m)
    return out


def to_onnx(graph, weights: dict, name: str = "dlc"):
    """The ONNX model of `graph` (see the module docstring); it passes `onnx.checker`."""
    require_onnx()
    model = Exporter(graph, weights).run(name)
    onnx.checker.check_model(model, full_check=True)
    return model


# ---- the table: one entry per IR op -----------------------------------------------------------
EXPORTERS: dict = {}
RANDOM = ("rand_normal", "rand_uniform")


def exports(*ops):
    def deco(fn):
        for op in ops:
            EXPORTERS[op] = fn
        return fn
    return deco


def _simple(onnx_op: str, same_dtype: bool = True):
    """An op whose ONNX twin takes the same arguments (cast to the result's dtype)."""
    def emit(e: Exporter, n: int) -> str:
        g = e.g
        args = [e.arg(n, i, g.dtype(n) if same_dtype else None) for i in range(len(g.args(n)))]
        return e.node(onnx_op, args)
    return emit


for _op, _onnx in {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "tanh": "Tanh",
                   "sigmoid": "Sigmoid", "relu": "Relu", "abs": "Abs", "sign": "Sign", "erf": "Erf",
                   "floor": "Floor", "sin": "Sin", "cos": "Cos", "stop_gradient": "Identity",
                   "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max",
                   "minimum": "Min", "logical_and": "And", "logical_or": "Or",
                   "logical_not": "Not"}.items():
    EXPORTERS[_op] = _simple(_onnx)


@exports("floordiv")
def _floordiv(e, n):            # Python's: toward -inf, for floats and integers alike
    t = e.g.dtype(n)
    a, b = e.arg(n, 0, "f64"), e.arg(n, 1, "f64")
    return e.cast(e.node("Floor", [e.node("Div", [a, b])]), "f64", t)


def _compare(onnx_op, negate=False):
    def emit(e, n):
        g = e.g
        t = promote(*(g.dtype(a) for a in g.args(n)))
        out = e.node(onnx_op, [e.arg(n, 0, t), e.arg(n, 1, t)])
        return e.node("Not", [out]) if negate else out
    return emit


for _op, _onnx in {"lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual",
                   "eq": "Equal"}.items():
    EXPORTERS[_op] = _compare(_onnx)
EXPORTERS["ne"] = _compare("Equal", negate=True)


@exports("const")
def _const(e, n):
    a = e.g.attrs(n)
    return e.const(a["value"], a["dtype"])


@exports("cast")
def _cast(e, n):
    return e.cast(e.arg(n, 0), e.g.dtype(e.g.args(n)[0]), e.g.dtype(n))


@exports("where")
def _where(e, n):
    t = e.g.dtype(n)
    return e.node("Where", [e.arg(n, 0, "bool"), e.arg(n, 1, t), e.arg(n, 2, t)])


@exports("onehot")
def _onehot(e, n):              # x[..., None] == arange(depth): a negative label is all zeros
    g, a = e.g, e.g.attrs(n)
    x = g.args(n)[0]
    ids = e.node("Unsqueeze", [e.names[x], e.ints([-1])])
    hit = e.node("Equal", [ids, e.const(np.arange(a["depth"]), g.dtype(x))])
    return e.cast(hit, "bool", a["dtype"])


@exports("broadcast_to")
def _broadcast_to(e, n):         # Expand broadcasts both ways: 1 keeps the input's dimension
    g = e.g
    src, dst = g.shape(g.args(n)[0]), g.shape(n)
    off = len(dst) - len(src)
    target = [1 if i >= off and src[i - off] == d else d for i, d in enumerate(dst)]
    return e.node("Expand", [e.arg(n, 0), e.shape(target)])


@exports("reshape")
def _reshape(e, n):
    """A constant target where it can be: 0 keeps the input's dimension at that index, -1
    stands for one unknown; else the sizes computed at run time."""
    g = e.g
    src, dst = g.shape(g.args(n)[0]), g.shape(n)
    target = [d if isinstance(d, int) else 0 if i < len(src) and src[i] == d else None for i, d in enumerate(dst)]
    if target.count(None) <= 1 and 0 not in [d for d in dst if isinstance(d, int)]:
        return e.node("Reshape", [e.arg(n, 0), e.ints([-1 if d is None else d for d in target])])
    return e.node("Reshape", [e.arg(n, 0), e.shape(dst)])


@exports("transpose")
def _transpose(e, n):
    return e.node("Transpose", [e.arg(n, 0)], perm=list(e.g.attrs(n)["perm"]))


def _swap_last(e, x: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return e.node("Transpose", [x], perm=perm)


@exports("matmul")
def _matmul(e, n):
    g, a = e.g, e.g.attrs(n)
    x, w = g.args(n)
    xs, ws = e.names[x], e.names[w]
    if a.get("ta"):
        xs = _swap_last(e, xs, len(g.shape(x)))
    if a.get("tb"):
        ws = _swap_last(e, ws, len(g.shape(w)))
    return e.node("MatMul", [xs, ws])


@exports("reduce_sum", "reduce_max")
def _reduce(e, n):
    a = e.g.attrs(n)
    op = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax"}[e.g.op(n)]
    return e.node(op, [e.arg(n, 0), e.ints(list(a["axes"]))], keepdims=int(bool(a["keepdims"])))


@exports("softmax", "log_softmax")
def _softmax(e, n):
    op = {"softmax": "Softmax", "log_softmax": "LogSoftmax"}[e.g.op(n)]
    return e.node(op, [e.arg(n, 0)], axis=e.g.attrs(n).get("axis", -1))


def _pair(v):
    return list(v) if isinstance(v, (list, tuple)) else [v, v]


def _channel_bias(g, n):
    """conv2d n followed only by `+ reshape(b, [1, C, 1, 1])` (conv2d's bias): (add, b) or None."""
    users = g.consumers(n)
    if len(users) != 1 or g.op(users[0]) != "add" or n in g.outputs.values():
        return None
    add = users[0]
    other = [a for a in g.args(add) if a != n]
    if len(other) != 1 or g.op(other[0]) != "reshape":
        return None
    b = g.args(other[0])[0]
    C = g.shape(n)[1]
    if g.shape(other[0]) != (1, C, 1, 1) or g.shape(b) != (C,) or g.shape(add) != g.shape(n):
        return None
    return add, b


@exports("conv2d")
def _conv(e, n):                # with its bias as Conv's third input when one follows
    a = e.g.attrs(n)
    p = _pair(a.get("padding", 0))
    bias = _channel_bias(e.g, n)
    args = [e.arg(n, 0), e.arg(n, 1)] + ([e.names[bias[1]]] if bias else [])
    out = e.node("Conv", args, strides=_pair(a.get("stride", 1)), pads=p + p, dilations=_pair(a.get("dilation", 1)))
    if bias:
        e.names[bias[0]] = out
    return out


@exports("conv_transpose2d")
def _conv_t(e, n):
    a = e.g.attrs(n)
    p = _pair(a.get("padding", 0))
    return e.node("ConvTranspose", [e.arg(n, 0), e.arg(n, 1)], strides=_pair(a.get("stride", 1)), pads=p + p,
                  dilations=_pair(a.get("dilation", 1)), output_padding=_pair(a.get("output_padding", 0)))


@exports("max_pool2d", "avg_pool2d")
def _pool(e, n):
    a = e.g.attrs(n)
    p = _pair(a.get("padding", 0))
    geo = dict(kernel_shape=_pair(a["kernel"]), strides=_pair(a["stride"]), pads=p + p)
    if e.g.op(n) == "max_pool2d":
        return e.node("MaxPool", [e.arg(n, 0)], **geo)
    return e.node("AveragePool", [e.arg(n, 0)], count_include_pad=1, **geo)   # dlc averages the zeros in


@exports("slice")
def _slice(e, n):
    a = e.g.attrs(n)
    return e.node("Slice", [e.arg(n, 0), e.ints([a["start"]]), e.ints([a["stop"]]), e.ints([a["axis"]])])


@exports("unslice")
def _unslice(e, n):             # the slice's adjoint: zeros around it
    g, a = e.g, e.g.attrs(n)
    rank = len(g.shape(n))
    pads = [0] * (2 * rank)
    pads[a["axis"]], pads[rank + a["axis"]] = a["start"], a["size"] - a["stop"]
    return e.node("Pad", [e.arg(n, 0), e.ints(pads)])


@exports("take")
def _take(e, n):
    return e.node("Gather", [e.arg(n, 0), e.arg(n, 1)], axis=0)


@exports("argmax")
def _argmax(e, n):
    return e.cast(e.node("ArgMax", [e.arg(n, 0)], axis=-1, keepdims=0), "i64", "i32")


@exports("size")
def _size(e, n):
    g, a = e.g, e.g.attrs(n)
    shape = g.shape(g.args(n)[0])
    total = 1
    for ax in a["axes"]:
        total = total * shape[ax] if isinstance(shape[ax], int) and isinstance(total, int) else None
    if total is not None:
        return e.const(total, a["dtype"])
    dims = e.node("Concat", [e.dim(shape[ax]) for ax in a["axes"]], axis=0)
    prod = e.node("ReduceProd", [dims], keepdims=0)
    return e.cast(prod, "i64", a["dtype"])


@exports("iota")
def _iota(e, n):                # each element's index along the axis
    g, a = e.g, e.g.attrs(n)
    shape, ax = g.shape(n), a["axis"]
    count = e.node("Squeeze", [e.dim(shape[ax]), e.ints([0])])
    r = e.node("Range", [e.const(0, np.int64), count, e.const(1, np.int64)])
    r = e.node("Reshape", [r, e.ints([-1] + [1] * (len(shape) - ax - 1))])
    return e.cast(e.node("Expand", [r, e.shape(shape)]), "i64", a["dtype"])


@exports("flip")
def _flip(e, n):
    ax = e.g.attrs(n)["axis"]
    return e.node("Slice", [e.arg(n, 0), e.ints([-1]), e.ints([np.iinfo(np.int64).min]), e.ints([ax]),
                            e.ints([-1])])


@exports("cumsum")
def _cumsum(e, n):
    g, a = e.g, e.g.attrs(n)
    return e.node("CumSum", [e.arg(n, 0, g.dtype(n)), e.ints(a["axis"])], reverse=int(bool(a["reverse"])))


@exports(*RANDOM)
def _noise(e, n):               # an input of the model: the caller draws it
    name = f"noise_{len(e.noise)}"
    dims = [d if isinstance(d, int) else str(d) for d in e.g.shape(n)]
    e.noise.append(helper.make_tensor_value_info(name, ONNX_DTYPES[e.g.dtype(n)], dims))
    return name


@exports("scan")
def _scan(e, n):
    """ONNX Scan: carries are its state variables, the time-major sequences its scan inputs,
    the body's outputs the new carries and the per-step outputs (stacked on axis 0); the
    captured tensors are read from the outer scope. A scan over range(n) is a Loop of n trips."""
    g, a = e.g, e.g.attrs(n)
    body = a["body"]
    nc, ni = a["n_carry"], a["n_in"]
    ny = len([k for k in body.outputs if k.startswith("y")])
    if ni == 0 and a.get("reverse"):
        raise DlcError("cannot export a reversed `scan` over range(n)", g[n]["loc"])
    if any(g.attrs(c)["index"] >= nc + ny for c in g.consumers(n)):
        raise DlcError("cannot export a scan whose saved carries are read", g[n]["loc"])
    sub = Exporter(body, e.weights, parent=e)
    args = g.args(n)
    ins = []
    if ni == 0:             # over range(n): a Loop, whose body also takes the step and a condition
        ins += [helper.make_tensor_value_info(e.fresh("iter"), TensorProto.INT64, []),
                helper.make_tensor_value_info(e.fresh("cond"), TensorProto.BOOL, [])]
    for i, b in enumerate(body.inputs):
        if i >= nc + ni:                          # a captured tensor: the outer value itself
            sub.names[b] = e.names[args[i]]
            continue
        sub.names[b] = e.fresh("state" if i < nc else "step")
        dims = [d if isinstance(d, int) else str(d) for d in body.shape(b)]
        ins.append(helper.make_tensor_value_info(sub.names[b], ONNX_DTYPES[body.dtype(b)], dims))
    for m in body.topo():
        if body.op(m) == "input" or m in sub.names:
            continue
        fn = EXPORTERS.get(body.op(m))
        if fn is None:
            raise DlcError(f"cannot export op `{body.op(m)}` in a scan body: dlc's ONNX exporter has no entry for it",
                           body[m]["loc"])
        sub.names[m] = fn(sub, m)
    outs = [helper.make_tensor_value_info(sub.node("Identity", [ins[1].name]), TensorProto.BOOL, [])] if ni == 0 else []
    for key in [f"c{i}" for i in range(nc)] + [f"y{j}" for j in range(ny)]:
        v = body.outputs[key]
        name = sub.node("Identity", [sub.names[v]])
        dims = [d if isinstance(d, int) else str(d) for d in body.shape(v)]
        outs.append(helper.make_tensor_value_info(name, ONNX_DTYPES[body.dtype(v)], dims))
    graph = helper.make_graph(sub.nodes, e.fresh("body"), ins, outs)
    if ni == 0:
        return e.node("Loop", [e.const(a["length"], np.int64), ""] + [e.names[x] for x in args[:nc]],
                      n_out=nc + ny, body=graph)
    rev = int(bool(a.get("reverse")))
    return e.node("Scan", [e.names[x] for x in args[:nc + ni]], n_out=nc + ny, body=graph,
                  num_scan_inputs=ni, scan_input_directions=[rev] * ni,
                  **({"scan_output_directions": [rev] * ny} if ny else {}))


@exports("get")
def _get(e, n):
    res = e.names[e.g.args(n)[0]]
    return res[e.g.attrs(n)["index"]] if isinstance(res, list) else res
