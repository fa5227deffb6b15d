"""Code generation: each fused group becomes one readable kernel; the step function calls them.

`base.Renderer` holds everything target-independent (indexing, loop bodies, the step function,
comments naming the `.dl` lines). A target (`cpu.CpuTarget`) supplies a table of templates
(decorators, loop headers, matmul call, scalar overrides); a second target overrides entries
of that table and the launch logic instead of forking the renderer.
"""
from .base import generate
from .cpu import CpuTarget

TARGETS = {"cpu": CpuTarget}

__all__ = ["generate", "TARGETS", "CpuTarget"]
