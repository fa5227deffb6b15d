"""Lowering a sampling program: `generate NAME(n) { ...; return samples }`.

The program has no data: its one input, `count` (i32[n], its values unused), carries the number
of samples `n` as a symbolic size, so one compiled program draws any number. The body is
lowered in evaluation mode like a model's (the caller makes the Lowerer with training = False):
the models it calls use the parameters they were trained with (`G/...`), batch norm its running
statistics, and its random draws (and those of every step of a `scan`) come from the seeded
stream. Its result must have n as its first axis: float samples are images, integer ones tokens.

Further parameters are either inputs, typed in full like a model's (`prompt: i32[1, P]`, fed by
the runtime: a text prompt's token ids), or compile-time options with a default
(`temperature: float = 0`, `top_k: int = 0`), which the runtime may set (`dlc sample --top-k 10`).
Calls in the body name their scopes from the root, so `f(x, name = "gpt")` uses the parameters
the model `gpt` trained (`gpt/...`): a decoding step can reuse a model's weights.
"""
from __future__ import annotations

from dsl import ast as A
from dsl.diagnostics import DlcError

from .lower import Frame, Program, SymDim, Tensor, _suggest
from .shapes import fmt_type
from .typecheck import dtype_of, input_shape

COUNT = "count"


def lower_generate(lw, name: str, options: dict | None = None) -> Program:
    """Lower the sampling program `name`; `options` sets its option parameters by name."""
    if name not in lw.generators:
        raise DlcError(f"unknown sampling program `{name}`", None,
                       _suggest(name, lw.generators) + [f"sampling programs: {', '.join(lw.generators) or 'none'}"])
    fn = lw.generators[name]
    n, *rest = fn.params
    options = dict(options or {})
    lw.g.name = name
    count = lw.g.input(COUNT, (n.name,), "i32", "data", loc=n.loc)
    frame = Frame({n.name: SymDim(n.name)}, {n.name: n.name}, "", "generate", None)
    inputs, kwargs = {COUNT: count}, []
    for p in rest:
        if isinstance(p.type, A.TensorType):
            inputs[p.name] = _input(lw, p)
            frame.vars[p.name] = Tensor(inputs[p.name])
        elif p.name in options:
            frame.vars[p.name] = options.pop(p.name)
        elif p.default is None:
            raise DlcError(f"option `{p.name}` of `{name}` needs a default value (or a full tensor type "
                           "such as i32[1, P] to make it an input)", p.loc)
        else:
            continue
        kwargs.append((p.name, A.Name(p.loc, p.name)))
    if options:
        raise DlcError(f"the sampling program `{name}` takes no option `{next(iter(options))}`", fn.loc,
                       [f"its parameters: {', '.join(p.name for p in fn.params)}"])
    prog = Program(lw.g, lw.params, inputs, lw.states, model=name)
    out = lw.call_def(fn, A.Call(fn.loc, name, fn.loc, (A.Name(n.loc, n.name),), tuple(kwargs)), frame)
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, Tensor) or not lw.g.shape(out.node) or lw.g.shape(out.node)[0] != n.name:
        got = fmt_type(lw.g.dtype(out.node), lw.g.shape(out.node)) if isinstance(out, Tensor) else lw._describe(out)
        raise DlcError(f"`{name}` must return a tensor of the {n.name} samples, [{n.name}, ...]; got {got}", fn.loc)
    lw.g.outputs["output"] = out.node
    return prog


def _input(lw, p: A.Param) -> int:
    """An input parameter of a sampling program: a full type, dimensions named or fixed."""
    if p.type.dtype is None:
        raise DlcError(f"input `{p.name}` needs a full type such as i32[1, P]", p.loc)
    shape = input_shape(p.type, "inputs of a sampling program")
    return lw.g.input(p.name, shape, dtype_of(lw, p.type.dtype, p.type.loc), "data", loc=p.loc)
