"""Lowering: the AST becomes the graph IR, with every shape checked.

`def`s and `model`s are inlined at each call; every call site of a `def` gets its own
parameters, named hierarchically (`mlp/dense_1/W`), the calls numbered within each call of the
enclosing function. A model is one scope, so calling it twice makes the same names and uses
the same parameters; so does passing the same `name = "..."` to two calls (weight tying, of
everything the function calls too).

A train block lowers to one graph holding every phase's loss (`Program.phases`); each phase's
training step is cut out of it (`Program.step_graph`).

Here: expressions, calls, statements, parameters and state. Beside it: `program.py` (the
values and what lowering produces), `definitions.py` (imports and the standard library),
`typecheck.py` (declared types and sizes), `scan_lowering.py` (scan bodies), `builtins.py`,
`indexing.py`, `train_block.py` and `generate.py`.
"""
from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

from dsl import ast as A
from dsl.diagnostics import DlcError, Loc

from . import indexing
from .definitions import Definitions
from .ir import Graph
from .optim import OPTIMIZERS, SCHEDULES, OptimizerSpec, ScheduleSpec
from .program import INITIALIZERS, Frame, InitSpec, Outer, ParamInfo, Phase, Program, SymDim, Tensor  # noqa: F401
from .scan_lowering import capture, lower_scan
from .shapes import FLOATS, INTS, dim_div, dim_mul, fmt_shape, fmt_type, same_dim
from .typecheck import check_type, dtype_of, eval_dim, input_shape
from .typecheck import suggest as _suggest

MAX_DEPTH = 64


# the standard library's losses that say what a model is trained to do (runtime/metrics.py gives
# each its metrics): lowering records each call's prediction and target
TASK_LOSSES = ("cross_entropy", "mse", "bce_with_logits")


class Lowerer:
    def __init__(self, module: A.Module, float_dtype: str = "f32", training: bool = True,
                 temperature: float = 0.0, row_offsets: bool = False):
        self.float_dtype = float_dtype
        self.row_offsets = row_offsets          # data-parallel: draws follow the global batch's rows
        self.training = training
        self.temperature = temperature          # decoding: 0 = greedy, > 0 = sampling
        defs = Definitions(module)
        self.user_files, self.funcs, self.models = defs.user_files, defs.funcs, defs.models
        self.trains, self.generators = defs.trains, defs.generators
        self.g = Graph(module.loc.file)
        self.root = self.g                   # parameters live here even when a scan body is lowered
        self.scans: list[dict] = []
        self.params: dict[str, ParamInfo] = {}
        self.states: dict[str, ParamInfo] = {}     # non-trainable state declared with `state`
        self.depth = 0
        self.model_outputs: list[int] = []     # the trained model's results, at its first call
        self.loss_calls: list[tuple] = []      # (loss, prediction, target, graph) of each call of a
                                               # standard-library loss that names a task (TASK_LOSSES)
        self.current_model = None
        self.rng_salt = 0
        self.layers: list[tuple] = []     # (scope, function, output shape, params, state values)
        self.last_scope = ""
        self._rng = None
        self._rng_row = None

    def draw_seed(self, shape: tuple, per_element: int, loc: Loc | None) -> int:
        """The seed of a random draw over `shape` taking `per_element` counters of its stream per
        element. Lowered for data-parallel training (`row_offsets`), where a rank runs rows
        r0, r0 + 1, ... of the global batch as its rows 0, 1, ..., a draw whose first axis is
        the batch is shifted to the counters of those global rows: the stream is a function of
        seed + counter * COUNTER_STRIDE (mod 2**64), so moving the counter by r0 * (counters per
        row) adds r0 * (counters per row) * COUNTER_STRIDE to the seed, r0 being the run-time
        scalar input `rng_row`. A draw without the batch axis is the same on every rank."""
        from .ops_nn import COUNTER_STRIDE
        seed = self.rng_input()
        if not self.row_offsets or "B" not in shape:
            return seed
        if shape[0] != "B" or not all(isinstance(d, int) for d in shape[1:]) or self.scans:
            raise DlcError("data-parallel training (mpiexec) cannot yet give this random draw the numbers "
                           "of one process: it needs the batch as the draw's first axis, fixed sizes for the "
                           "others, and no scan around it", loc, [f"the draw's shape is {fmt_shape(shape)}"])
        stride = math.prod(shape[1:]) * per_element * COUNTER_STRIDE % 2 ** 64
        if self._rng_row is None:
            with self.root.at(None):
                self._rng_row = self.root.input("rng_row", (), "i64", "scalar")
        shift = self.g.add("mul", self._rng_row, self.g.const(stride - (stride >> 63 << 64), "i64"))
        return self.g.add("add", seed, shift)

    def rng_input(self) -> int:
        """The per-step random seed, a run-time scalar input (made on first use)."""
        if self._rng is None:
            with self.root.at(None):
                self._rng = self.root.input("rng", (), "i64", "scalar")
        if not self.scans:
            return self._rng
        cap = self.scans[-1]             # in a scan body: the step's own seed, a hidden carry
        if "rng" not in cap:
            with cap["graph"].at(None):
                cap["rng"] = cap["graph"].input("rng", (1,), "i64", "data")
                cap["seed"] = cap["graph"].add("reshape", cap["rng"], shape=())
        return cap["seed"]

    # ---- entry points --------------------------------------------------------------------------
    def lower_train(self, train: A.TrainDef, fields: dict[str, tuple[str, tuple]]) -> Program:
        """Lower a train block (`compiler/train_block.py`). `fields` maps each data field to
        (dtype, per-example shape)."""
        from .train_block import lower_train_block
        return lower_train_block(self, train, fields)

    def lower_model(self, name: str, loc: Loc | None = None) -> Program:
        """Lower a model alone, its inputs typed by its signature (for inference and checks)."""
        if name not in self.models:
            raise DlcError(f"unknown model `{name}`", loc, _suggest(name, self.models))
        fn = self.models[name]
        self.g.name = name
        self.current_model = name
        frame = Frame({}, {}, "", "model", None)
        args = []
        for p in fn.params:
            if not isinstance(p.type, A.TensorType) or p.type.dtype is None:
                raise DlcError(f"model input `{p.name}` needs a full type such as f32[B, 64]", p.loc)
            dt = dtype_of(self, p.type.dtype, p.type.loc)
            args.append(Tensor(self.g.input(p.name, input_shape(p.type, "model inputs"), dt, "data", loc=p.loc)))
        prog = Program(self.g, self.params, {self.g[a.node]["name"]: a.node for a in args}, self.states, model=name)
        call = A.Call(fn.loc, name, fn.loc, tuple(A.Name(fn.loc, p.name) for p in fn.params), ())
        frame.vars.update({p.name: a for p, a in zip(fn.params, args)})
        self.eval(call, frame)
        self._model_outputs()
        return prog

    def lower_generate(self, name: str, options: dict | None = None) -> Program:
        """Lower a sampling program (`compiler/generate.py`)."""
        from .generate import lower_generate
        return lower_generate(self, name, options)

    def _model_outputs(self):
        for i, n in enumerate(self.model_outputs):
            self.g.outputs["output" if i == 0 else f"output{i + 1}"] = n

    # ---- expressions ---------------------------------------------------------------------------
    def loc_of(self, node: A.Node, frame: Frame) -> Loc:
        """Nodes made inside the standard library point at the user's call site."""
        if node.loc.file in self.user_files or frame.user_loc is None:
            return node.loc
        return frame.user_loc

    def eval(self, e: A.Node, frame: Frame):
        try:
            return self._eval(e, frame)
        except DlcError as err:
            if err.origin is None:
                err.origin = e.loc
            raise

    def _eval(self, e: A.Node, frame: Frame):
        loc = self.loc_of(e, frame)
        with self.g.at(loc):
            if isinstance(e, A.Number):
                return e.value
            if isinstance(e, (A.String, A.Bool)):
                return e.value
            if isinstance(e, A.List):
                return [self.eval(x, frame) for x in e.items]
            if isinstance(e, A.Name):
                return self._name(e, frame)
            if isinstance(e, A.Neg):
                v = self.eval(e.operand, frame)
                if isinstance(v, Tensor):
                    return Tensor(self.g.add("neg", v.node))
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    return -v
                raise DlcError(f"cannot negate {self._describe(v)}", e.loc)
            if isinstance(e, A.BinOp):
                return self.binop(e.op, self.eval(e.left, frame), self.eval(e.right, frame), e)
            if isinstance(e, A.Not):
                v = self.eval(e.operand, frame)
                if isinstance(v, bool):
                    return not v
                if isinstance(v, Tensor) and self.g.dtype(v.node) == "bool":
                    return Tensor(self.g.add("logical_not", v.node))
                raise DlcError(f"`not` takes a boolean or a comparison, got {self._describe(v)}", e.loc)
            if isinstance(e, A.Index):
                return indexing.index(self, self.eval(e.value, frame), [self._subscript(i, frame) for i in e.items],
                                      e.loc)
            if isinstance(e, A.Call):
                return self.call(e, frame)
        raise DlcError(f"unsupported expression {type(e).__name__}", e.loc)  # pragma: no cover

    def _subscript(self, it: A.Node, frame: Frame) -> indexing.Item:
        if isinstance(it, A.EllipsisItem):
            return indexing.Item("ellipsis", it.loc)
        if isinstance(it, A.SliceItem):
            bound = [None if b is None else self.eval(b, frame) for b in (it.start, it.stop)]
            return indexing.Item("slice", it.loc, start=bound[0], stop=bound[1])
        return indexing.Item("index", it.loc, value=self.eval(it, frame))

    def _name(self, e: A.Name, frame: Frame):
        if e.name in frame.vars:
            v = frame.vars[e.name]
            if isinstance(v, Outer):
                return Tensor(capture(self, v.node))
            if v is None:
                raise DlcError(f"`{e.name}` steps through a range and has no value", e.loc)
            return v
        if e.name in frame.dims:
            d = frame.dims[e.name]
            return d if isinstance(d, int) else SymDim(d)
        if e.name in CONSTANTS:
            return CONSTANTS[e.name]
        if e.name == "training":
            return self.training
        if e.name == "temperature":
            return self.temperature
        if e.name in INITIALIZERS:
            return InitSpec(e.name)
        if e.name in self.funcs or e.name in BUILTINS or e.name in self.models:
            raise DlcError(f"`{e.name}` is a function; call it with (...)", e.loc)
        options = list(frame.vars) + list(CONSTANTS) + list(INITIALIZERS)
        raise DlcError(f"unknown name `{e.name}`", e.loc, _suggest(e.name, options))

    def _describe(self, v) -> str:
        if isinstance(v, Tensor):
            return fmt_type(self.g.dtype(v.node), self.g.shape(v.node))
        if isinstance(v, bool):
            return f"the boolean {str(v).lower()}"
        if isinstance(v, (int, float)):
            return f"the number {v}"
        if isinstance(v, tuple):
            return f"{len(v)} values (unpack them: `a, b = f(...)`)"
        return type(v).__name__ if not isinstance(v, (InitSpec, OptimizerSpec, str)) else repr(str(v))

    def to_tensor(self, v, like_dtype: str | None, loc: Loc) -> Tensor:
        if isinstance(v, Tensor):
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DlcError(f"expected a tensor or a number, got {self._describe(v)}", loc)
        if like_dtype in INTS and isinstance(v, int):
            return Tensor(self.g.const(v, like_dtype))
        dt = like_dtype if like_dtype in FLOATS else self.float_dtype
        return Tensor(self.g.const(v, dt))

    def binop(self, op: str, a, b, e: A.Node):
        num = (int, float)
        if op in ("==", "!=") and isinstance(a, (str, bool)) and isinstance(b, (str, bool)):
            return (a == b) if op == "==" else (a != b)
        if op in ("and", "or"):
            return self._logical(op, a, b, e)
        if isinstance(a, SymDim) or isinstance(b, SymDim):
            return self._dim_arith(op, a, b, e)
        if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
            try:
                v = _PY_BINOPS[op](a, b)
            except (ZeroDivisionError, OverflowError, KeyError) as err:
                raise DlcError(f"cannot compute {a} {op} {b}: {err}", e.loc) from None
            if isinstance(v, complex) or isinstance(v, int) and not -2**63 <= v < 2**63 or \
                    isinstance(v, float) and not math.isfinite(v) and math.isfinite(a) and math.isfinite(b):
                raise DlcError(f"cannot compute {a} {op} {b}: the result is not a finite real number", e.loc)
            return v
        if op == "@":
            if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
                raise DlcError(f"`@` multiplies two tensors, got {self._describe(a)} @ {self._describe(b)}", e.loc)
            return Tensor(matmul(self, a.node, b.node))
        da = self.g.dtype(a.node) if isinstance(a, Tensor) else None
        db = self.g.dtype(b.node) if isinstance(b, Tensor) else None
        ta = self.to_tensor(a, db, e.loc)
        tb = self.to_tensor(b, da, e.loc)
        if op == "**" and not isinstance(b, Tensor) and b == 2:
            return Tensor(self.g.add("mul", ta.node, ta.node))
        return Tensor(self.g.add(_TENSOR_BINOPS[op], ta.node, tb.node))

    def _logical(self, op: str, a, b, e: A.Node):
        """`and`/`or`: on booleans known at compile time, or elementwise on bool tensors."""
        for v in (a, b):
            if not (isinstance(v, bool) or (isinstance(v, Tensor) and self.g.dtype(v.node) == "bool")):
                raise DlcError(f"`{op}` takes booleans or comparisons, got {self._describe(v)}", e.loc)
        if isinstance(a, bool) and isinstance(b, bool):
            return (a and b) if op == "and" else (a or b)
        if isinstance(a, bool) or isinstance(b, bool):       # `t and true` is t; `t and false` all false
            known, t = (a, b) if isinstance(a, bool) else (b, a)
            if known == (op == "and"):
                return t
            return Tensor(self.g.add("broadcast_to", self.g.const(known, "bool"), shape=self.g.shape(t.node)))
        return Tensor(self.g.add("logical_and" if op == "and" else "logical_or", a.node, b.node))

    def _dim_arith(self, op: str, a, b, e: A.Node):
        """Sizes as values: a symbolic size (the batch) times or exactly divided by another."""
        ok = all(isinstance(v, SymDim) or (isinstance(v, int) and not isinstance(v, bool)) for v in (a, b))
        r = None
        if ok and op == "*":
            r = dim_mul(a, b)
        elif ok and op == "//":
            r = dim_div(a, b)
            if r is None:
                raise DlcError(f"the size {a} is not known to be divisible by {b}", e.loc)
        elif ok and op in ("==", "!="):
            return same_dim(a, b) == (op == "==")
        if r is None:
            raise DlcError(f"cannot compute {self._describe(a)} {op} {self._describe(b)} at compile time", e.loc,
                           ["a symbolic size can be multiplied and divided exactly (`B * T`, `N // 2`)"])
        return SymDim(r) if isinstance(r, str) else r

    # ---- calls -----------------------------------------------------------------------------------
    def call(self, e: A.Call, frame: Frame):
        # a call in the body of the model being trained (however deep the loss calls it), on its first call
        top = frame.fn == self.current_model and frame.scope == frame.fn and not self.model_outputs
        before = (len(self.params), len(self.states))
        nlayers = len(self.layers)
        result = self._call(e, frame)
        if top and isinstance(result, Tensor):     # a layer of the model, for its summary
            scope = self.last_scope if e.func in self.funcs else e.func
            inner = self.layers[nlayers:]          # layers among this call's arguments
            self.layers.append((scope, e.func, self.g.shape(result.node),
                                self._count_since(self.params, before[0]) - sum(x[3] for x in inner),
                                self._count_since(self.states, before[1]) - sum(x[4] for x in inner)))
        return result

    @staticmethod
    def _count_since(table, n: int) -> int:
        """The size of the entries added to `table` after its first `n` (entries are only
        added): linear in what a call added, so a model of many layers lowers in linear time."""
        return sum(_numel(p.shape) for p in itertools.islice(reversed(table.values()), max(0, len(table) - n)))

    def _call(self, e: A.Call, frame: Frame):
        if e.func in self.funcs:
            return self.call_def(self.funcs[e.func], e, frame)
        if e.func in self.models:
            return self.call_def(self.models[e.func], e, frame)
        if e.func in BUILTINS:
            args = [self.eval(a, frame) for a in e.args]
            kwargs = {k: self.eval(v, frame) for k, v in e.kwargs}
            return BUILTINS[e.func](self, e, args, kwargs)
        if e.func in INITIALIZERS:
            kwargs = {k: self.eval(v, frame) for k, v in e.kwargs}
            allowed = INITIALIZERS[e.func]
            for k in kwargs:
                if k not in allowed:
                    raise DlcError(f"initializer `{e.func}` has no option `{k}`", e.loc,
                                   [f"options: {', '.join(allowed) or 'none'}"])
            if e.args:
                raise DlcError(f"initializer `{e.func}` takes keyword options only", e.loc)
            return InitSpec(e.func, tuple(sorted(kwargs.items())))
        if e.func in OPTIMIZERS:
            return self._optimizer(e, frame)
        if e.func in SCHEDULES:           # a learning-rate schedule: `adam(schedule = cosine(warmup = 1))`
            if e.args:
                raise DlcError(f"`{e.func}` takes keyword options, e.g. cosine(warmup = 1)", e.loc)
            try:
                return ScheduleSpec.make(e.func, **{k: self.eval(v, frame) for k, v in e.kwargs})
            except (TypeError, ValueError) as err:
                raise DlcError(str(err), e.loc) from None
        options = list(self.funcs) + list(self.models) + list(BUILTINS)
        raise DlcError(f"unknown function `{e.func}`", e.func_loc, _suggest(e.func, options))

    def _optimizer(self, e: A.Call, frame: Frame) -> OptimizerSpec:
        defaults = OPTIMIZERS[e.func].defaults
        if e.args:
            raise DlcError(f"`{e.func}` takes keyword options, e.g. {e.func}(lr = 0.01)", e.loc)
        opts = {}
        for k, v in e.kwargs:
            if k not in defaults:
                raise DlcError(f"`{e.func}` has no option `{k}`", v.loc,
                               _suggest(k, defaults) + [f"options: {', '.join(defaults)}"])
            if k == "schedule" and isinstance(v, A.Call) and v.func not in SCHEDULES and v.func not in self.funcs:
                raise DlcError(f"unknown schedule `{v.func}`", v.func_loc,
                               _suggest(v.func, SCHEDULES) + [f"schedules: {', '.join(SCHEDULES)}"])
            val = self.eval(v, frame)
            if k == "schedule":
                if not isinstance(val, ScheduleSpec):
                    raise DlcError(f"`schedule` is one of {', '.join(SCHEDULES)}(...), got {self._describe(val)}",
                                   v.loc)
            elif k == "decay":
                if not (val in ("weights", "all") or (isinstance(val, list) and all(isinstance(s, str) for s in val))):
                    raise DlcError('decay must be "weights", "all" or a list of parameter name patterns', v.loc)
            elif isinstance(defaults[k], bool):
                if not isinstance(val, bool):
                    raise DlcError(f"`{k}` must be true or false", v.loc)
            elif isinstance(val, bool) or not isinstance(val, (int, float)):
                raise DlcError(f"`{k}` must be a number, got {self._describe(val)}", v.loc)
            elif why := OPTIMIZERS[e.func].option_error(k, val):      # its range: compiler/optim.py
                raise DlcError(why, v.loc)
            opts[k] = val
        spec = OptimizerSpec(e.func, **opts)
        if getattr(spec, "nesterov", False) and not spec.momentum:
            raise DlcError("nesterov needs momentum > 0", e.loc)
        return spec

    def _metrics(self, e: A.Node):
        items = e.items if isinstance(e, A.List) else (e,)
        out = []
        for it in items:
            if not isinstance(it, A.Name) or not (it.name in METRICS or re.fullmatch(r"top[1-9][0-9]*", it.name)):
                raise DlcError(f"metrics are names from: {', '.join(METRICS)}, top3, top5 (any topK)", it.loc)
            out.append(it.name)
        return out

    def call_def(self, fn: A.FuncDef, e: A.Call, frame: Frame):
        args = [self.eval(a, frame) for a in e.args]
        kwargs = {k: self.eval(v, frame) for k, v in e.kwargs}
        pnames = [p.name for p in fn.params]
        share = None
        if "name" in kwargs and "name" not in pnames:
            share = kwargs.pop("name")
            if not isinstance(share, str) or not share or "/" in share:
                raise DlcError("`name` must be a non-empty string without '/'", e.loc)
        if len(args) > len(fn.params):
            raise DlcError(f"`{fn.name}` takes {len(fn.params)} argument{'s' * (len(fn.params) != 1)} "
                           f"({', '.join(pnames)}), got {len(args)}", e.loc)
        bound = dict(zip(pnames, args))
        for k, v in kwargs.items():
            if k not in pnames:
                raise DlcError(f"`{fn.name}` has no parameter `{k}`", dict(e.kwargs)[k].loc,
                               _suggest(k, pnames) + [f"parameters: {', '.join(pnames)}"])
            if k in bound:
                raise DlcError(f"`{fn.name}`: argument `{k}` given twice", dict(e.kwargs)[k].loc)
            bound[k] = v
        # the new frame: scope and call-site location
        if fn.kind == "model":
            scope = fn.name
        elif fn.kind == "generate":         # a sampling program's calls name their scopes from the root
            scope = ""
        else:
            base = frame.scope
            if share is not None:
                local = share
            else:
                # numbered per call of the enclosing function: a model called twice, or two
                # calls given one `name`, make the same scopes inside and so share parameters
                frame.counters[fn.name] = frame.counters.get(fn.name, 0) + 1
                local = f"{fn.name}_{frame.counters[fn.name]}"
            scope = f"{base}/{local}" if base else local
        user_loc = e.loc if e.loc.file in self.user_files else frame.user_loc
        inner = Frame({}, {}, scope, fn.name, user_loc)
        self.last_scope = scope
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise DlcError(f"calls nest deeper than {MAX_DEPTH} (is `{fn.name}` recursive?)", e.loc)
        try:
            for p in fn.params:
                if p.name in bound:
                    v = bound[p.name]
                elif p.default is not None:
                    v = self.eval(p.default, inner)
                else:
                    raise DlcError(f"`{fn.name}` is missing argument `{p.name}`", e.loc,
                                   [f"parameters: {', '.join(pnames)}"])
                if p.type is not None:
                    check_type(self, p.type, v, inner, f"argument `{p.name}` of `{fn.name}`", e.loc)
                inner.vars[p.name] = v
            if fn.name in TASK_LOSSES and fn.loc.file not in self.user_files and len(fn.params) >= 2:
                self.loss_calls.append((fn.name, inner.vars[fn.params[0].name], inner.vars[fn.params[1].name], self.g))
            result = self.run_body(fn, inner)
        except DlcError as err:
            origin = err.origin or err.loc
            if origin is not None and origin.file not in self.user_files and e.loc.file in self.user_files:
                err.notes.append(f"inside `{fn.name}` at {Path(origin.file).name}:{origin.line}")
                err.loc = e.loc
                err.origin = e.loc
            raise
        finally:
            self.depth -= 1
        # several values (`return a, b`) are a tuple, unpacked with `a, b = f(x)`; the declared
        # result type is the first one's. The first call of the trained model gives the
        # program's outputs: "output" (the metrics read it), then "output2", ... (decoded tokens)
        values = result if isinstance(result, tuple) else (result,)
        if fn.ret is not None:
            ret_loc = self._return_loc(fn) if fn.loc.file in self.user_files else e.loc
            check_type(self, fn.ret, values[0], inner, f"the result of `{fn.name}`", ret_loc)
        if fn.kind == "model" and fn.name == self.current_model and not self.model_outputs:
            self.model_outputs = [v.node for v in values if isinstance(v, Tensor)]
        self.last_scope = scope
        return result

    @staticmethod
    def _return_loc(fn: A.FuncDef) -> Loc:
        for st in fn.body:
            if isinstance(st, A.Return):
                return st.values[0].loc
        return fn.loc

    def run_body(self, fn: A.FuncDef, frame: Frame):
        done, value = self.run_stmts(fn.body, frame)
        if not done:
            raise DlcError(f"`{fn.name}` has no return statement", fn.loc)
        return value

    def run_stmts(self, stmts, frame: Frame) -> tuple[bool, object]:
        """Execute statements; (True, value) once a `return` runs."""
        for st in stmts:
            if isinstance(st, A.Assign):
                frame.vars[st.name] = self.eval(st.value, frame)
            elif isinstance(st, A.ParamDecl):
                frame.vars[st.name] = self.declare_param(st, frame)
            elif isinstance(st, A.StateDecl):
                frame.vars[st.name] = self.declare_param(st, frame, kind="state")
            elif isinstance(st, A.Update):
                self.update_state(st, frame)
            elif isinstance(st, A.If):
                cond = self.eval(st.cond, frame)
                if not isinstance(cond, bool):
                    raise DlcError("`if` needs a condition known at compile time (such as `training`), "
                                   f"got {self._describe(cond)}", st.cond.loc, ["for tensors use where(cond, a, b)"])
                done, value = self.run_stmts(st.then if cond else st.orelse, frame)
                if done:
                    return True, value
            elif isinstance(st, A.MultiAssign):
                v = self.eval(st.value, frame)
                if not isinstance(v, tuple) or len(v) != len(st.names):
                    n = len(v) if isinstance(v, tuple) else 1
                    raise DlcError(f"{len(st.names)} names on the left but {n} value{'s' * (n != 1)} on the right",
                                   st.loc)
                frame.vars.update(zip(st.names, v))
            elif isinstance(st, A.Scan):
                lower_scan(self, st, frame)
            elif isinstance(st, A.Phase):
                raise DlcError("`phase` blocks belong in a train block", st.loc)
            elif isinstance(st, A.Yield):
                if frame.yielded is None:
                    raise DlcError("`yield` belongs in the body of a `scan`", st.loc)
                frame.yielded[:] = [self.eval(v, frame) for v in st.values]
            elif isinstance(st, A.Return):
                if frame.yielded is not None:
                    raise DlcError("a scan body ends with `yield`, not `return`", st.loc)
                vals = [self.eval(v, frame) for v in st.values]
                return True, (vals[0] if len(vals) == 1 else tuple(vals))
        return False, None

    def update_state(self, st: A.Update, frame: Frame):
        target = frame.vars.get(st.name)
        node = target.node if isinstance(target, Tensor) else None
        if node is None or self.g.op(node) != "input" or self.g.attrs(node)["kind"] != "state":
            raise DlcError(f"`{st.name}` is not a state declared with `state`; only states can be updated with `<-`",
                           st.loc)
        value = self.to_tensor(self.eval(st.value, frame), self.g.dtype(node), st.loc)
        loc = self.loc_of(st, frame)
        if self.g.shape(value.node) != self.g.shape(node):
            raise DlcError(f"state `{self.g[node]['name']}` is {fmt_type(self.g.dtype(node), self.g.shape(node))}, "
                           f"the new value is {self._describe(value)}", loc)
        if self.scans:
            raise DlcError("states cannot be updated inside a scan body", st.loc)
        if not self.training:
            return                      # state only changes in the training step
        if node in self.g.updates:
            raise DlcError(f"state `{self.g[node]['name']}` is updated twice in one step", loc)
        v = value.node
        if self.g.dtype(v) != self.g.dtype(node):
            v = self.g.add("cast", v, dtype=self.g.dtype(node), loc=loc)
        self.g.updates[node] = v

    # ---- parameters --------------------------------------------------------------------------
    def declare_param(self, st, frame: Frame, kind: str = "param") -> Tensor:
        if not isinstance(st.type, A.TensorType):
            raise DlcError(f"{kind} `{st.name}` needs a tensor type, such as [64, 10] or f32[10]", st.type.loc)
        shape = []
        for d in st.type.dims:
            v = eval_dim(self, d, frame)
            if not isinstance(v, int):
                raise DlcError(f"parameter `{st.name}` needs a fixed size, but dimension {v} depends on the input",
                               self.loc_of(d, frame))
            if v <= 0:
                raise DlcError(f"parameter `{st.name}` has a dimension of size {v}", self.loc_of(d, frame))
            shape.append(v)
        dtype = dtype_of(self, st.type.dtype, st.type.loc) if st.type.dtype else self.float_dtype
        init = self.eval(st.init, frame) if st.init is not None else InitSpec("zeros")
        if isinstance(init, (int, float)) and not isinstance(init, bool):
            init = InitSpec("constant", (("value", float(init)),))
        if not isinstance(init, InitSpec):
            raise DlcError(f"unknown initializer for `{st.name}`; use one of {', '.join(INITIALIZERS)}",
                           self.loc_of(st.init, frame))
        name = f"{frame.scope}/{st.name}" if frame.scope else st.name
        loc = self.loc_of(st, frame)
        table = self.params if kind == "param" else self.states
        if name in table:
            info = table[name]
            if info.shape != tuple(shape):
                raise DlcError(f"shared parameter `{name}` is {fmt_shape(tuple(shape))} here but "
                               f"{fmt_shape(info.shape)} at its first use ({info.loc})", loc)
            return Tensor(capture(self, info.node) if self.scans else info.node)
        n = self.root.input(name, tuple(shape), dtype, kind, loc=loc)
        table[name] = ParamInfo(name, n, tuple(shape), dtype, init, loc)
        return Tensor(capture(self, n) if self.scans else n)

def _numel(shape) -> int:
    return math.prod(shape)


_PY_BINOPS = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
    "**": lambda a, b: a ** b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
    "//": lambda a, b: a // b,
}
_TENSOR_BINOPS = {"+": "add", "-": "sub", "*": "mul", "/": "div", "**": "pow", "==": "eq", "!=": "ne",
                  "<": "lt", "<=": "le", ">": "gt", ">=": "ge",
                  "//": "floordiv"}

CONSTANTS = {"pi": math.pi, "e": math.e, "inf": math.inf}
METRICS = ("accuracy", "exact", "loss", "mse", "mae", "rmse", "r2", "f1", "auc")     # which apply follows the loss (runtime/metrics.py)

from .builtins import BUILTINS, matmul  # noqa: E402  (the builtins use Tensor and Lowerer above)


def lower_train(module: A.Module, fields, float_dtype="f32", train_index=0, training=True) -> tuple[Program, "Lowerer"]:
    lw = Lowerer(module, float_dtype, training)
    if not lw.trains:
        raise DlcError("this file has no `train` block", module.loc)
    return lw.lower_train(lw.trains[train_index], fields), lw
