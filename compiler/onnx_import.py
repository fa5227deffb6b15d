"""An ONNX model -> a readable `.dl` model and its weights.

    imp = from_onnx(model, name="net")   # imp.source: the .dl text; imp.params, imp.state: arrays by dlc name

The graph's inputs become the model's typed inputs (a symbolic dimension keeps its name), its
outputs the values the model returns (`return a, b`). Each node is one line of `.dl`: a layer
where a pattern is recognised (MatMul + Add or Gemm with constant weights -> `dense`, Conv with
constant weights -> `conv2d`), a primitive expression otherwise. Float initializers become
parameters (`param W_3: [64, 10] = zeros`, the values in the checkpoint); nodes whose inputs
are all constant (shape arithmetic) are computed at import with onnx's reference evaluator, and
what an op needs at compile time (a Reshape's shape, a Slice's bounds, reduction axes) is
written as literals; other computed constants become `state` (kept, never trained).

Each ONNX op has one entry in `IMPORTERS`, a function from the node to the `.dl` expressions of
its outputs. An op without an entry, or an attribute dlc cannot honour, is refused with an
error naming the op and the node (`Unsupported`, a `DlcError`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from dsl.diagnostics import DlcError

try:
    import onnx
    from onnx import helper, numpy_helper
except ImportError:          # pragma: no cover - the `onnx` extra is not installed
    onnx = None

DL_DTYPES = {1: "f32", 11: "f64", 6: "i32", 7: "i64", 9: "bool"}     # TensorProto codes dlc has
RESERVED = {"model", "def", "return", "param", "state", "scan", "in", "if", "else", "training", "and",
            "or", "not", "true", "false", "yield", "import", "train", "generate", "phase", "range", "on",
            "pi", "e", "inf", "int", "float", "bool", "str"}


class Unsupported(DlcError):
    """An ONNX construct dlc cannot import: names the op and the node."""


class Importer:
    def __init__(self, model, name: str = "net", constants: dict | None = None):
        if onnx is None:
            raise DlcError("ONNX import needs the `onnx` package: pip install 'dlc[onnx]'")
        self.name, self.node = name, None
        self.static = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.initializers = set(self.static)
        self.static.update(constants or {})
        self.model = model
        self.position = {tuple(n.output): i for i, n in enumerate(model.graph.node)}   # for messages
        self.infer_types()
        self.fold_constants()
        self.expr: dict = {}                 # ONNX value -> .dl identifier
        self.used: set = set(RESERVED)
        self.lines: list[str] = []
        self.params: list[str] = []
        self.weights: dict = {}              # parameters, by dlc name
        self.states: dict = {}               # constants computed at import time
        self.layers: dict = {}               # layer function -> calls so far (dense_1, dense_2, ...)
        self.symbols: dict = {}
        self.node = None

    # ---- names and values ------------------------------------------------------------------
    def ident(self, onnx_name: str, prefix: str = "v", lower: bool = True) -> str:
        """A fresh .dl name from an ONNX one (`/4/Flatten_output_0` -> `v4_flatten`)."""
        base = re.sub(r"\W", "_", re.sub(r"_output_0$", "", onnx_name)).strip("_")
        base = (base.lower() if lower else base) or prefix
        if base[0].isdigit():
            base = f"{prefix}{base}"
        name, k = base, 1
        while name in self.used or name.startswith("__"):
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def fail(self, why: str):
        n = self.node
        if n.op_type in ("Input", "Output"):
            raise Unsupported(f"ONNX graph {n.op_type.lower()} `{n.name}`: {why}")
        label = f"`{n.name}`" if n.name else f"#{self.position.get(tuple(n.output), '?')}"
        raise Unsupported(f"ONNX node {label} ({n.op_type}): {why}")

    def dtype(self, name: str) -> str:
        code = self.types.get(name, (None,))[0] if name not in self.static else \
            helper.np_dtype_to_tensor_dtype(self.static[name].dtype)
        if code not in DL_DTYPES:
            what = helper.tensor_dtype_to_string(code) if code else "an unknown type"
            self.fail(f"`{name}` is {what}; dlc has f32, f64, i32, i64 and bool")
        return DL_DTYPES[code]

    def shape(self, name: str) -> list:
        if name in self.static:
            return list(self.static[name].shape)
        dims = self.types.get(name, (None, [None]))[1]
        if any(d is None or isinstance(d, str) and d not in self.symbols for d in dims):
            self.fail(f"the shape of `{name}` is not known (a size bound by no input)")
        return [self.symbols.get(d, d) if isinstance(d, str) else d for d in dims]

    def const(self, name: str, what: str) -> np.ndarray:
        """An input the op needs at compile time (a shape, axes, bounds)."""
        if name not in self.static:
            self.fail(f"its {what} (`{name}`) must be a constant: dlc compiles static shapes")
        return self.static[name]

    def ref(self, name: str) -> str:
        """The `.dl` expression of a value: a variable, a number or a declared parameter."""
        if name in self.expr:
            return self.expr[name]
        if name not in self.static:
            self.fail(f"input `{name}` is not computed by any node")
        a = self.static[name]
        if a.ndim == 0:
            return number(a)
        if a.dtype == np.bool_ and (band := _band_mask(a)) is not None:     # a causal mask: written as one
            self.expr[name] = band
            return band
        if a.dtype == np.bool_:         # a mask: kept as 0/1 state, compared back to bool
            self.expr[name] = f"({self.param(name, a.astype(np.float32), state=True)} > 0.5)"
            return self.expr[name]
        if a.dtype.kind != "f":
            self.fail(f"the constant tensor `{name}` ({a.dtype}) can only be used as a compile-time value")
        return self.param(name, a, state=name not in self.initializers)

    def param(self, onnx_name: str, a: np.ndarray, state: bool = False) -> str:
        """A declared tensor: a parameter (an initializer: trainable), or state (a constant
        computed at import time: kept, never trained)."""
        p = self.ident(onnx_name, "w")
        kind = "state" if state else "param"
        self.params.append(f"    {kind} {p}: [{', '.join(map(str, a.shape))}] = zeros")
        (self.states if state else self.weights)[f"{self.name}/{p}"] = \
            np.ascontiguousarray(a, np.float64 if a.dtype == np.float64 else np.float32)
        self.expr[onnx_name] = p
        return p

    def layer(self, fn: str, weights: dict) -> None:
        """A standard-library layer's call: its parameters are named by the call site."""
        k = self.layers[fn] = self.layers.get(fn, 0) + 1
        for p, a in weights.items():
            self.weights[f"{self.name}/{fn}_{k}/{p}"] = np.ascontiguousarray(a, np.float32)

    def infer_types(self) -> None:
        """Every value's (TensorProto dtype, dims) that ONNX's shape inference can tell."""
        try:
            self.model = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
        except Exception:                   # keep the model's own value infos
            pass
        g = self.model.graph
        self.types: dict = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            t = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and t.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
                self.types[vi.name] = (t.elem_type, dims)

    def fold_constants(self) -> None:
        """Compute the nodes whose inputs are all known now (Constant, shape arithmetic), then
        infer the shapes again: a Reshape to a computed shape has a known result."""
        g, kept = self.model.graph, []
        for n in g.node:
            self.node = n
            if n.op_type == "Constant":
                self.static[n.output[0]] = _constant_value(self, n)
            elif not self.fold(n):
                kept.append(n)
        if len(kept) == len(g.node) and not set(self.static) - self.initializers:
            return
        reads = {i for n in kept for i in n.input} | {o.name for o in g.output}
        inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in self.static.items() if k in reads]
        graph = helper.make_graph(kept, g.name, [i for i in g.input if i.name not in self.static],
                                  list(g.output), inits)
        self.model = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                       ir_version=self.model.ir_version)
        self.infer_types()

    def fold(self, n) -> bool:
        """Compute a node at import time when its inputs are all known (shape arithmetic: a
        Shape of fixed dimensions, the Squeeze, Concat and Range after it), with onnx's
        reference evaluator."""
        if n.op_type == "Shape" and n.input[0] in self.types and \
                all(isinstance(d, int) for d in self.types[n.input[0]][1]):
            dims = np.array(self.types[n.input[0]][1], np.int64)
            start, end = self.attr("start", 0), self.attr("end", len(dims))
            self.static[n.output[0]] = dims[start:end]
            return True
        if not n.input or not all(i in self.static for i in n.input if i) or n.op_type.startswith("Random"):
            return False
        from onnx.reference import ReferenceEvaluator
        ins = [i for i in n.input if i]
        g = helper.make_graph([n], "fold", [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(
            self.static[i].dtype), self.static[i].shape) for i in ins],
            [helper.make_tensor_value_info(o, 0, None) for o in n.output if o])
        m = helper.make_model(g, opset_imports=list(self.model.opset_import))
        outs = ReferenceEvaluator(m).run(None, {i: self.static[i] for i in ins})
        for o, v in zip([o for o in n.output if o], outs):
            self.static[o] = np.asarray(v)
        return True

    def attr(self, key, default=None):
        for a in self.node.attribute:
            if a.name == key:
                return helper.get_attribute_value(a)
        return default

    def only(self, *known):
        for a in self.node.attribute:
            if a.name not in known:
                self.fail(f"attribute `{a.name}` is not supported")

    def inputs(self):
        return [i for i in self.node.input]

    # ---- the model ---------------------------------------------------------------------------
    def run(self) -> tuple[str, dict]:
        g = self.model.graph
        sig = []
        for vi in g.input:
            if vi.name in self.static:
                continue
            self.node = helper.make_node("Input", [], [vi.name], name=vi.name)
            if vi.name not in self.types:
                self.fail("the input has no tensor type")
            dims = []
            for d in self.types[vi.name][1]:
                if isinstance(d, str) or d is None:
                    d = self.symbols.setdefault(d, self.ident(d, "D", lower=False)) if d else self.ident("D", "D", lower=False)
                dims.append(str(d))
            v = self.ident(vi.name, "x")
            self.expr[vi.name] = v
            sig.append(f"{v}: {self.dtype(vi.name)}[{', '.join(dims)}]")
        consumers: dict = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        fused: set = set()
        for n in g.node:
            self.node = n
            if id(n) in fused:
                continue
            pattern = match_layer(self, n, consumers)
            if pattern is not None:
                expr, outs, done = pattern
                fused.update(id(m) for m in done)
            else:
                fn = IMPORTERS.get(n.op_type)
                if fn is None or n.domain not in ("", "ai.onnx"):
                    self.fail("dlc does not support this op")
                expr, outs = fn(self, n), list(n.output)
            exprs = expr if isinstance(expr, list) else [expr]
            for out, e in zip(outs, exprs):
                if not out:
                    continue
                v = self.ident(out)
                self.lines.append(f"    {v} = {e}")
                self.expr[out] = v
            if len(exprs) < len([o for o in outs if o]):
                self.fail(f"only its first {len(exprs)} output(s) are supported")
        rets = []
        for o in g.output:
            self.node = helper.make_node("Output", [], [], name=o.name)
            rets.append(self.ref(o.name) if o.name in self.expr or o.name in self.static else self.fail("not computed"))
        body = self.params + self.lines + [f"    return {', '.join(rets)}"]
        head = (f"# imported from ONNX by `dlc import` ({len(g.node)} nodes, opset "
                f"{max((o.version for o in self.model.opset_import if o.domain in ('', 'ai.onnx')), default=0)})\n"
                f"model {self.name}({', '.join(sig)}) {{")
        inputs = {vi.name: self.expr[vi.name] for vi in g.input if vi.name not in self.static}
        return Imported(head + "\n" + "\n".join(body) + "\n}\n", self.weights, self.states, inputs)


@dataclass
class Imported:
    source: str                 # the .dl text
    params: dict                # dlc parameter name -> array
    state: dict                 # dlc state name -> array (constants computed at import time)
    inputs: dict                # ONNX graph input -> the model's argument


def from_onnx(model, name: str = "net", constants: dict | None = None) -> Imported:
    """The model as `.dl` source and its weights. `constants`: graph inputs to treat as known
    values (the conformance runner passes a node's shape and axes inputs this way)."""
    return Importer(model, name, constants).run()


def number(a) -> str:
    v = np.asarray(a).reshape(())[()]
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (np.integer, int)):
        return str(int(v))
    v = float(str(v)) if isinstance(v, np.float32) else float(v)     # 1e-05, not 9.99999974e-06
    if math.isinf(v):
        return "inf" if v > 0 else "(-inf)"
    if math.isnan(v):
        raise DlcError("a NaN constant cannot be written in .dl")
    r = repr(v)
    return f"({r})" if v < 0 else r


def dl_list(vals) -> str:
    return "[" + ", ".join(str(int(v)) for v in vals) + "]"


def _constant_value(imp: Importer, n) -> np.ndarray:
    for a in n.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.array(helper.get_attribute_value(a), np.float32 if a.name == "value_float" else np.int64)
        if a.name in ("value_floats", "value_ints"):
            return np.array(helper.get_attribute_value(a), np.float32 if a.name == "value_floats" else np.int64)
    imp.fail("this kind of Constant is not supported")


# ---- recognised layers ----------------------------------------------------------------------
def match_layer(imp: Importer, n, consumers):
    """(expression, the ONNX outputs it defines, the nodes it covers) for a layer, or None."""
    st = imp.static
    if n.op_type == "MatMul" and n.input[1] in st and st[n.input[1]].ndim == 2 and n.input[0] not in st:
        users = consumers.get(n.output[0], [])
        W = st[n.input[1]]
        if len(users) == 1 and users[0].op_type == "Add" and n.output[0] not in {o.name for o in imp.model.graph.output}:
            add = users[0]
            other = add.input[1] if add.input[0] == n.output[0] else add.input[0]
            if other in st and st[other].shape == (W.shape[1],) and st[other].dtype.kind == "f":
                imp.layer("dense", {"W": W, "b": st[other]})
                return f"dense({imp.ref(n.input[0])}, {W.shape[1]})", [add.output[0]], [n, add]
    if n.op_type == "Gemm" and len(n.input) == 3 and n.input[1] in st and n.input[2] in st:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        W = st[n.input[1]].T if a.get("transB", 0) else st[n.input[1]]
        b = st[n.input[2]]
        if a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0 and not a.get("transA", 0) \
                and W.ndim == 2 and b.shape == (W.shape[1],):
            imp.layer("dense", {"W": W, "b": b})
            return f"dense({imp.ref(n.input[0])}, {W.shape[1]})", [n.output[0]], [n]
    if n.op_type == "Conv" and len(n.input) == 3 and n.input[1] in st and n.input[2] in st:
        geo = _conv_geometry(imp, n)
        W = st[n.input[1]]
        if geo is not None and W.ndim == 4:
            imp.layer("conv2d", {"W": W, "b": st[n.input[2]]})
            stride, pad, dil = geo
            return (f"conv2d({imp.ref(n.input[0])}, {W.shape[0]}, kernel = {dl_list(W.shape[2:])}, "
                    f"stride = {dl_list(stride)}, padding = {dl_list(pad)}, dilation = {dl_list(dil)})"), [n.output[0]], [n]
    return None


def _conv_geometry(imp, n):
    """(strides, pads, dilations) of a 2-D Conv dlc can run (symmetric padding, one group)."""
    a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
    unknown = set(a) - {"strides", "pads", "dilations", "kernel_shape", "group", "auto_pad"}
    if unknown or a.get("group", 1) != 1 or len(imp.shape(n.input[1])) != 4:
        return None
    kh, kw = imp.shape(n.input[1])[2:]
    stride, dil = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID" or auto == "NOTSET":
        pads = list(a.get("pads", [0, 0, 0, 0])) if auto == "NOTSET" else [0, 0, 0, 0]
    elif auto in ("SAME_UPPER", "SAME_LOWER") and stride == [1, 1] and (dil[0] * (kh - 1)) % 2 == 0 \
            and (dil[1] * (kw - 1)) % 2 == 0:
        pads = [dil[0] * (kh - 1) // 2, dil[1] * (kw - 1) // 2] * 2
    else:
        return None
    if pads[:2] != pads[2:]:
        return None
    return stride, pads[:2], dil


# ---- the table: one entry per ONNX op --------------------------------------------------------
IMPORTERS: dict = {}


def imports(*ops):
    def deco(fn):
        for op in ops:
            IMPORTERS[op] = fn
        return fn
    return deco


def _unary(template: str, float_only: bool = True):
    def emit(imp, n):
        imp.only()
        if float_only and imp.dtype(n.input[0]) not in ("f32", "f64"):
            imp.fail(f"dlc's {n.op_type} takes floats, got {imp.dtype(n.input[0])}")
        return template.format(imp.ref(n.input[0]))
    return emit


for _op, _t in {"Relu": "relu({})", "Sigmoid": "sigmoid({})", "Tanh": "tanh({})", "Exp": "exp({})",
                "Log": "log({})", "Sqrt": "sqrt({})", "Erf": "erf({})", "Floor": "floor({})",
                "Ceil": "(-floor(-{}))", "Sin": "sin({})", "Cos": "cos({})", "Reciprocal": "(1 / {})",
                "Softsign": "({0} / (1 + abs({0})))", "Softplus": "log(1 + exp({}))",
                "Tan": "(sin({0}) / cos({0}))", "Sinh": "((exp({0}) - exp(-{0})) / 2)",
                "Cosh": "((exp({0}) + exp(-{0})) / 2)"}.items():
    IMPORTERS[_op] = _unary(_t)
for _op, _t in {"Abs": "abs({})", "Neg": "(-{})", "Sign": "sign({})", "Identity": "{}",
                "Not": "(not {})"}.items():
    IMPORTERS[_op] = _unary(_t, float_only=False)


def _binary(sym: str):
    def emit(imp, n):
        imp.only()
        return f"({imp.ref(n.input[0])} {sym} {imp.ref(n.input[1])})"
    return emit


for _op, _s in {"Add": "+", "Sub": "-", "Mul": "*", "Equal": "==", "Less": "<", "Greater": ">",
                "LessOrEqual": "<=", "GreaterOrEqual": ">=", "And": "and", "Or": "or"}.items():
    IMPORTERS[_op] = _binary(_s)


@imports("Div")
def _div(imp, n):
    imp.only()
    if imp.dtype(n.input[0]) not in ("f32", "f64"):
        imp.fail("integer division truncates in ONNX; dlc's `/` takes floats and `//` floors")
    return f"({imp.ref(n.input[0])} / {imp.ref(n.input[1])})"


@imports("Pow")
def _pow(imp, n):
    imp.only()
    if imp.dtype(n.input[0]) not in ("f32", "f64"):
        imp.fail(f"dlc raises floats to powers, got a {imp.dtype(n.input[0])} base")
    y = imp.ref(n.input[1])
    if imp.dtype(n.input[1]) not in ("f32", "f64"):
        y = f"float({y})"             # an integer exponent, as a float
    return f"({imp.ref(n.input[0])} ** {y})"


@imports("Xor")
def _xor(imp, n):
    a, b = imp.ref(n.input[0]), imp.ref(n.input[1])
    return f"(({a} or {b}) and not ({a} and {b}))"


@imports("Max", "Min", "Sum", "Mean")
def _variadic(imp, n):
    imp.only()
    xs = [imp.ref(i) for i in n.input]
    fn = {"Max": "maximum", "Min": "minimum"}.get(n.op_type)
    out = xs[0]
    for x in xs[1:]:
        out = f"{fn}({out}, {x})" if fn else f"({out} + {x})"
    return f"({out} / {len(xs)})" if n.op_type == "Mean" else out


@imports("Where")
def _where(imp, n):
    return f"where({imp.ref(n.input[0])}, {imp.ref(n.input[1])}, {imp.ref(n.input[2])})"


@imports("Clip")
def _clip(imp, n):
    imp.only("min", "max")
    out = imp.ref(n.input[0])
    lo = n.input[1] if len(n.input) > 1 and n.input[1] else None
    hi = n.input[2] if len(n.input) > 2 and n.input[2] else None
    if lo is None and imp.attr("min") is not None:
        out = f"maximum({out}, {number(imp.attr('min'))})"
    if lo:
        out = f"maximum({out}, {imp.ref(lo)})"
    if hi is None and imp.attr("max") is not None:
        out = f"minimum({out}, {number(imp.attr('max'))})"
    if hi:
        out = f"minimum({out}, {imp.ref(hi)})"
    return out


def _float_in(imp, n):
    if imp.dtype(n.input[0]) not in ("f32", "f64"):
        imp.fail(f"takes floats here, got {imp.dtype(n.input[0])}")
    return imp.ref(n.input[0])


@imports("LeakyRelu")
def _leaky(imp, n):
    imp.only("alpha")
    x = _float_in(imp, n)
    return f"where({x} > 0, {x}, {number(imp.attr('alpha', 0.01))} * {x})"


@imports("PRelu")
def _prelu(imp, n):
    x = _float_in(imp, n)
    return f"where({x} > 0, {x}, {imp.ref(n.input[1])} * {x})"


@imports("Elu")
def _elu(imp, n):
    imp.only("alpha")
    x = _float_in(imp, n)
    return f"where({x} > 0, {x}, {number(imp.attr('alpha', 1.0))} * (exp(minimum({x}, 0)) - 1))"


@imports("Celu")
def _celu(imp, n):
    imp.only("alpha")
    x, a = _float_in(imp, n), number(imp.attr("alpha", 1.0))
    return f"(maximum({x}, 0) + minimum(0 * {x}, {a} * (exp({x} / {a}) - 1)))"


@imports("Selu")
def _selu(imp, n):
    imp.only("alpha", "gamma")
    x = _float_in(imp, n)
    a, g = number(imp.attr("alpha", 1.67326319217681884765625)), number(imp.attr("gamma", 1.05070102214813232421875))
    return f"({g} * where({x} > 0, {x}, {a} * (exp(minimum({x}, 0)) - 1)))"


@imports("ThresholdedRelu")
def _thresholded(imp, n):
    imp.only("alpha")
    x = _float_in(imp, n)
    return f"where({x} > {number(imp.attr('alpha', 1.0))}, {x}, 0 * {x})"


@imports("HardSigmoid")
def _hard_sigmoid(imp, n):
    imp.only("alpha", "beta")
    x = _float_in(imp, n)
    return f"maximum(minimum({number(imp.attr('alpha', 0.2))} * {x} + {number(imp.attr('beta', 0.5))}, 1), 0)"


@imports("HardSwish")
def _hard_swish(imp, n):
    x = _float_in(imp, n)
    return f"({x} * maximum(minimum({x} / 6 + 0.5, 1), 0))"


@imports("Mish")
def _mish(imp, n):
    x = _float_in(imp, n)
    return f"({x} * tanh(log(1 + exp({x}))))"


@imports("Gelu")
def _gelu(imp, n):
    imp.only("approximate")
    approx = imp.attr("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return f"{'gelu_tanh' if approx == 'tanh' else 'gelu'}({_float_in(imp, n)})"


@imports("Dropout")
def _dropout(imp, n):                   # inference: the identity (a given training_mode must be false)
    imp.only("seed")
    if len(n.input) > 2 and n.input[2]:
        if not bool(imp.const(n.input[2], "training_mode").reshape(())):
            return imp.ref(n.input[0])
        imp.fail("training mode draws a random mask; dlc imports the inference graph")
    if len(n.output) > 1 and n.output[1]:
        imp.fail("its mask output is not supported")
    return imp.ref(n.input[0])


@imports("MatMul")
def _matmul(imp, n):
    sa, sb = imp.shape(n.input[0]), imp.shape(n.input[1])
    a, b = imp.ref(n.input[0]), imp.ref(n.input[1])
    if len(sa) == 1:            # a vector is a one-row (or one-column) matrix, dropped after
        a = f"reshape({a}, [1, {sa[0]}])"
    if len(sb) == 1:
        b = f"reshape({b}, [{sb[0]}, 1])"
    out = f"({a} @ {b})"
    if len(sa) == 1 or len(sb) == 1:
        out = _reshape_to(imp, n, out, imp.shape(n.output[0]))
    return out


@imports("Gemm")
def _gemm(imp, n):
    imp.only("alpha", "beta", "transA", "transB")
    a, b = imp.ref(n.input[0]), imp.ref(n.input[1])
    if imp.attr("transA", 0):
        a = f"transpose({a})"
    if imp.attr("transB", 0):
        b = f"transpose({b})"
    out = f"{a} @ {b}"
    alpha, beta = imp.attr("alpha", 1.0), imp.attr("beta", 1.0)
    if alpha != 1.0:
        out = f"{number(np.float32(alpha))} * ({out})"
    if len(n.input) > 2 and n.input[2]:
        c = imp.ref(n.input[2])
        out = f"{out} + {c}" if beta == 1.0 else f"{out} + {number(np.float32(beta))} * {c}"
    return f"({out})"


def _axis(imp, name, axis) -> int:
    rank = len(imp.shape(name))
    if not -rank <= axis < max(rank, 1):
        imp.fail(f"axis {axis} is out of range")
    return axis % rank if rank else 0


@imports("Softmax", "LogSoftmax")
def _softmax(imp, n):
    imp.only("axis")
    x = _float_in(imp, n)
    rank = len(imp.shape(n.input[0]))
    ax = _axis(imp, n.input[0], imp.attr("axis", -1))
    fn = "softmax" if n.op_type == "Softmax" else "log_softmax"
    if ax == rank - 1:
        return f"{fn}({x})"
    perm = list(range(rank))                # dlc's softmax is over the last axis: swap it there
    perm[ax], perm[-1] = perm[-1], perm[ax]
    return f"transpose({fn}(transpose({x}, perm = {dl_list(perm)})), perm = {dl_list(perm)})"


@imports("Conv")
def _conv(imp, n):
    geo = _conv_geometry(imp, n)
    if geo is None or len(imp.shape(n.input[0])) != 4:
        imp.fail("dlc's conv is 2-D, with one group and symmetric padding")
    stride, pad, dil = geo
    out = (f"conv({imp.ref(n.input[0])}, {imp.ref(n.input[1])}, stride = {dl_list(stride)}, "
           f"padding = {dl_list(pad)}, dilation = {dl_list(dil)})")
    if len(n.input) > 2 and n.input[2]:
        out = f"{out} + expand({imp.ref(n.input[2])}, {imp.ref(n.input[0])})"
    return out


@imports("MaxPool", "AveragePool")
def _pool(imp, n):
    imp.only("kernel_shape", "strides", "pads", "auto_pad", "count_include_pad", "ceil_mode", "dilations",
             "storage_order")
    if len(imp.shape(n.input[0])) != 4:
        imp.fail("dlc pools 2-D (NCHW) inputs")
    k = list(imp.attr("kernel_shape"))
    stride = list(imp.attr("strides", [1, 1]))
    pads = list(imp.attr("pads", [0, 0, 0, 0]))
    auto = imp.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto.startswith("SAME"):         # symmetric when stride 1 and the kernel is odd
        if stride != [1, 1] or k[0] % 2 == 0 or k[1] % 2 == 0:
            imp.fail("auto_pad SAME is supported with stride 1 and odd kernels (symmetric padding)")
        pads = [k[0] // 2, k[1] // 2] * 2
    if imp.attr("ceil_mode", 0) or list(imp.attr("dilations", [1, 1])) != [1, 1]:
        imp.fail("ceil_mode and dilations are not supported")
    if len(n.output) > 1 and n.output[1]:
        imp.fail("the Indices output is not supported")
    if pads[:2] != pads[2:]:
        imp.fail("asymmetric padding is not supported")
    if pads[0] * 2 > k[0] or pads[1] * 2 > k[1]:
        imp.fail("dlc pads a pooling window by at most half the kernel")
    if pads != [0, 0, 0, 0] and n.op_type == "AveragePool" and not imp.attr("count_include_pad", 0):
        imp.fail("padding is averaged in by dlc (count_include_pad = 1); this node excludes it")
    fn = "max_pool" if n.op_type == "MaxPool" else "avg_pool"
    return (f"{fn}({imp.ref(n.input[0])}, kernel = {dl_list(k)}, stride = {dl_list(stride)}, "
            f"padding = {dl_list(pads[:2])})")


@imports("BatchNormalization")
def _batch_norm(imp, n):
    imp.only("epsilon", "momentum", "training_mode")
    if imp.attr("training_mode", 0) or (len(n.output) > 1 and any(n.output[1:])):
        imp.fail("training mode (batch statistics, running-stat outputs) is not supported")
    x = _float_in(imp, n)
    scale, bias, mean, var = (f"expand({imp.ref(i)}, {x})" for i in n.input[1:5])
    eps = number(np.float32(imp.attr("epsilon", 1e-5)))
    return f"({x} - {mean}) / sqrt({var} + {eps}) * {scale} + {bias}"


@imports("LayerNormalization")
def _layer_norm(imp, n):
    imp.only("axis", "epsilon", "stash_type")
    x = _float_in(imp, n)
    rank = len(imp.shape(n.input[0]))
    ax = _axis(imp, n.input[0], imp.attr("axis", -1))
    axes = dl_list(range(ax, rank))
    eps = number(np.float32(imp.attr("epsilon", 1e-5)))
    mu, inv = imp.ident("mu"), imp.ident("inv_std")
    imp.lines.append(f"    {mu} = mean({x}, axis = {axes}, keepdims = true)")
    imp.lines.append(f"    {inv} = 1 / sqrt(mean(({x} - {mu}) ** 2, axis = {axes}, keepdims = true) + {eps})")
    out = f"({x} - {mu}) * {inv} * {imp.ref(n.input[1])}"
    if len(n.input) > 2 and n.input[2]:
        out += f" + {imp.ref(n.input[2])}"
    return [out, mu, inv]


def _reshape_to(imp, n, x: str, shape) -> str:
    return f"reshape({x}, [{', '.join(map(str, shape))}])"


@imports("Reshape")
def _reshape(imp, n):
    imp.only("allowzero")
    target = [int(v) for v in imp.const(n.input[1], "shape")]
    src = imp.shape(n.input[0])
    if not imp.attr("allowzero", 0):
        target = [src[i] if v == 0 else v for i, v in enumerate(target)]
    elif 0 in target:
        imp.fail("zero-sized dimensions are not supported")
    code = imp.types.get(n.input[0], (None,))[0]      # the result's type, where shape inference
    known = imp.types.get(n.output[0], (None, [None]))[1]  # could not tell (a computed target)
    if all(isinstance(d, int) for d in src + target) and not all(isinstance(d, int) for d in known):
        rest = math.prod(d for d in target if d != -1)
        imp.types[n.output[0]] = (code, [math.prod(src) // rest if d == -1 else d for d in target])
    return _reshape_to(imp, n, imp.ref(n.input[0]), target)


@imports("Flatten")
def _flatten(imp, n):
    imp.only("axis")
    s = imp.shape(n.input[0])
    ax = imp.attr("axis", 1)
    ax = ax + len(s) if ax < 0 else ax
    return _reshape_to(imp, n, imp.ref(n.input[0]), [_product(s[:ax]), _product(s[ax:])])


def _product(dims) -> str:
    """A product of sizes as .dl text: `4 * B` (symbolic sizes multiply too)."""
    syms = [str(d) for d in dims if not isinstance(d, int)]
    coef = math.prod(d for d in dims if isinstance(d, int))
    return " * ".join(([str(coef)] if coef != 1 else []) + syms) if syms else str(coef)


@imports("Squeeze", "Unsqueeze")
def _squeeze(imp, n):
    out_shape = imp.shape(n.output[0])
    return _reshape_to(imp, n, imp.ref(n.input[0]), out_shape)


@imports("Transpose")
def _transpose(imp, n):
    imp.only("perm")
    rank = len(imp.shape(n.input[0]))
    perm = list(imp.attr("perm", list(range(rank))[::-1]))
    return f"transpose({imp.ref(n.input[0])}, perm = {dl_list(perm)})"


@imports("Concat")
def _concat(imp, n):
    imp.only("axis")
    ax = _axis(imp, n.input[0], imp.attr("axis"))
    parts = [i for i in n.input if i]
    if len(parts) == 1:
        return imp.ref(parts[0])
    return f"concat([{', '.join(imp.ref(i) for i in parts)}], axis = {ax})"


@imports("Split")
def _split(imp, n):
    imp.only("axis", "num_outputs")
    ax = _axis(imp, n.input[0], imp.attr("axis", 0))
    size = imp.shape(n.input[0])[ax]
    if len(n.input) > 1 and n.input[1]:
        sizes = [int(v) for v in imp.const(n.input[1], "split sizes")]
    else:
        k = len(n.output)
        step = -(-size // k)
        sizes = [min(step, size - i * step) for i in range(k)]
    out, start = [], 0
    for s in sizes:
        if s <= 0:
            imp.fail("empty splits are not supported")
        out.append(f"slice({imp.ref(n.input[0])}, {start}, {start + s}, axis = {ax})")
        start += s
    return out


@imports("Slice")
def _slice(imp, n):
    shape = imp.shape(n.input[0])
    starts = imp.const(n.input[1], "starts")
    ends = imp.const(n.input[2], "ends")
    axes = imp.const(n.input[3], "axes") if len(n.input) > 3 and n.input[3] else range(len(starts))
    steps = imp.const(n.input[4], "steps") if len(n.input) > 4 and n.input[4] else [1] * len(starts)
    out = imp.ref(n.input[0])
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(imp, n.input[0], int(a))
        d = shape[a]
        if not isinstance(d, int):
            imp.fail("slicing a symbolic axis is not supported")
        if st != 1:
            imp.fail("steps other than 1 are not supported")
        s, e = int(s), int(e)
        s = min(max(s + d if s < 0 else s, 0), d)
        e = min(max(e + d if e < 0 else e, 0), d)
        if s >= e:
            imp.fail("empty slices are not supported")
        if (s, e) != (0, d):
            out = f"slice({out}, {s}, {e}, axis = {a})"
    return out


@imports("Gather")
def _gather(imp, n):
    imp.only("axis")
    data = imp.shape(n.input[0])
    ax = _axis(imp, n.input[0], imp.attr("axis", 0))
    if imp.dtype(n.input[1]) not in ("i32", "i64"):
        imp.fail("indices must be integers")
    if n.input[1] in imp.static:
        imp.fail("constant indices are not supported (give them as an input)")
    x = imp.ref(n.input[0])
    ids = imp.ref(n.input[1])
    rank = len(data)
    if not all(isinstance(d, int) for d in data):
        imp.fail("symbolic dimensions are not supported here")
    rest = [d for i, d in enumerate(data) if i != ax]
    perm = [ax] + [i for i in range(rank) if i != ax]
    if ax != 0:
        x = f"transpose({x}, perm = {dl_list(perm)})"
    table = x if rank == 2 else f"reshape({x}, [{data[ax]}, {math.prod(rest)}])"
    out = f"take({table}, {ids})"
    ishape = imp.shape(n.input[1])
    if rank != 2:
        out = f"reshape({out}, [{', '.join(map(str, ishape + rest))}])"
    if ax != 0:                 # the gathered axes sit where the axis was
        k = len(ishape)
        back = list(range(k, k + ax)) + list(range(k)) + list(range(k + ax, k + rank - 1))
        out = f"transpose({out}, perm = {dl_list(back)})"
    return out


def _reduce_axes(imp, n):
    rank = len(imp.shape(n.input[0]))
    axes = imp.attr("axes")
    if axes is None and len(n.input) > 1 and n.input[1]:
        axes = [int(v) for v in imp.const(n.input[1], "axes")]
    if not axes:
        if imp.attr("noop_with_empty_axes", 0):
            return None
        axes = list(range(rank))
    return sorted(_axis(imp, n.input[0], int(a)) for a in axes)


REDUCTIONS = {"ReduceSum": "sum({x}, axis = {a}, keepdims = {k})",
              "ReduceMean": "mean({x}, axis = {a}, keepdims = {k})",
              "ReduceMax": "max({x}, axis = {a}, keepdims = {k})",
              "ReduceMin": "(-max(-{x}, axis = {a}, keepdims = {k}))",
              "ReduceL1": "sum(abs({x}), axis = {a}, keepdims = {k})",
              "ReduceL2": "sqrt(sum({x} * {x}, axis = {a}, keepdims = {k}))",
              "ReduceSumSquare": "sum({x} * {x}, axis = {a}, keepdims = {k})",
              "ReduceLogSum": "log(sum({x}, axis = {a}, keepdims = {k}))",
              "ReduceLogSumExp": "log(sum(exp({x}), axis = {a}, keepdims = {k}))"}


@imports(*REDUCTIONS)
def _reduce(imp, n):
    imp.only("axes", "keepdims", "noop_with_empty_axes")
    x = _float_in(imp, n) if n.op_type not in ("ReduceSum", "ReduceMax", "ReduceMin") else imp.ref(n.input[0])
    if imp.dtype(n.input[0]) not in ("f32", "f64"):
        imp.fail(f"dlc reduces floats here, got {imp.dtype(n.input[0])}")
    axes = _reduce_axes(imp, n)
    if axes is None:
        return x
    keep = "true" if imp.attr("keepdims", 1) else "false"
    return REDUCTIONS[n.op_type].format(x=x, a=dl_list(axes), k=keep)


def _band_mask(a: np.ndarray) -> str | None:
    """A boolean constant that is `row + k >= column` over its last two axes (a causal mask,
    leading axes of size 1) as a `.dl` expression, so the imported file computes it instead of
    keeping it as state a fresh run would start at zeros; None for any other mask."""
    if a.ndim < 2 or any(d != 1 for d in a.shape[:-2]):
        return None
    m, n = a.shape[-2:]
    rows, cols = np.indices((m, n))
    for k in range(-m, n + 1):
        if np.array_equal(a.reshape(m, n), rows + k >= cols):
            shift = f" + {k}" if k > 0 else f" - {-k}" if k < 0 else ""
            expr = f"iota([{m}, {n}], 0){shift} >= iota([{m}, {n}], 1)"
            return f"reshape({expr}, {dl_list(list(a.shape))})" if a.ndim > 2 else f"({expr})"
    return None


@imports("Cast")
def _cast(imp, n):
    imp.only("to", "saturate")
    to = DL_DTYPES.get(imp.attr("to"))
    src = imp.dtype(n.input[0])
    if to == src:
        return imp.ref(n.input[0])
    producer = next((m for m in imp.model.graph.node if n.input[0] in m.output), None)
    if to in ("i32", "i64") and producer is not None and producer.op_type == "ArgMax":
        return imp.ref(n.input[0])          # ONNX's argmax is int64; dlc's is its one integer type already
    if to not in ("f32", "f64"):
        imp.fail(f"dlc casts numbers and booleans to its float type only (here {src} -> {to or imp.attr('to')})")
    return f"float({imp.ref(n.input[0])})"


@imports("ArgMax")
def _argmax(imp, n):            # dlc's argmax is over the last axis: move the axis there
    imp.only("axis", "keepdims", "select_last_index")
    if imp.attr("select_last_index", 0):
        imp.fail("select_last_index is not supported (dlc takes the first maximum)")
    shape = imp.shape(n.input[0])
    rank = len(shape)
    ax = _axis(imp, n.input[0], imp.attr("axis", 0))
    x = _float_in(imp, n)
    if ax != rank - 1:
        x = f"transpose({x}, perm = {dl_list([i for i in range(rank) if i != ax] + [ax])})"
    out = f"argmax({x})"
    if imp.attr("keepdims", 1):
        out = f"reshape({out}, [{', '.join(str(1 if i == ax else d) for i, d in enumerate(shape))}])"
    return out


@imports("Pad")
def _pad(imp, n):               # constant padding: zeros (plus the value) concatenated on each side
    imp.only("mode")
    mode = imp.attr("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        imp.fail("only constant padding is supported")
    x = _float_in(imp, n)
    shape = imp.shape(n.input[0])
    rank = len(shape)
    pads = [int(v) for v in imp.const(n.input[1], "pads")]
    value = number(imp.const(n.input[2], "constant_value")) if len(n.input) > 2 and n.input[2] else "0"
    axes = [int(a) % rank for a in imp.const(n.input[3], "axes")] if len(n.input) > 3 and n.input[3] \
        else list(range(rank))
    k = len(axes)
    if any(p < 0 for p in pads):
        imp.fail("negative pads (cropping) are not supported")
    shape = list(shape)
    for i, ax in enumerate(axes):
        before, after = pads[i], pads[i + k]
        if not before and not after:
            continue
        parts = []
        for size in (before, None, after):
            if size is None:
                parts.append(x)
            elif size:
                fill = [size if j == ax else d for j, d in enumerate(shape)]
                z = f"zeros([{', '.join(map(str, fill))}])"
                parts.append(z if value in ("0", "0.0") else f"({z} + {value})")
        x = f"concat([{', '.join(parts)}], axis = {ax})"
        shape[ax] = before + shape[ax] + after if isinstance(shape[ax], int) else shape[ax]
    return x



@imports("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(imp, n):
    x = _float_in(imp, n)
    axes = dl_list(range(2, len(imp.shape(n.input[0]))))
    return f"{'mean' if n.op_type == 'GlobalAveragePool' else 'max'}({x}, axis = {axes}, keepdims = true)"


@imports("LpNormalization")
def _lp_norm(imp, n):
    imp.only("axis", "p")
    x, ax = _float_in(imp, n), _axis(imp, n.input[0], imp.attr("axis", -1))
    p = imp.attr("p", 2)
    if p not in (1, 2):
        imp.fail("p must be 1 or 2")
    norm = f"sum(abs({x}), axis = {ax}, keepdims = true)" if p == 1 else \
        f"sqrt(sum({x} * {x}, axis = {ax}, keepdims = true))"
    return f"where({norm} == 0, 0 * {x}, {x} / {norm})"


@imports("MeanVarianceNormalization")
def _mvn(imp, n):
    imp.only("axes")
    x = _float_in(imp, n)
    axes = dl_list(sorted(_axis(imp, n.input[0], a) for a in imp.attr("axes", [0, 2, 3])))
    mu = imp.ident("mu")
    imp.lines.append(f"    {mu} = mean({x}, axis = {axes}, keepdims = true)")
    return f"({x} - {mu}) / (sqrt(mean(({x} - {mu}) ** 2, axis = {axes}, keepdims = true)) + 1e-9)"


@imports("InstanceNormalization")
def _instance_norm(imp, n):
    imp.only("epsilon")
    x = _float_in(imp, n)
    axes = dl_list(range(2, len(imp.shape(n.input[0]))))
    eps = number(np.float32(imp.attr("epsilon", 1e-5)))
    mu = imp.ident("mu")
    imp.lines.append(f"    {mu} = mean({x}, axis = {axes}, keepdims = true)")
    scale, bias = (f"expand({imp.ref(i)}, {x})" for i in n.input[1:3])
    return f"({x} - {mu}) / sqrt(mean(({x} - {mu}) ** 2, axis = {axes}, keepdims = true) + {eps}) * {scale} + {bias}"


@imports("CumSum")
def _cumsum(imp, n):
    imp.only("exclusive", "reverse")
    x = _float_in(imp, n)
    ax = _axis(imp, n.input[0], int(imp.const(n.input[1], "axis").reshape(())))
    out = f"cumsum({x}, axis = {ax}, reverse = {'true' if imp.attr('reverse', 0) else 'false'})"
    return f"({out} - {x})" if imp.attr("exclusive", 0) else out


@imports("IsNaN")
def _isnan(imp, n):
    x = _float_in(imp, n)
    return f"({x} != {x})"


@imports("IsInf")
def _isinf(imp, n):
    imp.only("detect_negative", "detect_positive")
    x = _float_in(imp, n)
    neg, pos = imp.attr("detect_negative", 1), imp.attr("detect_positive", 1)
    if neg and pos:
        return f"(abs({x}) == inf)"
    if pos:
        return f"({x} == inf)"
    if neg:
        return f"({x} == (-inf))"
    imp.fail("detects neither sign")


@imports("Shrink")
def _shrink(imp, n):
    imp.only("bias", "lambd")
    x = _float_in(imp, n)
    lam, bias = number(np.float32(imp.attr("lambd", 0.5))), number(np.float32(imp.attr("bias", 0.0)))
    return f"where({x} < -{lam}, {x} + {bias}, where({x} > {lam}, {x} - {bias}, 0 * {x}))"


@imports("Swish")
def _swish(imp, n):
    imp.only("alpha")
    x = _float_in(imp, n)
    return f"({x} * sigmoid({number(np.float32(imp.attr('alpha', 1.0)))} * {x}))"


@imports("Expand")
def _expand(imp, n):            # broadcasting against zeros of the target shape
    x = _float_in(imp, n)
    return f"({x} + zeros([{', '.join(map(str, imp.shape(n.output[0])))}]))"


@imports("ConvTranspose")
def _conv_transpose(imp, n):
    imp.only("strides", "pads", "dilations", "output_padding", "kernel_shape", "group")
    if imp.attr("group", 1) != 1 or len(imp.shape(n.input[0])) != 4:
        imp.fail("dlc's conv_transpose is 2-D with one group")
    pads = list(imp.attr("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        imp.fail("asymmetric padding is not supported")
    out = (f"conv_transpose({imp.ref(n.input[0])}, {imp.ref(n.input[1])}, stride = {dl_list(imp.attr('strides', [1, 1]))}, "
           f"padding = {dl_list(pads[:2])}, dilation = {dl_list(imp.attr('dilations', [1, 1]))}, "
           f"output_padding = {dl_list(imp.attr('output_padding', [0, 0]))})")
    if len(n.input) > 2 and n.input[2]:
        y = imp.ident("convt")
        imp.lines.append(f"    {y} = {out}")
        out = f"{y} + expand({imp.ref(n.input[2])}, {y})"
    return out


@imports("DepthToSpace", "SpaceToDepth")
def _depth_space(imp, n):
    imp.only("blocksize", "mode")
    x, (b, c, h, w) = imp.ref(n.input[0]), imp.shape(n.input[0])
    k = imp.attr("blocksize")
    mode = imp.attr("mode", b"DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if n.op_type == "SpaceToDepth":
        t = f"reshape({x}, [{b}, {c}, {h // k}, {k}, {w // k}, {k}])"
        t = f"transpose({t}, perm = {'[0, 3, 5, 1, 2, 4]' if mode == 'DCR' else '[0, 1, 3, 5, 2, 4]'})"
        return f"reshape({t}, [{b}, {c * k * k}, {h // k}, {w // k}])"
    if mode == "DCR":
        t = f"transpose(reshape({x}, [{b}, {k}, {k}, {c // (k * k)}, {h}, {w}]), perm = [0, 3, 4, 1, 5, 2])"
    else:
        t = f"transpose(reshape({x}, [{b}, {c // (k * k)}, {k}, {k}, {h}, {w}]), perm = [0, 1, 4, 2, 5, 3])"
    return f"reshape({t}, [{b}, {c // (k * k)}, {h * k}, {w * k}])"

# Inputs each op needs at compile time (shapes, axes, bounds): a graph input there must be
# given as a constant (`from_onnx(..., constants=...)`).
STATIC_INPUTS = {"Reshape": (1,), "Slice": (1, 2, 3, 4), "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
                 "Pad": (1, 2, 3), "Dropout": (1, 2), "Clip": (1, 2), "CumSum": (1,), "Expand": (1,),
                 **{op: (1,) for op in REDUCTIONS}}
