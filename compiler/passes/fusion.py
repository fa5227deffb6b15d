"""Pass `fusion`: group ops into kernels, reading each op's fusion kind from the registry.

Rules (TVM-style, driven only by `Op.kind`):
  * elementwise/broadcast ops fuse with producers of the same iteration shape;
  * a reduction absorbs an elementwise producer group of its input's shape (prologue);
  * a matmul or a reduction takes elementwise consumers of its output's shape (epilogue);
  * a row-wise op (softmax) ends the elementwise or matmul kernel that computes its input,
    when nothing else reads that input: the kernel writes the input into the op's output
    buffer and the op runs in place on its rows (scale, mask and softmax: one [B, h, T, T]);
  * injective ops (reshape: a view, transpose: a copy) and other opaque ops stand alone;
  * a forward value recomputed for the gradient (pass `remat`) joins no forward kernel.
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
    """Kernels being formed, in one pass over the nodes in topological order.

    Legality of a merge is decided on the graph of *kernels*, not of nodes: a path may enter a
    kernel at one member and leave it from another that does not depend on the first (the
    kernel is one unit of execution, so the path runs through it all the same). Each kernel
    keeps the set of kernels it depends on, transitively, as a bitset over kernel ids (`anc`),
    and its direct producers (`preds`). A kernel id that was merged away stays a bit of its
    survivor's `ids`, so an ancestor set never needs rewriting when two ancestors merge.

    Merging kernels M (all of them producers of the node being placed, or that node's kernel)
    creates a cycle exactly when some producer P of M, outside M, depends on M: the path
    M -> ... -> P -> M leaves and re-enters the merged kernel. That is one AND per producer.
    After a merge, the kernels downstream of it inherit its ancestors; the propagation stops
    at a kernel that already has them all (then so do the kernels below it).
    `work` counts the kernels visited by checks and propagation (the test of linear scaling).
    """

    def __init__(self, g):
        self.g = g
        self.of: dict[int, int] = {}
        self.members: dict[int, list[int]] = {}
        self.pattern: dict[int, str] = {}
        self.anchor: dict[int, int | None] = {}    # the reduce/matmul node of a group
        self.shape: dict[int, tuple] = {}           # elementwise iteration shape / epilogue shape
        self.prologue: dict[int, set] = {}          # nodes computed before the anchor
        self.tail: dict[int, int | None] = {}       # a row-wise op ending the kernel: nothing joins after it
        self.ids: dict[int, int] = {}               # bitset: this group's id and those merged into it
        self.anc: dict[int, int] = {}               # bitset: (ids of) every group this one depends on
        self.preds: dict[int, set[int]] = {}        # direct producer groups (ids, maybe merged away)
        self.succs: dict[int, set[int]] = {}        # direct consumer groups (ids, maybe merged away)
        self.remapped: dict[int, set[int]] = {}     # nodes its members read at a remapped index
        self.grad: dict[int, bool] = {}             # holds a gradient op (role "grad")
        self.remat: dict[int, bool] = {}            # holds a forward value recomputed (pass `remat`)
        self.alias: dict[int, int] = {}             # merged-away id -> the id it was merged into
        self.work = 0
        self._next = 0

    def find(self, gid: int) -> int:
        root = gid
        while root in self.alias:
            root = self.alias[root]
        while gid != root:                          # path compression
            self.alias[gid], gid = root, self.alias[gid]
        return root

    def new(self, n):
        gid = self._next
        self._next += 1
        self.of[n] = gid
        self.members[gid] = [n]
        self.pattern[gid] = _pattern(self.g, n)
        self.anchor[gid] = n if self.pattern[gid] in ("reduce", "anchored") else None
        self.shape[gid] = self.g.shape(n)
        self.prologue[gid] = set()
        self.tail[gid] = None
        self.ids[gid] = 1 << gid
        self.anc[gid] = 0
        self.preds[gid] = set()
        self.succs[gid] = set()
        self.remapped[gid] = set()
        self.grad[gid] = self.g[n].get("role") == "grad"
        self.remat[gid] = bool(self.g[n].get("remat"))
        self._link(gid, n)
        return gid

    def _link(self, gid: int, n: int) -> None:
        """Record the edges from n's producers into group gid (n is now one of its members)."""
        g = self.g
        remaps = OPS[g.op(n)].remaps
        for i, a in enumerate(g.args(n)):
            if i in remaps:
                self.remapped[gid].add(a)
            p = self.of.get(a)
            if p is None or p == gid:
                continue
            self.preds[gid].add(p)
            self.succs[p].add(gid)
            self.anc[gid] |= self.anc[p] | self.ids[p]

    def _producers(self, gids: set[int], n: int | None) -> set[int]:
        out = {self.find(p) for gid in gids for p in self.preds[gid]}
        if n is not None:
            out |= {self.of[a] for a in self.g.args(n) if a in self.of}
        return out - gids

    def creates_cycle(self, gids, n: int | None = None) -> bool:
        """Can groups `gids` (plus node n, not yet placed, whose producers are all placed) not
        form one kernel? Either a path between them runs through another kernel, or an op reads
        a value of the kernel at an index other than its own (a table row, a shifted slice: that
        value must be in memory first)."""
        gids = set(gids)
        ids = 0
        for gid in gids:
            ids |= self.ids[gid]
        remapped = set().union(*(self.remapped[gid] for gid in gids))
        if n is not None:
            remapped |= {self.g.args(n)[i] for i in OPS[self.g.op(n)].remaps}
        if any(self.of.get(a) in gids for a in remapped):
            return True
        prods = self._producers(gids, n)
        self.work += len(prods)
        return any(self.anc[p] & ids for p in prods)

    def merge_into(self, target: int, others: list[int], n: int, as_prologue=False):
        for o in others:
            for m in self.members.pop(o):
                self.of[m] = target
                self.members[target].append(m)
                if as_prologue:
                    self.prologue[target].add(m)
            self.prologue[target] |= self.prologue.pop(o)
            self.ids[target] |= self.ids.pop(o)
            self.anc[target] |= self.anc.pop(o)
            self.preds[target] |= self.preds.pop(o)
            self.succs[target] |= self.succs.pop(o)
            self.remapped[target] |= self.remapped.pop(o)
            self.grad[target] |= self.grad.pop(o)
            self.remat[target] |= self.remat.pop(o)
            self.alias[o] = target
            del self.pattern[o], self.anchor[o], self.shape[o], self.tail[o]
        if n is not None:
            self.of[n] = target
            self.members[target].append(n)
            self.grad[target] |= self.g[n].get("role") == "grad"
            self.remat[target] |= bool(self.g[n].get("remat"))
            self._link(target, n)
        mine = self.ids[target]
        self.anc[target] &= ~mine
        self.preds[target] = {p for p in map(self.find, self.preds[target]) if p != target}
        self.succs[target] = {s for s in map(self.find, self.succs[target]) if s != target}
        self._propagate(target)

    def _propagate(self, gid: int) -> None:
        """Kernels downstream of gid depend on everything gid now depends on. (They already
        hold one of gid's `ids`, which now stands for all of them.)"""
        need = self.anc[gid]
        stack = list(self.succs[gid])
        while stack:
            s = self.find(stack.pop())
            self.work += 1
            if self.anc[s] | need == self.anc[s]:
                continue
            self.anc[s] |= need
            stack.extend(self.succs[s])


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
    g.groups = _finish(g, partition(g))
    return g


def _tail_of(G: _Groups, g, n, roots) -> int | None:
    """The kernel that row-wise op n can end: the elementwise or matmul kernel computing its
    input x over x's whole shape, when n is x's only reader (x is then never stored)."""
    x = g.args(n)[0]
    s = G.of.get(x)
    if s is None or G.pattern[s] not in ("elementwise", "anchored") or G.tail[s] is not None:
        return None
    if G.shape[s] != g.shape(x) or g.dtype(x) != g.dtype(n) or x in roots or list(g.consumers(x)) != [n]:
        return None
    return None if G.creates_cycle({s}, n) else s


def partition(g) -> _Groups:
    """The fusion decisions: nodes (in topological order) into kernels."""
    G = _Groups(g)
    roots = set(g.live_roots())
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
            srcs = [s for s in srcs if G.tail[s] is None]     # a row-wise op ends its kernel
            if g[n].get("remat"):              # a recomputed forward value: kept out of forward
                srcs = [s for s in srcs if G.remat[s]]      # kernels, for the gradient reading it
            elif any(G.remat[s] for s in srcs):
                srcs = [s for s in srcs if G.grad[s]]
            same = [s for s in srcs if G.pattern[s] == "elementwise" and G.shape[s] == g.shape(n)]
            anchored = [s for s in srcs if G.pattern[s] in ("reduce", "anchored") and G.shape[s] == g.shape(n)
                        and not any(G.of.get(a) == s and a in G.prologue[s] for a in g.args(n))]
            target = None
            if anchored:
                for a in anchored:
                    # an epilogue runs after its anchor: a group that feeds the anchor (the
                    # matmul's own input, say) cannot join it, and n reads it from memory
                    epilogue = [s for s in same if not G.anc[a] & G.ids[s]]
                    if not G.creates_cycle({a, *epilogue}, n):
                        target = a
                        break
                if target is not None:
                    G.merge_into(target, epilogue, n)
                    continue
            chosen = []
            for s in same:
                if not G.creates_cycle({*chosen, s}, n):
                    chosen.append(s)
            if chosen:
                G.merge_into(chosen[0], chosen[1:], n)
                continue
            G.new(n)
        elif pat == "reduce":
            x = g.args(n)[0]
            s = G.of.get(x)
            gid = G.new(n)
            if s is not None and G.pattern[s] == "elementwise" and G.tail[s] is None and G.shape[s] == g.shape(x):
                if not G.creates_cycle({s, gid}):
                    # the prologue group is absorbed by the reduction's group
                    G.members[gid].remove(n)
                    G.merge_into(gid, [s], None, as_prologue=True)
                    G.members[gid].append(n)
                    G.of[n] = gid
        elif OPS[op].rowwise and (s := _tail_of(G, g, n, roots)) is not None:
            G.merge_into(s, [], n)
            G.tail[s] = n
        else:
            G.new(n)
    return G


def split_tails(g):
    """The same kernels with every row-wise tail (a softmax ending the kernel that computes its
    input) run as a kernel of its own, its input stored: for a target that renders no tails
    (CUDA runs a softmax one block per row). Returns a copy; scan bodies are split too."""
    if not g.groups or not any(grp.tail is not None for grp in g.groups) and not any(
            g.op(n) == "scan" for n in g.nodes()):
        return g
    g = g.copy()
    for n in g.nodes():
        if g.op(n) == "scan":
            g.attrs(n)["body"] = split_tails(g.attrs(n)["body"])
    groups = []
    for grp in g.groups:
        t = grp.tail
        if t is None:
            groups.append(grp)
            continue
        x = g.args(t)[0]
        grp.nodes = [m for m in grp.nodes if m != t]
        grp.outputs = [m if m != t else x for m in grp.outputs]
        grp.tail = None
        groups += [grp, Group(0, _pattern(g, t), [t], [t])]
    for i, grp in enumerate(groups):
        grp.id = i
    g.groups = groups
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
                            sorted(G.prologue[gid], key=topo_pos.get), G.tail[gid]))
    return groups
