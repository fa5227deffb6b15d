"""What lowering works with and produces: values (tensors, symbolic sizes, initializers), the
frame of a function call, parameters, phases and the `Program` the runtime drives."""
from __future__ import annotations

from dataclasses import dataclass, field

from dsl.diagnostics import Loc

from .ir import Graph
from .optim import OptimizerSpec


@dataclass(frozen=True)
class Tensor:
    node: int


class SymDim(str):
    """A symbolic dimension (the batch size) used as a value, e.g. in zeros([N, units])."""


@dataclass(frozen=True)
class InitSpec:
    name: str
    kwargs: tuple = ()

    def __str__(self):
        if not self.kwargs:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.kwargs)})"


INITIALIZERS = {
    "glorot": {}, "xavier": {}, "glorot_normal": {}, "he": {}, "kaiming": {}, "he_uniform": {},
    "zeros": {}, "ones": {}, "normal": {"mean": 0.0, "std": 0.01}, "uniform": {"low": -0.05, "high": 0.05},
    "constant": {"value": 0.0},
}


@dataclass
class ParamInfo:
    name: str
    node: int
    shape: tuple
    dtype: str
    init: InitSpec
    loc: Loc


@dataclass
class Phase:
    """One training phase: a loss, the parameters it trains, its optimizer and its schedule.
    A train block without `phase`s is one phase named "" that trains every parameter."""

    name: str
    loss: int                       # the loss node in the program's graph
    params: list[str]               # names of the parameters it trains
    optimizer: OptimizerSpec
    steps: int = 1                  # consecutive steps per round
    every: int = 1                  # runs in every `every`-th round
    loc: Loc | None = None
    setting_locs: dict = field(default_factory=dict)
    updates: dict = field(default_factory=dict)     # state updates (`<-`) made by its own calls

    @property
    def output(self) -> str:
        """The graph output holding its loss (in the evaluation program too)."""
        return f"loss:{self.name}" if self.name else "loss"


@dataclass(frozen=True)
class TaskInfo:
    """What the trained model is trained to do, for its metrics: the standard-library loss that
    compares the model's output with a target (`lower.TASK_LOSSES`), and where that target is: a
    data field (`field`), or an expression the program computes as its output "target"."""
    loss: str | None = None
    field: str | None = None
    computed: bool = False


@dataclass
class Program:
    """What lowering produces: the forward graph and what the runtime needs to drive it."""

    graph: Graph
    params: dict[str, ParamInfo]
    data: dict[str, int] = field(default_factory=dict)     # data field -> input node
    states: dict[str, ParamInfo] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    setting_locs: dict = field(default_factory=dict)
    model: str = ""
    phases: list[Phase] = field(default_factory=list)
    task: TaskInfo = field(default_factory=lambda: TaskInfo())

    def step_graph(self, phase: Phase) -> Graph:
        """The forward graph of one phase's training step: its loss, the model's outputs, and
        the state updates made outside any phase or inside this one."""
        g = self.graph.copy()
        g.outputs = {"loss": phase.loss, **{k: v for k, v in self.graph.outputs.items()
                                            if k.startswith("output") or k == "target"}}
        g.updates = {**self.graph.updates, **phase.updates}
        return g


@dataclass
class Frame:
    vars: dict
    dims: dict
    scope: str
    fn: str
    user_loc: Loc | None
    yielded: list | None = None       # in a scan body: the values of its `yield`
    counters: dict = field(default_factory=dict)   # def name -> calls so far (scope names f_1, f_2)


@dataclass(frozen=True)
class Outer:
    """A tensor of the enclosing graph seen from a scan body: captured on first use."""
    node: int
