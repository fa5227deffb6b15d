"""Pass `dce`: remove nodes that no output or state update depends on."""


def dce(g, ctx):
    live = set(g.live_roots())
    stack = list(live)
    while stack:                                    # everything the roots depend on, in one walk
        for a in g.g.predecessors(stack.pop()):
            if a not in live:
                live.add(a)
                stack.append(a)
    for n in list(g.g.nodes):
        if n not in live and g.op(n) != "input":
            g.remove(n)
    return g
