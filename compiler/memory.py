"""Memory planning: kernel order, one buffer per value written, buffer reuse, in-place updates.

* Values a kernel writes get buffers; a buffer whose last reader has run is reused by a later
  value of the same shape and dtype.
* A reshape is a view of its source's buffer.
* A state update (parameter, optimizer moment) computed by an elementwise kernel is written
  straight into the state's own array, after every other reader of that array has run;
  otherwise it is copied back at the end of the step.
* Buffers that hold a program output leave the step (`escaping`): they are allocated on every
  call. The others are scratch, dead when the step returns: a step may keep them across calls
  (an arena per set of dimensions) instead of allocating them again. Fresh megabyte buffers
  cost a page fault per 4 KiB on first touch (glibc serves them with mmap and unmaps them on
  free): in the GPT training step that was a third of the step's time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx


@dataclass
class Plan:
    order: list                                   # groups in execution order
    storage: dict[int, str] = field(default_factory=dict)   # node -> buffer / argument name
    allocs: dict[int, list] = field(default_factory=dict)   # group id -> [(name, shape, dtype)]
    views: dict[int, int] = field(default_factory=dict)     # reshape node -> source node
    inplace: dict[int, int] = field(default_factory=dict)   # update value -> state input
    copies: list = field(default_factory=list)              # (state input, value) copied at the end
    n_buffers: int = 0
    escaping: set = field(default_factory=set)              # buffers holding a program output


def plan(g) -> Plan:
    groups = {grp.id: grp for grp in g.groups}
    group_of = {n: grp.id for grp in g.groups for n in grp.nodes}
    dag = nx.DiGraph()
    dag.add_nodes_from(groups)
    for grp in g.groups:
        for n in grp.nodes:
            for a in g.args(n):
                if a in group_of and group_of[a] != grp.id:
                    dag.add_edge(group_of[a], grp.id)
    arg_name = {n: f"a{i}" for i, n in enumerate(g.inputs)}
    p = Plan(order=[])
    # in-place state updates, ordered after every other reader of the state
    for s, v in g.updates.items():
        gid = group_of.get(v)
        grp = groups.get(gid)
        epilogue = grp is not None and v != grp.anchor and v not in grp.prologue
        if not epilogue or grp.pattern not in ("elementwise", "anchored", "reduce") or g.shape(v) != g.shape(s):
            p.copies.append((s, v))
            continue
        readers = {group_of[c] for c in g.consumers(s) if c in group_of and group_of[c] != gid}
        # ordering gid after the readers makes a cycle iff gid already runs before one of them
        # (an update usually ends the step: few kernels follow it)
        if readers & nx.descendants(dag, gid):
            p.copies.append((s, v))
        else:
            dag.add_edges_from((r, gid) for r in readers)
            p.inplace[v] = s
    order = list(nx.lexicographical_topological_sort(dag))
    p.order = [groups[i] for i in order]
    pos = {gid: k for k, gid in enumerate(order)}
    # liveness: the last kernel reading each value (outputs and copies live to the end)
    end = len(order)
    pinned = set(g.outputs.values()) | {v for _, v in p.copies}
    last: dict[int, int] = {}
    for grp in p.order:
        for n in grp.nodes:
            for a in g.args(n):
                if a in group_of and group_of[a] != grp.id:
                    last[a] = max(last.get(a, -1), pos[grp.id])
    for n in pinned:
        last[n] = end

    def root(n):
        while n in p.views:
            n = p.views[n]
        return n

    for grp in p.order:                    # views extend their source's life
        if grp.pattern == "view":
            n = grp.nodes[0]
            p.views[n] = g.args(n)[0]
    for n, src in p.views.items():
        r = root(n)
        last[r] = max(last.get(r, -1), last.get(n, -1))
    free: dict[tuple, list[str]] = {}
    releases: dict[int, list[tuple]] = {}
    for grp in p.order:
        k = pos[grp.id]
        allocs = []
        for n in grp.outputs:
            if n in p.views:
                continue
            if n in p.inplace:
                p.storage[n] = arg_name[p.inplace[n]]
                continue
            key = (g.shape(n), g.dtype(n))
            if free.get(key):
                name = free[key].pop()
            else:
                name = f"b{p.n_buffers}"
                p.n_buffers += 1
                allocs.append((name, g.shape(n), g.dtype(n)))
            p.storage[n] = name
            releases.setdefault(last.get(n, k), []).append((key, name))
        p.allocs[grp.id] = allocs
        for key, name in releases.pop(k, []):
            free.setdefault(key, []).append(name)
    for n in g.inputs:
        p.storage[n] = arg_name[n]
    p.escaping = {p.storage.get(root(v)) for v in g.outputs.values()} - set(arg_name.values()) - {None}
    for n in p.views:
        p.storage[n] = None   # views are named in the step function
    return p
