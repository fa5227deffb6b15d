"""Code generation: each fused group becomes one readable kernel; the step function calls them.

`base.Renderer` holds everything target-independent (indexing, loop bodies, the step function,
comments naming the `.dl` lines). A target (`target.Target`, implemented by `cpu.CpuTarget` and
`cuda.CudaTarget`) supplies a table of templates (decorators, loop headers, matmul call, scalar
overrides, op lowerings) and owns thread indexing, allocation and launches; the CUDA target
overrides entries of that table instead of forking the renderer.
"""
from .base import generate, helper_module
from .cpu import CpuTarget
from .cuda import CudaTarget
from .target import Target

TARGETS = {"cpu": CpuTarget, "cuda": CudaTarget}

__all__ = ["generate", "helper_module", "TARGETS", "Target", "CpuTarget", "CudaTarget"]
