"""Optimizers: a registry of update rules written as graph ops, so a training step is one graph.

Each entry names its options and their defaults, the state it keeps per parameter (momentum
buffers, moments), the run-time scalars it reads (`lr`; Adam's bias corrections `c1`, `c2`) and
its update rule, which adds nodes computing a parameter's new value and its new state; those are
written back after the step (`graph.updates`). Semantics follow torch.optim: `weight_decay` adds
`wd * p` to the gradient (L2), except for entries with decoupled decay (AdamW), which shrink the
parameter itself. Run-time scalars are graph inputs, so a learning-rate schedule needs no
recompilation.

Every optimizer also takes `schedule` (a learning-rate schedule: `cosine(warmup = 1)`, see
SCHEDULES below; the step's `lr` input follows it, so it needs no recompilation), `clip_norm`
(rescale the phase's gradients so their global L2 norm is at most this, as
torch.nn.utils.clip_grad_norm_) and `clip_value` (clamp each gradient to [-v, v], as
clip_grad_value_); 0 turns clipping off. Clipping is graph ops in the step, before weight decay.

A `.dl` file picks an entry with `adam(lr = 1e-3, ...)`: an `OptimizerSpec`. Training phases
each carry their own spec; their optimizer state is named per phase (`phase:adam.m/param`).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable

_COMMON = {"weight_decay": 0.0, "decay": "weights", "schedule": None, "clip_norm": 0.0, "clip_value": 0.0}

# The ranges of the numeric options: (low, high, low included, high included). An option not
# named in its optimizer's `ranges` is any non-negative number (lr: 0 freezes the parameters,
# as torch allows). A decay rate (Adam's betas, RMSprop's alpha, momentum) is in [0, 1): at 1
# Adam's bias correction 1 / (1 - beta ** t) divides by zero and an average never moves.
UNIT = (0.0, 1.0, True, False)
POSITIVE = (0.0, math.inf, False, False)
NON_NEGATIVE = (0.0, math.inf, True, False)


@dataclass(frozen=True)
class Optimizer:
    name: str
    defaults: dict                        # option -> default (lr included)
    slots: Callable                       # spec -> names of the per-parameter state tensors
    update: Callable                      # (Update, spec) -> the parameter's new value (a node)
    scalars: tuple = ("lr",)              # run-time scalar inputs of the step
    step_scalars: Callable | None = None  # (options, t) -> values of the scalars other than lr at step t
    decoupled_decay: bool = False         # weight decay shrinks p instead of adding to the gradient
    ranges: dict = field(default_factory=dict)  # option -> its range (above); the others are >= 0

    def option_error(self, key: str, value) -> str | None:
        """Why `value` cannot be this optimizer's numeric option `key` (a message), or None."""
        low, high, low_in, high_in = self.ranges.get(key, NON_NEGATIVE)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"`{key}` must be a finite number, got {value!r}"
        if (low <= value if low_in else low < value) and (value <= high if high_in else value < high):
            return None
        if (low, high) == (0.0, math.inf):
            return f"`{key}` must be a {'non-negative' if low_in else 'positive'} number, got {value!r}"
        return (f"`{key}` must be in {'[' if low_in else '('}{low:g}, {high:g}"
                f"{']' if high_in else ')'}, got {value!r}")


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
        for k, v in opts.items():
            if k not in ("decay", "schedule", "nesterov") and (why := OPTIMIZERS[name].option_error(k, v)):
                raise ValueError(why)
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
        grads = clip_gradients(g, spec, [grads[p] for p in params.values()], dtype)
        grads = dict(zip(params.values(), grads))
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


def clip_gradients(g, spec: OptimizerSpec, grads: list[int], dtype: str) -> list[int]:
    """The gradients clipped as the spec asks: each to [-clip_value, clip_value], then all of them
    scaled by min(1, clip_norm / (norm + 1e-6)), norm being their global L2 norm (torch's rule)."""
    if spec.clip_value:
        v = g.const(spec.clip_value, dtype)
        grads = [g.add("minimum", g.add("maximum", gp, g.add("neg", v)), v) for gp in grads]
    if spec.clip_norm:
        squares = [g.add("reduce_sum", g.add("mul", gp, gp), axes=tuple(range(len(g.shape(gp)))), keepdims=False)
                   for gp in grads]
        total = squares[0]
        for sq in squares[1:]:
            total = g.add("add", total, sq)
        norm = g.add("sqrt", total)
        scale = g.add("minimum", g.const(1.0, dtype),
                      g.add("div", g.const(spec.clip_norm, dtype), g.add("add", norm, g.const(1e-6, dtype))))
        grads = [g.add("mul", gp, scale) for gp in grads]
    return grads


def step_scalars(spec: OptimizerSpec, t: int, plan: "SchedulePlan | None" = None) -> dict[str, float]:
    """The run-time scalars of step t (1-based) of this optimizer; with a schedule, the
    learning rate at that step of the run `plan` describes."""
    # (once a step: the options are read from their dict, where an attribute costs a failed
    # lookup first, about 0.6 us each: 3.2 -> 0.5 us, of an MLP step of 84)
    opts = spec.options
    lr = opts["lr"]
    if opts["schedule"] is not None:
        lr *= opts["schedule"].factor(t - 1, plan or SchedulePlan(1, 1))
    return {"lr": lr, **bias_corrections(spec, t)}


def bias_corrections(spec: OptimizerSpec, t: int) -> dict[str, float]:
    """Run-time scalars other than `lr` for step t (1-based)."""
    return spec.entry.step_scalars(spec.options, t) if spec.entry.step_scalars else {}


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


def _adam_corrections(opts: dict, t):
    return {"c1": 1.0 / (1.0 - opts["beta1"] ** t), "c2": 1.0 / (1.0 - opts["beta2"] ** t)}


def _rmsprop(u: Update, spec) -> int:
    v = u.set_state("v", u.ema(spec.alpha, u.state["v"], u.op("mul", u.grad, u.grad)))
    return u.op("sub", u.p, u.op("div", u.op("mul", u.scalars["lr"], u.grad),
                                 u.op("add", u.op("sqrt", v), u.c(spec.eps))))


_ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
_ADAM_RANGES = dict(beta1=UNIT, beta2=UNIT, eps=POSITIVE)
register(Optimizer("sgd", dict(lr=0.01, momentum=0.0, nesterov=False, **_COMMON),
                   slots=lambda s: ("momentum",) if s.momentum else (), update=_sgd, ranges=dict(momentum=UNIT)))
register(Optimizer("adam", dict(**_ADAM, **_COMMON), slots=lambda s: ("m", "v"), update=_adam,
                   scalars=("lr", "c1", "c2"), step_scalars=_adam_corrections, ranges=_ADAM_RANGES))
register(Optimizer("adamw", dict(**_ADAM, **{**_COMMON, "weight_decay": 0.01}), slots=lambda s: ("m", "v"),
                   update=_adam, scalars=("lr", "c1", "c2"), step_scalars=_adam_corrections,
                   decoupled_decay=True, ranges=_ADAM_RANGES))
register(Optimizer("rmsprop", dict(lr=0.01, alpha=0.99, eps=1e-8, **_COMMON), slots=lambda s: ("v",),
                   update=_rmsprop, ranges=dict(alpha=UNIT, eps=POSITIVE)))


# ---- learning-rate schedules ---------------------------------------------------------------------
# A schedule is a factor of the optimizer's `lr` at each step, a function of the step, the
# steps in an epoch and in the run (so the schedule is a run-time input of the compiled step).
# Durations are in epochs (fractions allowed). Each takes `warmup = E`: the first E epochs' W
# steps ramp the factor linearly, (t + 1) / W, then the schedule runs over the remaining steps
# (torch's SequentialLR of LinearLR(start_factor = 1 / W, total_iters = W - 1) and the schedule).
@dataclass(frozen=True)
class SchedulePlan:
    """The run a schedule is laid over: steps per epoch, and steps in all."""
    steps_per_epoch: int
    total_steps: int


@dataclass(frozen=True)
class Schedule:
    name: str
    defaults: dict
    factor: Callable                      # (t (0-based), steps, plan, options) -> factor of lr
    doc: str = ""


SCHEDULES: dict[str, Schedule] = {}


def _schedule(name, doc, **defaults):
    def deco(fn):
        SCHEDULES[name] = Schedule(name, {**defaults, "warmup": 0.0}, fn, doc)
        return fn
    return deco


@_schedule("constant", "the optimizer's lr throughout (with `warmup`, after it)")
def _constant(t, steps, plan, o):
    return 1.0


@_schedule("step_decay", "lr * gamma ** (epochs done // every), as torch's StepLR stepped per epoch",
           every=1.0, gamma=0.1)
def _step_decay(t, steps, plan, o):
    return o["gamma"] ** math.floor(t / plan.steps_per_epoch / o["every"] + 1e-9)


@_schedule("exponential", "lr * gamma ** epochs done, as torch's ExponentialLR stepped per epoch", gamma=0.9)
def _exponential(t, steps, plan, o):
    return o["gamma"] ** (t // plan.steps_per_epoch)


@_schedule("cosine", "from lr down to lr * final along half a cosine, as torch's CosineAnnealingLR "
                     "(T_max = the run's steps) stepped per batch", final=0.0)
def _cosine(t, steps, plan, o):
    return o["final"] + (1 - o["final"]) * (1 + math.cos(math.pi * min(t, steps) / max(steps, 1))) / 2


@_schedule("one_cycle", "up from lr / div to lr over the first `rise` of the run, then down to lr / div / "
                        "final_div, both along cosines: torch's OneCycleLR (max_lr = lr) stepped per batch",
           rise=0.3, div=25.0, final_div=1e4)
def _one_cycle(t, steps, plan, o):
    def anneal(start, end, pct):
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)
    low, peak = 1 / o["div"], 1.0
    end_up = o["rise"] * steps - 1
    if t <= end_up:
        return anneal(low, peak, t / end_up)
    return anneal(peak, low / o["final_div"], (t - end_up) / max(steps - 1 - end_up, 1e-12))


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule as a `.dl` file writes it (`cosine(warmup = 1)`): a registry entry and its options."""
    name: str
    options: tuple = field(default=())

    @classmethod
    def make(cls, name: str, **options) -> "ScheduleSpec":
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; schedules: {', '.join(SCHEDULES)}")
        defaults = SCHEDULES[name].defaults
        unknown = set(options) - set(defaults)
        if unknown:
            raise TypeError(f"schedule `{name}` has no option {', '.join(sorted(unknown))}; "
                            f"options: {', '.join(defaults)}")
        for k, v in options.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise TypeError(f"`{k}` must be a non-negative number, got {v!r}")
        if name == "one_cycle" and not 0 < options.get("rise", defaults["rise"]) < 1:
            raise TypeError("`rise` is the part of the run spent rising: a number between 0 and 1")
        if options.get("every", 1) <= 0 or options.get("div", 1) <= 0 or options.get("final_div", 1) <= 0:
            raise TypeError("`every`, `div` and `final_div` must be positive")
        return cls(name, tuple(sorted({**defaults, **options}.items())))

    def factor(self, t: int, plan: SchedulePlan) -> float:
        """The factor of lr at step t (0-based) of the run `plan` describes."""
        o = dict(self.options)
        warm = round(o["warmup"] * plan.steps_per_epoch)
        if t < warm:
            return (t + 1) / warm
        return SCHEDULES[self.name].factor(t - warm, plan.total_steps - warm, plan, o)

    def __repr__(self):
        d = SCHEDULES[self.name].defaults
        shown = ", ".join(f"{k} = {v!r}" for k, v in self.options if v != d[k])
        return f"{self.name}({shown})"
