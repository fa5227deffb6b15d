"""Graph -> graph passes. One pass per file; a pipeline is a plain list of them.

`run_pipeline` verifies the IR after every pass and names the pass that broke it; it can stop
after any pass by name, which is how `dlc ir --stage NAME` dumps an intermediate stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .autodiff import autodiff
from .cse import cse
from .dce import dce
from .fusion import fusion, no_fusion
from .optimizer import optimizer
from .remat import remat
from .simplify import simplify


class CompilerBug(Exception):
    """The compiler produced invalid IR: not the user's fault."""


@dataclass
class Context:
    """What the passes of one compiled program need: for a training step, the parameters its
    phase trains (their gradients are taken, the rest are constants of the step) and the
    phase's optimizer, whose state is named after the phase."""
    params: dict = field(default_factory=dict)      # name -> input node
    optimizer: object = None                         # OptimizerSpec or None
    phase: str = ""                                  # the training phase ("" without phases)
    expose_grads: bool = False                       # add d loss / d p as outputs
    grads: dict = field(default_factory=dict)        # filled by autodiff

    @classmethod
    def for_phase(cls, program, phase) -> "Context":
        return cls(params={n: program.params[n].node for n in phase.params}, optimizer=phase.optimizer,
                   phase=phase.name)


TRAIN_PIPELINE = [autodiff, optimizer, simplify, cse, dce, remat, fusion]
GRAD_PIPELINE = [autodiff, simplify, cse, dce, remat, fusion]
EVAL_PIPELINE = [simplify, cse, dce, fusion]


def pipeline(kind: str, fuse: bool = True, target: str = "cpu") -> list:
    """The passes of a program kind for a target. Both targets fuse alike today (the CUDA
    target runs a matmul's or a reduction's fused epilogue in the thread that owns the value);
    a target-specific fusion policy goes here."""
    base = {"train": TRAIN_PIPELINE, "grad": GRAD_PIPELINE, "eval": EVAL_PIPELINE}[kind]
    return [p if (fuse or p is not fusion) else no_fusion for p in base if fuse or p is not remat]


def run_pipeline(graph, passes, ctx: Context, stop_after: str | None = None):
    try:
        graph.verify()
    except AssertionError as e:
        raise CompilerBug(f"invalid IR after lowering: {e}") from None
    for p in passes:
        graph = p(graph, ctx)
        try:
            graph.verify()
        except AssertionError as e:
            raise CompilerBug(f"invalid IR after pass `{p.__name__}`: {e}") from None
        if stop_after is not None and p.__name__ == stop_after:
            break
    return graph


PASS_NAMES = [p.__name__ for p in TRAIN_PIPELINE]     # every pass, in order: `dlc ir --stage` names
