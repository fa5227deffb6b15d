"""The AST: frozen dataclasses, every node with its source location (`loc`)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Union

from .diagnostics import Loc


@dataclass(frozen=True)
class Node:
    loc: Loc

    def dump(self, indent: int = 0) -> str:
        """Readable tree, one node per line, with line:col."""
        pad = "  " * indent
        scalars, children = [], []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "loc" or isinstance(v, Loc):       # positions (func_loc, model_loc): not content
                continue
            if isinstance(v, Node):
                children.append((f.name, [v]))
            elif isinstance(v, tuple) and v and all(isinstance(c, Node) for c in v):
                children.append((f.name, list(v)))
            elif isinstance(v, tuple) and v and all(isinstance(c, tuple) for c in v):
                # keyword arguments: (name, expr) pairs
                children.append((f.name, [c[1] for c in v]))
                scalars.append(f"{f.name}_names={[c[0] for c in v]}")
            elif v is not None and v != ():
                scalars.append(f"{f.name}={v!r}")
        line = f"{pad}{type(self).__name__}({', '.join(scalars)})  @{self.loc.line}:{self.loc.col}"
        out = [line]
        for name, kids in children:
            for k in kids:
                out.append(k.dump(indent + 1))
        return "\n".join(out)


# ---- types -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DimName(Node):
    name: str


@dataclass(frozen=True)
class DimInt(Node):
    value: int


@dataclass(frozen=True)
class DimEllipsis(Node):
    pass


@dataclass(frozen=True)
class DimBin(Node):
    op: str
    left: "Dim"
    right: "Dim"


Dim = Union[DimName, DimInt, DimEllipsis, DimBin]


@dataclass(frozen=True)
class TensorType(Node):
    dtype: str | None          # None: any dtype (`[I, O]`)
    dims: tuple                # tuple[Dim, ...]


@dataclass(frozen=True)
class ScalarType(Node):
    name: str                  # int, float, bool, str


# ---- expressions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Name(Node):
    name: str


@dataclass(frozen=True)
class Number(Node):
    value: float | int
    text: str


@dataclass(frozen=True)
class String(Node):
    value: str


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class List(Node):
    items: tuple


@dataclass(frozen=True)
class BinOp(Node):
    op: str                    # + - * / // @ ** == != < <= > >= and or
    left: Node
    right: Node


@dataclass(frozen=True)
class Neg(Node):
    operand: Node


@dataclass(frozen=True)
class Not(Node):
    operand: Node


@dataclass(frozen=True)
class SliceItem(Node):
    """`start:stop` inside `x[...]`; either bound may be omitted (None)."""
    start: Node | None
    stop: Node | None


@dataclass(frozen=True)
class EllipsisItem(Node):
    """`...` inside `x[...]`: as many full slices as the rank needs."""


@dataclass(frozen=True)
class Index(Node):
    """`value[items]`: each item an expression (an index, dropping its axis), a `SliceItem`
    or an `EllipsisItem`."""
    value: Node
    items: tuple


@dataclass(frozen=True)
class Call(Node):
    func: str
    func_loc: Loc
    args: tuple
    kwargs: tuple              # tuple[(name, expr), ...]


# ---- statements and items ------------------------------------------------------------------
@dataclass(frozen=True)
class Assign(Node):
    name: str
    value: Node


@dataclass(frozen=True)
class ParamDecl(Node):
    name: str
    type: TensorType
    init: Node | None


@dataclass(frozen=True)
class StateDecl(Node):
    """A non-trainable tensor kept across steps (running statistics), saved in checkpoints."""
    name: str
    type: TensorType
    init: Node | None


@dataclass(frozen=True)
class Update(Node):
    """`name <- value`: the state's value after a training step."""
    name: str
    value: Node


@dataclass(frozen=True)
class If(Node):
    """A compile-time conditional (e.g. on `training`)."""
    cond: Node
    then: tuple
    orelse: tuple


@dataclass(frozen=True)
class MultiAssign(Node):
    names: tuple
    value: Node


@dataclass(frozen=True)
class Scan(Node):
    """A recurrence: per-step inputs `ins` ((name, seq) pairs), carried state `carries`
    ((name, init) pairs) and a body that `yield`s the per-step outputs bound to `targets`."""
    targets: tuple
    ins: tuple
    carries: tuple
    body: tuple


@dataclass(frozen=True)
class Yield(Node):
    values: tuple


@dataclass(frozen=True)
class Return(Node):
    values: tuple


@dataclass(frozen=True)
class Param(Node):
    name: str
    type: Node | None
    default: Node | None


@dataclass(frozen=True)
class FuncDef(Node):
    kind: str                  # "def", "model" or "generate" (a sampling program)
    name: str
    params: tuple
    ret: Node | None
    body: tuple


@dataclass(frozen=True)
class Phase(Node):
    """`phase NAME { loss = ...; params = [...]; optimizer = ...; steps = k }` in a train block."""
    name: str
    body: tuple


@dataclass(frozen=True)
class TrainDef(Node):
    model: str
    data: Node
    body: tuple
    model_loc: Loc | None = None        # where the model's name is written


@dataclass(frozen=True)
class Import(Node):
    path: str


@dataclass(frozen=True)
class Module(Node):
    items: tuple
