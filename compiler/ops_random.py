"""Random primitives beyond `rand_uniform` (in ops_nn.py): `rand_normal`, standard normal
numbers from the same counter-based stream.

Every draw is a pure function of (the step's seed, the call site's salt, the element's flat
index), so a fused kernel, an unfused one and the NumPy reference give the same numbers, and a
run with the same seed reproduces exactly. A normal number is the Box-Muller transform of the
uniform numbers at counters 2i and 2i + 1 of its call site's stream.

`uniform(low, high)`, `normal(mean, std)` and `bernoulli(p)` are built from these two ops with
ordinary arithmetic in `compiler/builtins.py`; no random op has a gradient (a sample is a
constant to differentiation: the reparameterization trick `mu + sigma * eps` puts the
parameters outside the draw).
"""
from __future__ import annotations

import numpy as np

from .ops import Kind, Op, register
from .ops_nn import RNG_HELPERS, _rand_infer, uniform_ref
from .shapes import DTYPES

NORMAL_HELPERS = RNG_HELPERS + '''
@njit(cache=True, inline='always')
def _normal(seed, salt, i):
    u1 = _uniform(seed, salt, 2 * i)
    u2 = _uniform(seed, salt, 2 * i + 1)
    return np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(6.283185307179586 * u2)
'''


def normal_ref(seed, salt, n):
    """n standard normal numbers of the stream (seed, salt): the kernels' Box-Muller, in NumPy."""
    u = uniform_ref(seed, salt, 2 * n)
    return np.sqrt(-2.0 * np.log(1.0 - u[0::2])) * np.cos(2 * np.pi * u[1::2])


def _normal_ref(seed, *, shape, salt, dtype):
    return normal_ref(int(seed), salt, int(np.prod(shape))).reshape(shape).astype(DTYPES[dtype])


rand_normal = register(Op("rand_normal", Kind.ELEMENTWISE, _rand_infer, ref=_normal_ref, helpers=NORMAL_HELPERS,
                          scalar="{T}(_normal({0}, {salt}, {flat}))"))
rand_normal.grad = lambda g, n, dy: [None]
