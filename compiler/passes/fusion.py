"""Pass `fusion`: group ops into kernels, reading each op's fusion kind from the registry.

Rules (TVM-style, driven only by `Op.kind`):
  * elementwise/broadcast ops fuse with producers of the same iteration shape;
  * a reduction absorbs an elementwise producer group of its input's shape (prologue);
  * a matmul or a reduction takes elementwise consumers of its output's shape (epilogue);
  * injective ops (reshape: a view, transpose: a copy) and opaque ops stand alone.
A fused value that is used outside its kernel is still written out (a kernel may have several
outputs); merging never creates a cycle between kernels.
"""
from __future__ import annotations

import networkx as nx

from ..ir import Group
from ..ops import OPS, Kind

_PATTERN = {Kind.ELEMENTWISE: "elementwise", Kind.BROADCAST: "elementwise", Kind.REDUCE: "reduce",
            Kind.OUT_ELEMENTWISE_FUSABLE: "anchored", Kind.OPAQUE: "opaque"}


def _pattern(g, n):
    if g.op(n) == "scan":
        return "scan"
    kind = OPS[g.op(n)].kind
    if kind == Kind.INJECTIVE:
        return "view" if g.op(n) == "reshape" else "opaque"
    return _PATTERN[kind]


class _Groups:
    def __init__(self, g):
        self.g = g
        self.of: dict[int, int] = {}
        self.members: dict[int, list[int]] = {}
        self.pattern: dict[int, str] = {}
        self.anchor: dict[int, int | None] = {}    # the reduce/matmul node of a group
        self.shape: dict[int, tuple] = {}           # elementwise iteration shape / epilogue shape
        self.prologue: dict[int, set] = {}          # nodes computed before the anchor
        self._next = 0

    def new(self, n):
        gid = self._next
        self._next += 1
        self.of[n] = gid
        self.members[gid] = [n]
        self.pattern[gid] = _pattern(self.g, n)
        self.anchor[gid] = n if self.pattern[gid] in ("reduce", "anchored") else None
        self.shape[gid] = self.g.shape(n)
        self.prologue[gid] = set()
        return gid

    def creates_cycle(self, nodes: set[int]) -> bool:
        """Can `nodes` not form one kernel? (A cycle through an outside node, or an op reading a
        value of the kernel at an index other than its own.)"""
        for n in nodes:     # an arg read at another index (a table row, a shifted slice) must be in memory
            if any(self.g.args(n)[i] in nodes for i in OPS[self.g.op(n)].remaps):
                return True
        desc = set()
        for n in nodes:
            desc |= nx.descendants(self.g.g, n)
        outside = desc - nodes
        return any(nodes & nx.descendants(self.g.g, x) for x in outside)

    def merge_into(self, target: int, others: list[int], n: int, as_prologue=False):
        for o in others:
            for m in self.members.pop(o):
                self.of[m] = target
                self.members[target].append(m)
                if as_prologue:
                    self.prologue[target].add(m)
            self.prologue[target] |= self.prologue.pop(o)
            del self.pattern[o], self.anchor[o], self.shape[o]
        if n is not None:
            self.of[n] = target
            self.members[target].append(n)


def _optimize_bodies(g, fuse: bool):
    """A scan's body is a graph of its own: run the same passes on it (bottom up)."""
    from . import EVAL_PIPELINE, Context, run_pipeline
    passes = [p if fuse else (no_fusion if p is fusion else p) for p in EVAL_PIPELINE]
    for n in g.topo():
        if g.op(n) == "scan":
            body = g.attrs(n)["body"].copy()
            g.attrs(n)["body"] = run_pipeline(body, passes, Context())


def fusion(g, ctx):
    _optimize_bodies(g, fuse=True)
    G = _Groups(g)
    for n in g.topo():
        op = g.op(n)
        if op in ("input", "const"):
            continue
        if op == "get":                       # a scan's results are written by the scan's kernel
            G.merge_into(G.of[g.args(n)[0]], [], n)
            continue
        pat = _pattern(g, n)
        srcs = sorted({G.of[a] for a in g.args(n) if a in G.of})
        if pat == "elementwise":
            same = [s for s in srcs if G.pattern[s] == "elementwise" and G.shape[s] == g.shape(n)]
            anchored = [s for s in srcs if G.pattern[s] in ("reduce", "anchored") and G.shape[s] == g.shape(n)
                        and not any(G.of.get(a) == s and a in G.prologue[s] for a in g.args(n))]
            target = None
            if anchored:
                for a in anchored:
                    nodes = set(G.members[a]) | {n} | {m for s in same for m in G.members[s]}
                    if not G.creates_cycle(nodes):
                        target = a
                        break
                if target is not None:
                    G.merge_into(target, same, n)
                    continue
            chosen = []
            for s in same:
                nodes = {n} | {m for c in chosen + [s] for m in G.members[c]}
                if not G.creates_cycle(nodes):
                    chosen.append(s)
            if chosen:
                G.merge_into(chosen[0], chosen[1:], n)
                continue
            G.new(n)
        elif pat == "reduce":
            x = g.args(n)[0]
            s = G.of.get(x)
            gid = G.new(n)
            if s is not None and G.pattern[s] == "elementwise" and G.shape[s] == g.shape(x):
                if not G.creates_cycle(set(G.members[s]) | {n}):
                    # the prologue group is absorbed by the reduction's group
                    G.members[gid].remove(n)
                    G.merge_into(gid, [s], None, as_prologue=True)
                    G.members[gid].append(n)
                    G.of[n] = gid
        else:
            G.new(n)
    g.groups = _finish(g, G)
    return g


def no_fusion(g, ctx):
    """Every op its own kernel (`--no-fuse`): the reference the fused program is tested against."""
    _optimize_bodies(g, fuse=False)
    G = _Groups(g)
    for n in g.topo():
        if g.op(n) == "get":
            G.merge_into(G.of[g.args(n)[0]], [], n)
        elif g.op(n) not in ("input", "const"):
            G.new(n)
    g.groups = _finish(g, G)
    return g


def _finish(g, G: _Groups) -> list[Group]:
    roots = set(g.live_roots())
    gdag = nx.DiGraph()
    gdag.add_nodes_from(G.members)
    for gid, mem in G.members.items():
        for m in mem:
            for a in g.args(m):
                if a in G.of and G.of[a] != gid:
                    gdag.add_edge(G.of[a], gid)
    order = list(nx.lexicographical_topological_sort(gdag))
    topo_pos = {n: k for k, n in enumerate(g.topo())}
    groups = []
    for i, gid in enumerate(order):
        nodes = sorted(G.members[gid], key=topo_pos.get)
        outs = [m for m in nodes if m in roots or any(G.of.get(c) != gid for c in g.consumers(m))]
        groups.append(Group(i, G.pattern[gid], nodes, outs, G.anchor[gid],
                            sorted(G.prologue[gid], key=topo_pos.get)))
    return groups
