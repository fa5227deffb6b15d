"""Lowering a sampling program: `generate NAME(n) { ...; return samples }`.

The program has no data: its one input, `count` (i32[n], its values unused), carries the number
of samples `n` as a symbolic size, so one compiled program draws any number. The body is
lowered in evaluation mode like a model's (the caller makes the Lowerer with training = False):
the models it calls use the parameters they were trained with (`G/...`), batch norm its running
statistics, and its random draws (and those of every step of a `scan`) come from the seeded
stream. Its result must have n as its first axis: float samples are images, integer ones tokens.
"""
from __future__ import annotations

from dsl import ast as A
from dsl.diagnostics import DlcError

from .lower import Frame, Program, SymDim, Tensor, _suggest
from .shapes import fmt_type

COUNT = "count"


def lower_generate(lw, name: str) -> Program:
    if name not in lw.generators:
        raise DlcError(f"unknown sampling program `{name}`", None,
                       _suggest(name, lw.generators) + [f"sampling programs: {', '.join(lw.generators) or 'none'}"])
    fn = lw.generators[name]
    (n,) = fn.params
    lw.g.name = name
    count = lw.g.input(COUNT, (n.name,), "i32", "data", loc=n.loc)
    prog = Program(lw.g, lw.params, {COUNT: count}, lw.states, model=name)
    frame = Frame({n.name: SymDim(n.name)}, {n.name: n.name}, "", "generate", None)
    out = lw.call_def(fn, A.Call(fn.loc, name, fn.loc, (A.Name(n.loc, n.name),), ()), frame)
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, Tensor) or not lw.g.shape(out.node) or lw.g.shape(out.node)[0] != n.name:
        got = fmt_type(lw.g.dtype(out.node), lw.g.shape(out.node)) if isinstance(out, Tensor) else lw._describe(out)
        raise DlcError(f"`{name}` must return a tensor of the {n.name} samples, [{n.name}, ...]; got {got}", fn.loc)
    lw.g.outputs["output"] = out.node
    return prog
