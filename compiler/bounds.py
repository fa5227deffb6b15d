"""Which integer values may reach an index: the checks that keep kernels in bounds.

`take(table, ids)` reads `table[ids[...]]` and its gradient scatter-adds into `table[ids[...]]`;
the kernels do not check the index (a check per element would cost more than the gather).
So every way an index can reach a `take` is checked before a kernel runs:

* values computed in the graph (`argmax`, `sample` over C classes, integer constants) are
  checked at compile time against the table's rows;
* values from the data are checked when the data is loaded (and on `dlc predict --input`):
  `index_reads` traces each integer data input through the ops that only move values (reshape,
  transpose, slice, scan carries and sequences, ...) to the `take`s and `onehot`s that read it.

`onehot` never reads out of bounds, but a label at or beyond its depth silently counts as no
class: a 5-way head trained on 10 classes. The data check reports that too (negative labels are
padding and allowed).
"""
from __future__ import annotations

from dataclasses import dataclass

from dsl.diagnostics import DlcError, Loc

# ops whose integer output holds only values of the given argument positions
_MOVES = {"reshape": (0,), "transpose": (0,), "slice": (0,), "broadcast_to": (0,), "where": (1, 2)}


@dataclass(frozen=True)
class IndexRead:
    """Values of data input `input` are read as indices: valid ones are below `limit` (and,
    unless `negative_ok`, at least 0)."""
    input: str
    limit: int
    negative_ok: bool
    what: str           # "the embedding table `m/embedding_1/E` [20, 16] has 20 rows"
    loc: Loc | None


def _readers(g, n, parents):
    """(graph, node, arg position, parents) of every use of n's values, through scans."""
    out = []
    for c in g.consumers(n):
        for i, a in enumerate(g.args(c)):
            if a == n:
                out.append((g, c, i, parents))
    for name, o in g.outputs.items():     # a scan body's result: the next step's carry, the scan's results
        if o != n or not parents or name[0] not in "cy":
            continue
        outer, scan = parents[-1]
        k = int(name[1:])
        if name[0] == "c":
            out.append((g, g.inputs[k], None, parents))
        index = k if name[0] == "c" else outer.attrs(scan)["n_carry"] + k
        out.extend((outer, r, None, parents[:-1]) for r in outer.consumers(scan)
                   if outer.op(r) == "get" and outer.attrs(r)["index"] == index)
    return out


def _drops_negatives(g, where, n) -> bool:
    """`where(n >= 0, n, other)`: the stdlib's `unpad`, which keeps only n's values >= 0."""
    cond = g.args(where)[0]
    if g.op(cond) != "ge" or g.args(cond)[0] != n:
        return False
    zero = g.args(cond)[1]
    return g.op(zero) == "const" and g.attrs(zero)["value"] == 0


def _flow(g, start, parents=(), with_negatives=False):
    """Every (graph, take/onehot node, parents, nonneg) that reads values of `start`; `parents`
    are the (graph, scan node) pairs enclosing g, innermost last; `nonneg`: the path dropped
    the negative values (`unpad`)."""
    seen, found, todo = set(), [], [(g, start, parents, False)]
    while todo:
        g, n, parents, nonneg = todo.pop()
        if (id(g), n, nonneg) in seen:
            continue
        seen.add((id(g), n, nonneg))
        for g2, c, pos, par in _readers(g, n, parents):
            op = g2.op(c)
            if pos is None:                          # a body input or a get: the same values
                todo.append((g2, c, par, nonneg))
            elif op == "take" and pos == 1 or op == "onehot":
                found.append((g2, c, par, nonneg))
            elif op == "scan":
                todo.append((g2.attrs(c)["body"], g2.attrs(c)["body"].inputs[pos], par + ((g2, c),), nonneg))
            elif pos in _MOVES.get(op, ()) or (op == "cast" and g2.dtype(c) in ("i32", "i64")):
                todo.append((g2, c, par, nonneg or op == "where" and pos == 1 and _drops_negatives(g2, c, n)))
    return found if with_negatives else [f[:3] for f in found]


def _table(g, t, parents) -> str:
    """A readable name for a take's table: the parameter it is, seen through scan captures."""
    while g.op(t) == "input" and g.attrs(t)["kind"] != "param" and parents:
        outer, scan = parents[-1]
        t, g, parents = outer.args(scan)[g.inputs.index(t)], outer, parents[:-1]
    shape = "[" + ", ".join(map(str, g.shape(t))) + "]"
    if g.op(t) == "input" and g.attrs(t)["kind"] == "param":
        return f"the embedding table `{g[t]['name']}` {shape}"
    return f"the table {shape} of `take`"


def _limit(g, c, parents):
    if g.op(c) == "take":
        rows = g.shape(g.args(c)[0])[0]
        return rows, False, f"{_table(g, g.args(c)[0], parents)} has {rows} rows"
    depth = g.attrs(c)["depth"]
    return depth, True, f"the onehot of the loss here has {depth} classes"


def index_reads(graph) -> list[IndexRead]:
    """The index reads of each integer data input; raises a located error where a value the
    graph computes (argmax, sample, constants) can fall outside a table it indexes."""
    reads = []
    for n in graph.inputs:
        if graph.attrs(n)["kind"] == "data" and graph.dtype(n) in ("i32", "i64"):
            for g, c, parents, nonneg in _flow(graph, n, with_negatives=True):
                limit, neg, what = _limit(g, c, parents)
                if isinstance(limit, int):
                    reads.append(IndexRead(graph[n]["name"], limit, neg or nonneg, what, g[c]["loc"]))
    _check_computed(graph, ())
    return reads


def _check_computed(graph, parents):
    """Ids the graph computes itself: argmax and sample over C classes (0 to C - 1), integer
    constants (a decoder's first token)."""
    for n in graph.topo():
        op = graph.op(n)
        if op == "scan":
            _check_computed(graph.attrs(n)["body"], parents + ((graph, n),))
        if op in ("argmax", "sample"):
            classes = graph.shape(graph.args(n)[0])[-1]
            if not isinstance(classes, int):
                continue
            lo, hi, why = 0, classes - 1, f"come from {op} over {classes} classes"
        elif op == "const" and graph.dtype(n) in ("i32", "i64"):
            lo = hi = int(graph.attrs(n)["value"])
            why = f"include the constant {lo}"
        else:
            continue
        for g, c, par in _flow(graph, n, parents):
            if g.op(c) != "take":
                continue
            rows = g.shape(g.args(c)[0])[0]
            if hi >= rows or lo < 0:
                notes = [f"the {op} is at {graph[n]['loc']}"] if graph[n]["loc"] and op != "const" else []
                raise DlcError(f"{_table(g, g.args(c)[0], par)} has {rows} rows (ids 0 to {rows - 1}), but the ids "
                               f"it is indexed with {why}", g[c]["loc"], notes)
