"""Pass `cse`: common-subexpression elimination (same op, same arguments, same attributes)."""


def _key(g, n):
    d = g[n]
    attrs = tuple(sorted((k, repr(v)) for k, v in d["attrs"].items()))
    return d["op"], d["args"], attrs, d["dtype"]


def cse(g, ctx):
    seen = {}
    for n in g.topo():
        if g.op(n) == "input":
            continue
        k = _key(g, n)
        if k in seen:
            g.replace_uses(n, seen[k])
            g.remove(n)
        else:
            seen[k] = n
    return g
