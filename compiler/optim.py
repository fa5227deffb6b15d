"""Optimizers: a registry of update rules written as graph ops, so a training step is one graph.

Each entry names its options and their defaults, the state it keeps per parameter (momentum
buffers, moments), the run-time scalars it reads (`lr`; Adam's bias corrections `c1`, `c2`) and
its update rule, which adds nodes computing a parameter's new value and its new state; those are
written back after the step (`graph.updates`). Semantics follow torch.optim: `weight_decay` adds
`wd * p` to the gradient (L2), except for entries with decoupled decay (AdamW), which shrink the
parameter itself. Run-time scalars are graph inputs, so a learning-rate schedule needs no
recompilation.

A `.dl` file picks an entry with `adam(lr = 1e-3, ...)`: an `OptimizerSpec`. Training phases
each carry their own spec; their optimizer state is named per phase (`phase:adam.m/param`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

_COMMON = {"weight_decay": 0.0, "decay": "weights"}


@dataclass(frozen=True)
class Optimizer:
    name: str
    defaults: dict                        # option -> default (lr included)
    slots: Callable                       # spec -> names of the per-parameter state tensors
    update: Callable                      # (Update, spec) -> the parameter's new value (a node)
    scalars: tuple = ("lr",)              # run-time scalar inputs of the step
    step_scalars: Callable | None = None  # (spec, t) -> values of the scalars other than lr at step t
    decoupled_decay: bool = False         # weight decay shrinks p instead of adding to the gradient


OPTIMIZERS: dict[str, Optimizer] = {}


def register(opt: Optimizer) -> Optimizer:
    assert opt.name not in OPTIMIZERS, opt.name
    OPTIMIZERS[opt.name] = opt
    return opt


class OptimizerSpec:
    """An optimizer as a `.dl` file chooses it: a registry entry and its options, defaults filled
    in. Options read as attributes: `spec.lr`, `spec.beta1`."""

    __slots__ = ("name", "options")

    def __init__(self, name: str, lr: float | None = None, **options):
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; optimizers: {', '.join(OPTIMIZERS)}")
        opts = dict(OPTIMIZERS[name].defaults)
        unknown = set(options) - set(opts)
        if unknown:
            raise TypeError(f"optimizer {name!r} has no option {', '.join(sorted(unknown))}")
        opts.update(options)
        if lr is not None:
            opts["lr"] = lr
        if isinstance(opts["decay"], list):
            opts["decay"] = tuple(opts["decay"])
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", opts)

    def __getattr__(self, key):
        try:
            return object.__getattribute__(self, "options")[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        raise AttributeError("OptimizerSpec is immutable; use replace()")

    def replace(self, **changes) -> "OptimizerSpec":
        return OptimizerSpec(self.name, **{**self.options, **changes})

    @property
    def entry(self) -> Optimizer:
        return OPTIMIZERS[self.name]

    def _key(self):
        return self.name, tuple(sorted(self.options.items()))

    def __eq__(self, other):
        return isinstance(other, OptimizerSpec) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        """As written in a `.dl` file: the learning rate and the options not at their defaults."""
        d = self.entry.defaults
        shown = {k: v for k, v in self.options.items() if k == "lr" or v != d[k]}
        return f"{self.name}({', '.join(f'{k} = {v!r}' for k, v in shown.items())})"


# ---- building the update ----------------------------------------------------------------------
@dataclass
class Update:
    """What an update rule works with for one parameter: the graph, the parameter and its
    gradient (L2 decay already added), its state tensors by slot, the run-time scalars."""
    g: object
    p: int
    grad: int
    state: dict
    scalars: dict
    dtype: str

    def c(self, v) -> int:
        return self.g.const(v, self.dtype)

    def op(self, name, *args) -> int:
        return self.g.add(name, *args)

    def ema(self, decay: float, old: int, new: int) -> int:
        """decay * old + (1 - decay) * new"""
        return self.op("add", self.op("mul", self.c(decay), old), self.op("mul", self.c(1 - decay), new))

    def set_state(self, slot: str, value: int) -> int:
        self.g.updates[self.state[slot]] = value
        return value


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


def state_name(spec: OptimizerSpec, slot: str, param: str, phase: str = "") -> str:
    """The name of one optimizer state tensor (a checkpoint key): `adam.m/mlp/dense_1/W`,
    prefixed with the phase's name when the train block declares phases."""
    base = f"{spec.name}.{slot}/{param}"
    return f"{phase}:{base}" if phase else base


def build_update(g, spec: OptimizerSpec, params: dict[str, int], grads: dict[int, int], phase: str = "") -> None:
    """Add the update of every parameter in `params` (name -> input node) to `g`."""
    if not params:
        return
    entry = spec.entry
    dtype = g.dtype(next(iter(params.values())))
    with g.at(None, role="update"):
        scal = {s: g.input(s, (), dtype, "scalar") for s in entry.scalars}
        for name, p in params.items():
            loc = g[p]["loc"]
            with g.at(loc, role="update"):
                shape = g.shape(p)
                state = {s: g.input(state_name(spec, s, name, phase), shape, dtype, "state", loc=loc)
                         for s in entry.slots(spec)}
                gp = grads[p]
                decay = decays(spec, name, shape)
                if decay and not entry.decoupled_decay:
                    gp = g.add("add", gp, g.add("mul", g.const(spec.weight_decay, dtype), p))
                u = Update(g, p, gp, state, scal, dtype)
                if decay and entry.decoupled_decay:   # p <- p * (1 - lr * wd), then the update
                    u.p = u.op("mul", p, u.op("sub", u.c(1.0), u.op("mul", scal["lr"], u.c(spec.weight_decay))))
                g.updates[p] = entry.update(u, spec)


def step_scalars(spec: OptimizerSpec, t: int) -> dict[str, float]:
    """The run-time scalars of step t (1-based) of this optimizer."""
    extra = spec.entry.step_scalars(spec, t) if spec.entry.step_scalars else {}
    return {"lr": spec.lr, **extra}


def bias_corrections(spec: OptimizerSpec, t: int) -> dict[str, float]:
    """Run-time scalars other than `lr` for step t (1-based)."""
    return spec.entry.step_scalars(spec, t) if spec.entry.step_scalars else {}


# ---- the update rules -----------------------------------------------------------------------------
def _sgd(u: Update, spec) -> int:
    step = u.grad
    if spec.momentum:
        buf = u.set_state("momentum", u.op("add", u.op("mul", u.c(spec.momentum), u.state["momentum"]), u.grad))
        step = u.op("add", u.grad, u.op("mul", u.c(spec.momentum), buf)) if spec.nesterov else buf
    return u.op("sub", u.p, u.op("mul", u.scalars["lr"], step))


def _adam(u: Update, spec) -> int:
    m = u.set_state("m", u.ema(spec.beta1, u.state["m"], u.grad))
    v = u.set_state("v", u.ema(spec.beta2, u.state["v"], u.op("mul", u.grad, u.grad)))
    denom = u.op("add", u.op("sqrt", u.op("mul", v, u.scalars["c2"])), u.c(spec.eps))
    return u.op("sub", u.p, u.op("div", u.op("mul", u.scalars["lr"], u.op("mul", m, u.scalars["c1"])), denom))


def _adam_corrections(spec, t):
    return {"c1": 1.0 / (1.0 - spec.beta1 ** t), "c2": 1.0 / (1.0 - spec.beta2 ** t)}


def _rmsprop(u: Update, spec) -> int:
    v = u.set_state("v", u.ema(spec.alpha, u.state["v"], u.op("mul", u.grad, u.grad)))
    return u.op("sub", u.p, u.op("div", u.op("mul", u.scalars["lr"], u.grad),
                                 u.op("add", u.op("sqrt", v), u.c(spec.eps))))


_ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
register(Optimizer("sgd", dict(lr=0.01, momentum=0.0, nesterov=False, **_COMMON),
                   slots=lambda s: ("momentum",) if s.momentum else (), update=_sgd))
register(Optimizer("adam", dict(**_ADAM, **_COMMON), slots=lambda s: ("m", "v"), update=_adam,
                   scalars=("lr", "c1", "c2"), step_scalars=_adam_corrections))
register(Optimizer("adamw", dict(**_ADAM, **{**_COMMON, "weight_decay": 0.01}), slots=lambda s: ("m", "v"),
                   update=_adam, scalars=("lr", "c1", "c2"), step_scalars=_adam_corrections,
                   decoupled_decay=True))
register(Optimizer("rmsprop", dict(lr=0.01, alpha=0.99, eps=1e-8, **_COMMON), slots=lambda s: ("v",),
                   update=_rmsprop))
