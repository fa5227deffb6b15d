"""Pass `autodiff`: add the backward graph (d loss / d every parameter)."""
from ..autodiff import grad


def autodiff(g, ctx):
    loss = g.outputs["loss"]
    grads = grad(g, loss, list(ctx.params.values()))
    ctx.grads = grads
    for name, p in ctx.params.items():
        g.grad_of[name] = grads[p]
        if ctx.expose_grads:
            g.outputs[f"grad:{name}"] = grads[p]
    return g
