"""Optimizer updates as graph ops, so that the whole training step is one graph.

Each parameter's update (and its optimizer state: momentum buffers, moments) becomes nodes
whose results are written back after the step (`graph.updates`). Semantics follow
torch.optim: `weight_decay` adds `wd * p` to the gradient (L2), except for AdamW, which
decays the parameter directly. Run-time scalars (`lr`, Adam's bias corrections `c1`, `c2`)
are graph inputs, so a learning-rate schedule needs no recompilation.
"""
from __future__ import annotations

import fnmatch

from .lower import OptimizerSpec


def decays(spec: OptimizerSpec, name: str, shape: tuple) -> bool:
    """Which parameters weight decay applies to: by default weights (rank >= 2), not biases
    or normalization scales; `decay = "all"` or a list of name patterns chooses otherwise."""
    if not spec.weight_decay:
        return False
    if spec.decay == "all":
        return True
    if spec.decay == "weights":
        return len(shape) >= 2
    return any(fnmatch.fnmatchcase(name, pat) for pat in spec.decay)


def state_names(spec: OptimizerSpec) -> list[str]:
    if spec.name == "sgd":
        return ["momentum"] if spec.momentum else []
    if spec.name in ("adam", "adamw"):
        return ["m", "v"]
    if spec.name == "rmsprop":
        return ["v"]
    raise ValueError(spec.name)


def scalar_inputs(spec: OptimizerSpec) -> list[str]:
    return ["lr", "c1", "c2"] if spec.name in ("adam", "adamw") else ["lr"]


def build_update(g, spec: OptimizerSpec, params: dict[str, int], grads: dict[int, int]) -> None:
    """Add the update of every parameter in `params` (name -> input node) to `g`."""
    if not params:
        return
    dtype = g.dtype(next(iter(params.values())))
    with g.at(None, role="update"):
        scal = {s: g.input(s, (), dtype, "scalar") for s in scalar_inputs(spec)}
        for name, p in params.items():
            with g.at(g[p]["loc"], role="update"):
                _update_one(g, spec, name, p, grads[p], scal, dtype)


def _update_one(g, spec, name, p, gp, scal, dtype):
    c = lambda v: g.const(v, dtype)  # noqa: E731
    shape = g.shape(p)
    state = {s: g.input(f"{spec.name}.{s}/{name}", shape, dtype, "state", loc=g[p]["loc"])
             for s in state_names(spec)}
    lr = scal["lr"]
    if decays(spec, name, shape) and spec.name != "adamw":
        gp = g.add("add", gp, g.add("mul", c(spec.weight_decay), p))
    if spec.name == "sgd":
        step = gp
        if spec.momentum:
            buf = g.add("add", g.add("mul", c(spec.momentum), state["momentum"]), gp)
            g.updates[state["momentum"]] = buf
            step = g.add("add", gp, g.add("mul", c(spec.momentum), buf)) if spec.nesterov else buf
        new = g.add("sub", p, g.add("mul", lr, step))
    elif spec.name in ("adam", "adamw"):
        m = g.add("add", g.add("mul", c(spec.beta1), state["m"]), g.add("mul", c(1 - spec.beta1), gp))
        v = g.add("add", g.add("mul", c(spec.beta2), state["v"]), g.add("mul", c(1 - spec.beta2), g.add("mul", gp, gp)))
        g.updates[state["m"]], g.updates[state["v"]] = m, v
        denom = g.add("add", g.add("sqrt", g.add("mul", v, scal["c2"])), c(spec.eps))
        base = p
        if spec.name == "adamw" and decays(spec, name, shape):
            base = g.add("mul", p, g.add("sub", c(1.0), g.add("mul", lr, c(spec.weight_decay))))
        new = g.add("sub", base, g.add("div", g.add("mul", lr, g.add("mul", m, scal["c1"])), denom))
    elif spec.name == "rmsprop":
        v = g.add("add", g.add("mul", c(spec.alpha), state["v"]), g.add("mul", c(1 - spec.alpha), g.add("mul", gp, gp)))
        g.updates[state["v"]] = v
        new = g.add("sub", p, g.add("div", g.add("mul", lr, gp), g.add("add", g.add("sqrt", v), c(spec.eps))))
    else:  # pragma: no cover - lowering validates the name
        raise ValueError(spec.name)
    g.updates[p] = new


def bias_corrections(spec: OptimizerSpec, t: int) -> dict[str, float]:
    """Run-time scalars for step t (1-based)."""
    if spec.name in ("adam", "adamw"):
        return {"c1": 1.0 / (1.0 - spec.beta1 ** t), "c2": 1.0 / (1.0 - spec.beta2 ** t)}
    return {}
