"""The graph IR: a `networkx.DiGraph` of primitive ops.

Each node holds: `op` (a name in the op registry), `args` (ordered input node ids; the graph's
edges mirror them), `attrs` (a dict of static attributes), the inferred `shape` and `dtype`,
the `.dl` location `loc` it came from, an optional `name` (inputs and parameters) and a `role`
("forward", "grad", "update").

A graph has ordered `inputs` (op "input", with a `kind`: data, param, state or scalar), named
`outputs`, and `updates`: state inputs (parameters, optimizer moments) and the node holding
their value after the step. After the fusion pass it also carries `groups`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import networkx as nx

from dsl.diagnostics import DlcError, Loc

from .shapes import ShapeError, fmt_type


@dataclass
class Group:
    """A fused kernel: ops in execution order, the ones it materializes, and its pattern."""

    id: int
    pattern: str                    # elementwise | reduce | matmul | opaque | view
    nodes: list[int]
    outputs: list[int] = field(default_factory=list)   # values written to memory
    anchor: int | None = None                           # the reduce/matmul node, if any
    prologue: list[int] = field(default_factory=list)   # ops run in the anchor's input loop
    tail: int | None = None                             # a row-wise op (softmax) run last, in place

    def label(self, g) -> str:
        """`matmul`/`conv2d` for an anchored kernel, else its pattern."""
        return g.op(self.anchor) if self.pattern == "anchored" else self.pattern


class Graph:
    def __init__(self, name: str = "graph"):
        self.name = name
        self.g = nx.DiGraph()
        self.inputs: list[int] = []
        self.outputs: dict[str, int] = {}
        self.updates: dict[int, int] = {}
        self.groups: list[Group] | None = None
        self.grad_of: dict[str, int] = {}   # param name -> node holding d loss / d param
        self._next = 0
        self._loc: Loc | None = None
        self._role = "forward"

    # ---- construction ------------------------------------------------------------------------
    @contextlib.contextmanager
    def at(self, loc: Loc | None, role: str | None = None):
        """Nodes added inside take this location (and role) unless given their own."""
        old = self._loc, self._role
        self._loc = loc if loc is not None else self._loc
        self._role = role or self._role
        try:
            yield
        finally:
            self._loc, self._role = old

    def add(self, op: str, *args: int, loc: Loc | None = None, name: str | None = None, **attrs) -> int:
        from .ops import OPS
        spec = OPS[op]
        loc = loc if loc is not None else self._loc
        try:
            if spec.canon is not None:
                attrs = spec.canon([self.shape(a) for a in args], attrs)
            shape, dtype = spec.infer([self.shape(a) for a in args], [self.dtype(a) for a in args], attrs)
        except ShapeError as e:
            raise DlcError(f"{spec.user_name}: {e}", loc) from None
        n = self._next
        self._next += 1
        self.g.add_node(n, op=op, args=tuple(args), attrs=attrs, shape=tuple(shape), dtype=dtype,
                        loc=loc, name=name, role=self._role)
        for a in args:
            self.g.add_edge(a, n)
        return n

    def input(self, name: str, shape, dtype: str, kind: str, loc: Loc | None = None) -> int:
        n = self.add("input", loc=loc, name=name, shape=tuple(shape), dtype=dtype, kind=kind)
        self.inputs.append(n)
        return n

    def const(self, value, dtype: str) -> int:
        return self.add("const", value=float(value) if dtype in ("f32", "f64") else int(value), dtype=dtype)

    # ---- queries -----------------------------------------------------------------------------
    def __getitem__(self, n: int) -> dict:
        return self.g.nodes[n]

    def __contains__(self, n: int) -> bool:
        return n in self.g

    def op(self, n: int) -> str:
        return self.g.nodes[n]["op"]

    def args(self, n: int) -> tuple[int, ...]:
        return self.g.nodes[n]["args"]

    def attrs(self, n: int) -> dict:
        return self.g.nodes[n]["attrs"]

    def shape(self, n: int) -> tuple:
        return self.g.nodes[n]["shape"]

    def dtype(self, n: int) -> str:
        return self.g.nodes[n]["dtype"]

    def consumers(self, n: int) -> list[int]:
        return sorted(self.g.successors(n))

    def nodes(self) -> list[int]:
        return list(self.g.nodes)

    def topo(self) -> list[int]:
        return list(nx.lexicographical_topological_sort(self.g))

    def live_roots(self) -> list[int]:
        return list(self.outputs.values()) + list(self.updates.values())

    def input_by_name(self, name: str) -> int | None:
        for n in self.inputs:
            if self[n]["name"] == name:
                return n
        return None

    def inputs_of_kind(self, kind: str) -> list[int]:
        return [n for n in self.inputs if self.attrs(n)["kind"] == kind]

    # ---- rewriting ---------------------------------------------------------------------------
    def set_args(self, n: int, args) -> None:
        """Give node n these arguments (of the same types as its old ones)."""
        old = self.g.nodes[n]["args"]
        self.g.nodes[n]["args"] = tuple(args)
        for a in set(old) - set(args):
            self.g.remove_edge(a, n)
        for a in set(args):
            self.g.add_edge(a, n)

    def replace_uses(self, old: int, new: int) -> None:
        """Make every consumer of `old` (and outputs, updates) use `new` instead."""
        for c in list(self.g.successors(old)):
            d = self.g.nodes[c]
            d["args"] = tuple(new if a == old else a for a in d["args"])
            self.g.remove_edge(old, c)
            self.g.add_edge(new, c)
        for k, v in self.outputs.items():
            if v == old:
                self.outputs[k] = new
        for k, v in self.updates.items():
            if v == old:
                self.updates[k] = new
        for k, v in self.grad_of.items():
            if v == old:
                self.grad_of[k] = new

    def remove(self, n: int) -> None:
        self.g.remove_node(n)

    # ---- checking ----------------------------------------------------------------------------
    def verify(self) -> None:
        """Structural and type invariants. Raises AssertionError naming the broken node."""
        from .ops import OPS
        if not nx.is_directed_acyclic_graph(self.g):
            raise AssertionError("graph has a cycle")
        for n in self.g.nodes:
            d = self.g.nodes[n]
            if d["op"] not in OPS:
                raise AssertionError(f"node %{n}: unknown op {d['op']!r}")
            for a in d["args"]:
                if a not in self.g or not self.g.has_edge(a, n):
                    raise AssertionError(f"node %{n} ({d['op']}): argument %{a} missing or not linked")
            if set(self.g.predecessors(n)) != set(d["args"]):
                raise AssertionError(f"node %{n} ({d['op']}): edges do not match its arguments")
            try:
                shape, dtype = OPS[d["op"]].infer([self.shape(a) for a in d["args"]],
                                                  [self.dtype(a) for a in d["args"]], d["attrs"])
            except ShapeError as e:
                raise AssertionError(f"node %{n} ({d['op']}): {e}") from None
            if tuple(shape) != d["shape"] or dtype != d["dtype"]:
                raise AssertionError(f"node %{n} ({d['op']}): stored type {fmt_type(d['dtype'], d['shape'])}"
                                     f" but its rule gives {fmt_type(dtype, shape)}")
        for n in self.inputs:
            if n not in self.g or self.op(n) != "input":
                raise AssertionError(f"input %{n} is not an input node")
        for k, v in list(self.outputs.items()) + [(self[k]["name"], v) for k, v in self.updates.items()]:
            if v not in self.g:
                raise AssertionError(f"output {k!r} refers to a removed node %{v}")
        for s, v in self.updates.items():
            if self.shape(s) != self.shape(v) or self.dtype(s) != self.dtype(v):
                raise AssertionError(f"update of {self[s]['name']!r} changes its type")
        if self.groups is not None:
            seen: dict[int, int] = {}
            for grp in self.groups:
                for n in grp.nodes:
                    if n in seen:
                        raise AssertionError(f"node %{n} is in kernels {seen[n]} and {grp.id}")
                    seen[n] = grp.id
            missing = [n for n in self.g.nodes if n not in seen and self.op(n) not in ("input", "const")]
            if missing:
                raise AssertionError(f"nodes {missing} belong to no kernel")

    # ---- copying -----------------------------------------------------------------------------
    def copy(self) -> "Graph":
        new = Graph(self.name)
        new.g = self.g.copy()
        for n in new.g.nodes:
            new.g.nodes[n]["attrs"] = dict(new.g.nodes[n]["attrs"])
        new.inputs = list(self.inputs)
        new.outputs = dict(self.outputs)
        new.updates = dict(self.updates)
        new.grad_of = dict(self.grad_of)
        new.groups = None if self.groups is None else [
            Group(g.id, g.pattern, list(g.nodes), list(g.outputs), g.anchor, list(g.prologue), g.tail)
            for g in self.groups]
        new._next = self._next
        return new
