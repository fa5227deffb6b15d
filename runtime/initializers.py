"""Seeded parameter initializers.

Fans follow the layouts of the standard library: dense weights are [in, out]; convolution
weights are [out, in, kh, kw] (fan_in = in*kh*kw, fan_out = out*kh*kw).
"""
from __future__ import annotations

import math

import numpy as np

from dsl.diagnostics import DlcError


def fans(shape) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    field = math.prod(shape[2:])
    return shape[1] * field, shape[0] * field


def initialize(spec, shape, dtype, rng: np.random.Generator, loc=None) -> np.ndarray:
    name, kw = spec.name, dict(spec.kwargs)
    fan_in, fan_out = fans(shape)
    if name in ("glorot", "xavier"):
        lim = math.sqrt(6.0 / (fan_in + fan_out))
        a = rng.uniform(-lim, lim, shape)
    elif name == "glorot_normal":
        a = rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), shape)
    elif name in ("he", "kaiming"):
        a = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)
    elif name == "he_uniform":
        lim = math.sqrt(6.0 / fan_in)
        a = rng.uniform(-lim, lim, shape)
    elif name == "normal":
        a = rng.normal(kw.get("mean", 0.0), kw.get("std", 0.01), shape)
    elif name == "uniform":
        a = rng.uniform(kw.get("low", -0.05), kw.get("high", 0.05), shape)
    elif name == "zeros":
        a = np.zeros(shape)
    elif name == "ones":
        a = np.ones(shape)
    elif name == "constant":
        a = np.full(shape, kw.get("value", 0.0))
    else:
        raise DlcError(f"unknown initializer `{name}`", loc)
    return np.ascontiguousarray(a, dtype=dtype)
