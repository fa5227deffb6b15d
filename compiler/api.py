"""Compile a `.dl` model as a plain function (used by tests, and by tools that embed dlc).

    f = compile_function(src, "f", grad=["x", "lin/W"], dtype="f64")
    out = f(x=..., **{"lin/W": ...})      # {"output": ..., "grad:x": ..., "grad:lin/W": ...}

With `grad`, the model must return a scalar (the loss); gradients are taken with respect to
the named inputs and parameters (`grad=True`: every parameter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dsl.diagnostics import DlcError
from dsl.parser import parse, parse_file

from .driver import Executable, build, optimize
from .lower import Lowerer, ParamInfo
from .passes import Context
from .shapes import DTYPES


@dataclass
class Function:
    ex: Executable
    params: dict[str, ParamInfo]
    graph: object

    @property
    def source(self) -> str:
        return self.ex.source

    def __call__(self, **arrays) -> dict[str, np.ndarray]:
        args, dims = [], {}
        for name, kind, shape, dtype in self.ex.inputs:
            if name not in arrays:
                raise KeyError(f"missing value for {kind} `{name}`")
            a = np.asarray(arrays[name], dtype=DTYPES[dtype])   # (ascontiguousarray makes 0-d 1-d)
            check_shape(name, a.shape, shape, dtype, dims)
            args.append(DTYPES[dtype](a) if kind == "scalar" else np.ascontiguousarray(a) if a.ndim else a)
        return dict(zip(self.ex.outputs, self.ex(*args)))


def check_shape(name: str, got: tuple, shape: tuple, dtype: str, dims: dict) -> None:
    """An argument's shape against its declared one; symbolic dims (B) bind on first use and
    must agree afterwards (`dims` holds the bindings). Raises ValueError naming the input."""
    from .shapes import dim_factors, fmt_type
    ok = len(got) == len(shape)
    for want, n in zip(shape, got) if ok else ():
        c, syms = dim_factors(want)
        if len(syms) == 1 and syms[0] not in dims and n % c == 0:
            dims[syms[0]] = n // c
        if all(s in dims for s in syms):        # (a product of unbound symbols is not checked)
            ok = ok and c * math.prod(dims[s] for s in syms) == n
    if not ok:
        bound = ", ".join(f"{k} = {v}" for k, v in dims.items())
        raise ValueError(f"input `{name}` must be {fmt_type(dtype, shape)}, got shape {list(got)}"
                         + (f" (with {bound})" if bound else ""))


def lower_function(src: str, model: str | None = None, dtype: str = "f64", filename: str = "<test>.dl",
                   training: bool = True):
    module = parse_file(src) if src.endswith(".dl") and "\n" not in src else parse(src, filename)
    lw = Lowerer(module, dtype, training)
    name = model or next(iter(lw.models), None)
    if name is None:
        raise DlcError("no model to compile", module.loc)
    return lw, lw.lower_model(name)


def compile_function(src: str, model: str | None = None, *, grad=(), dtype: str = "f64", fuse: bool = True,
                     filename: str = "<test>.dl", training: bool = True) -> Function:
    """`training` selects the mode seen by `if training` (dropout, batch norm); with
    `training`, state updates (`<-`) become outputs named "state:NAME"."""
    lw, prog = lower_function(src, model, dtype, filename, training)
    g = prog.graph
    for s, v in list(g.updates.items()):     # a function has no state to write: return new values
        g.outputs[f"state:{g[s]['name']}"] = v
        del g.updates[s]
    if grad:
        out = g.outputs.pop("output")
        g.outputs["loss"] = out
        names = list(prog.params) if grad is True else list(grad)
        wrt = {}
        for n in names:
            if n in prog.params:
                wrt[n] = prog.params[n].node
            elif g.input_by_name(n) is not None:
                wrt[n] = g.input_by_name(n)
            else:
                raise KeyError(f"no input or parameter named {n!r}; parameters: {sorted(prog.params)}")
        g = optimize(g, "grad", Context(params=wrt, expose_grads=True), fuse)
    else:
        g = optimize(g, "eval", Context(), fuse)
    return Function(build(g), prog.params, g)


def rng_seed(seed: int, step: int) -> int:
    """The random stream of a training step (`rand_like`, `sample`): a function of the run's
    seed and the step number, the same for `TrainStep` and `runtime.Session`."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA77) & 0x7FFFFFFFFFFFFFFF


class TrainStep:
    """A compiled training step (forward, backward, optimizer update) over a model whose
    output is the loss. Parameters and optimizer state live in `params` and `state` and are
    updated in place by each call; step t draws the random numbers `rng_seed(seed, t)`."""

    def __init__(self, ex: Executable, params: dict, optimizer, seed: int = 0):
        self.ex, self.optimizer, self.t, self.seed = ex, optimizer, 0, seed
        self.params = {k: None for k in params}
        self.state = {name: np.zeros(shape, DTYPES[dtype]) for name, kind, shape, dtype in ex.inputs
                      if kind == "state"}

    def __call__(self, **data) -> float:
        from .optim import bias_corrections
        self.t += 1
        sc = {"lr": self.optimizer.lr, "rng": rng_seed(self.seed, self.t), **bias_corrections(self.optimizer, self.t)}
        args = []
        for name, kind, shape, dtype in self.ex.inputs:
            if kind == "param":
                args.append(self.params[name])
            elif kind == "state":
                args.append(self.state[name])
            elif kind == "scalar":
                args.append(DTYPES[dtype](sc[name]))
            else:
                args.append(np.ascontiguousarray(data[name], dtype=DTYPES[dtype]))
        return float(dict(zip(self.ex.outputs, self.ex(*args)))["loss"])


def compile_train_step(src: str, optimizer, model: str | None = None, *, dtype: str = "f64",
                       fuse: bool = True, filename: str = "<test>.dl", seed: int = 0) -> TrainStep:
    """`optimizer` is an `OptimizerSpec`; set `step.params[name]` to contiguous arrays first."""
    lw, prog = lower_function(src, model, dtype, filename)
    g = prog.graph
    g.outputs["loss"] = g.outputs.pop("output")
    ctx = Context(params={k: v.node for k, v in prog.params.items()}, optimizer=optimizer)
    g = optimize(g, "train", ctx, fuse)
    return TrainStep(build(g), prog.params, optimizer, seed)
