"""Pass `dce`: remove nodes that no output or state update depends on."""
import networkx as nx


def dce(g, ctx):
    live = set()
    for r in g.live_roots():
        live |= nx.ancestors(g.g, r) | {r}
    for n in list(g.g.nodes):
        if n not in live and g.op(n) != "input":
            g.remove(n)
    return g
