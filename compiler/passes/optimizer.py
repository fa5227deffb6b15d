"""Pass `optimizer`: append the optimizer's parameter update to the step graph."""
from ..optim import build_update


def optimizer(g, ctx):
    if ctx.optimizer is not None:
        build_update(g, ctx.optimizer, ctx.params, ctx.grads, ctx.phase)
    return g
