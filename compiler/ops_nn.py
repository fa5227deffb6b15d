"""Primitives for convolutional networks and randomness: conv2d (+ its two gradients),
max/avg pooling (+ gradients), and a counter-based uniform random generator.

Like `ops.py`, each primitive is defined once here: shape rule, NumPy reference, gradient
rule, fusion kind and kernel template (a loop nest formatted with named sizes, plus shared
`@njit` helpers the template calls). Layouts: NCHW; conv weights [out, in, kh, kw].
"""
from __future__ import annotations

import numpy as np

from .ops import OPS, Kind, Op, register
from .shapes import DTYPES, FLOATS, ShapeError, fmt_shape


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# A shape rule's message does not name its op: the graph puts the op's name in front of it.
def _spatial(s):
    if len(s) != 4:
        raise ShapeError(f"the input must be NCHW, of rank 4, got {fmt_shape(s)}")
    if not all(isinstance(d, int) for d in s[1:]):
        raise ShapeError(f"the input needs fixed channel and spatial sizes, got {fmt_shape(s)}")


def _out_size(h, k, stride, pad, dil, axis):
    """The output size along one axis (`axis`: "rows" or "columns", for the message)."""
    eff = dil * (k - 1) + 1
    if h + 2 * pad < eff:
        raise ShapeError(f"the {'dilated ' if dil > 1 else ''}kernel ({eff} {axis}) is larger than the "
                         f"{'padded ' if pad else ''}input ({h + 2 * pad} {axis})")
    return (h + 2 * pad - eff) // stride + 1


def _geometry(a):
    return _pair(a.get("stride", 1)), _pair(a.get("padding", 0)), _pair(a.get("dilation", 1))


# ---- conv2d -----------------------------------------------------------------------------------
def _conv_infer(s, d, a):
    x, w = s
    _spatial(x)
    if len(w) != 4:
        raise ShapeError(f"the weights are [out, in, kh, kw], got {fmt_shape(w)}")
    if x[1] != w[1]:
        raise ShapeError(f"the input has {x[1]} channels {fmt_shape(x)} but the kernel expects {w[1]} {fmt_shape(w)}")
    if d[0] != d[1] or d[0] not in FLOATS:
        raise ShapeError(f"the input and the weights must be float tensors of one dtype, got {d[0]} and {d[1]}")
    (sh, sw), (ph, pw), (dh, dw) = _geometry(a)
    ho = _out_size(x[2], w[2], sh, ph, dh, "rows")
    wo = _out_size(x[3], w[3], sw, pw, dw, "columns")
    return (x[0], w[0], ho, wo), d[0]


def im2col_ref(x, kh, kw, stride, pad, dil):
    """[N, C, H, W] -> [N, C*kh*kw, Ho*Wo] (the NumPy reference, written independently)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dil
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
    return cols.reshape(n, c * kh * kw, ho * wo), ho, wo


def _conv_ref(x, w, *, stride=1, padding=0, dilation=1):
    o, c, kh, kw = w.shape
    cols, ho, wo = im2col_ref(x, kh, kw, _pair(stride), _pair(padding), _pair(dilation))
    return np.einsum("ok,nkp->nop", w.reshape(o, -1), cols).reshape(x.shape[0], o, ho, wo)


def _conv_sizes(g, n, x, w, y):
    """Named sizes for the conv templates."""
    a = g.attrs(n)
    (sh, sw), (ph, pw), (dh, dw) = _geometry(a)
    N, C, H, W = g.shape(x)
    O, _, KH, KW = g.shape(w)
    HO, WO = g.shape(y)[2:]
    return dict(N=N, C=C, H=H, W=W, O=O, KH=KH, KW=KW, HO=HO, WO=WO, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
                CKK=C * KH * KW, P=HO * WO)


# Shared loop nests, emitted once into any module that uses a convolution.
CONV_HELPERS = '''\
@njit(cache=True, fastmath=FASTMATH, error_model='numpy')
def _im2col(x, cols, C, H, W, KH, KW, HO, WO, SH, SW, PH, PW, DH, DW):
    """x: [C, H, W] -> cols: [C*KH*KW, HO*WO] (zeros where the window leaves the input)."""
    for c in range(C):
        for kh in range(KH):
            for kw in range(KW):
                r = (c * KH + kh) * KW + kw
                for oh in range(HO):
                    ih = oh * SH - PH + kh * DH
                    for ow in range(WO):
                        iw = ow * SW - PW + kw * DW
                        if ih >= 0 and ih < H and iw >= 0 and iw < W:
                            cols[r, oh * WO + ow] = x[c, ih, iw]
                        else:
                            cols[r, oh * WO + ow] = 0


@njit(cache=True, fastmath=FASTMATH, error_model='numpy')
def _col2im(cols, dx, C, H, W, KH, KW, HO, WO, SH, SW, PH, PW, DH, DW):
    """The adjoint of _im2col: scatter-add cols: [C*KH*KW, HO*WO] into dx: [C, H, W]."""
    for c in range(C):
        for kh in range(KH):
            for kw in range(KW):
                r = (c * KH + kh) * KW + kw
                for oh in range(HO):
                    ih = oh * SH - PH + kh * DH
                    if ih < 0 or ih >= H:
                        continue
                    for ow in range(WO):
                        iw = ow * SW - PW + kw * DW
                        if iw >= 0 and iw < W:
                            dx[c, ih, iw] += cols[r, oh * WO + ow]
'''

_GEOM = "{C}, {H}, {W}, {KH}, {KW}, {HO}, {WO}, {SH}, {SW}, {PH}, {PW}, {DH}, {DW}"
# A convolution's geometry (kernel, stride, padding, dilation) is written into its kernel as
# numbers: without padding the im2col and col2im loops run inline with no bounds checks and
# their taps unroll (LeNet's conv2 forward: 370 -> 280 us, CPU time at batch 64); with padding
# they call the clamped helpers above.
_CONV_GEOMETRY = ("KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW")

_IM2COL_INSIDE = """\
    xn = {x0}[n]
    for c in range({C}):
        for kh in range({KH}):
            for kw in range({KW}):
                r = (c * {KH} + kh) * {KW} + kw
                for oh in range({HO}):
                    ih = oh * {SH} + kh * {DH}
                    for ow in range({WO}):
                        cols[r, oh * {WO} + ow] = xn[c, ih, ow * {SW} + kw * {DW}]
"""
_COL2IM_INSIDE = """\
    dxn = {out}[n]
    for c in range({C}):
        for kh in range({KH}):
            for kw in range({KW}):
                r = (c * {KH} + kh) * {KW} + kw
                for oh in range({HO}):
                    ih = oh * {SH} + kh * {DH}
                    for ow in range({WO}):
                        dxn[c, ih, ow * {SW} + kw * {DW}] += cols[r, oh * {WO} + ow]
"""


def _im2col(sz) -> str:
    return f"    _im2col({{x0}}[n], cols, {_GEOM})\n" if _padded(sz) else _IM2COL_INSIDE


def _conv_template(sz) -> str:
    return ("cols = np.empty(({CKK}, {P}), {T})\n"
            "w2 = {x1}.reshape(({O}, {CKK}))\n"
            "for n in range({N}):\n" + _im2col(sz) +
            "    np.dot(w2, cols, {out}[n].reshape(({O}, {P})))\n")


def _conv_grad_x_template(sz) -> str:
    return ("cols = np.empty(({CKK}, {P}), {T})\n"
            "w2 = {x1}.reshape(({O}, {CKK}))\n"
            "{out}.reshape(-1)[:] = 0\n"
            "for n in range({N}):\n"
            "    np.dot(w2.T, {x0}[n].reshape(({O}, {P})), cols)\n" +
            (f"    _col2im(cols, {{out}}[n], {_GEOM})\n" if _padded(sz) else _COL2IM_INSIDE))


def _conv_grad_w_template(sz) -> str:
    return ("cols = np.empty(({CKK}, {P}), {T})\n"
            "part = np.empty(({O}, {CKK}), {T})\n"
            "acc = {out}.reshape(({O}, {CKK}))\n"
            "acc[:, :] = 0\n"
            "for n in range({N}):\n" + _im2col(sz) +
            "    np.dot({x1}[n].reshape(({O}, {P})), cols.T, part)\n"
            "    acc += part\n")


conv2d = register(Op("conv2d", Kind.OUT_ELEMENTWISE_FUSABLE, _conv_infer, ref=_conv_ref, helpers=CONV_HELPERS,
                     kernel_sizes=lambda g, n: _conv_sizes(g, n, *g.args(n), n), literal_sizes=_CONV_GEOMETRY,
                     kernel=_conv_template, user_name="conv2d"))


def _conv_grad_x_infer(s, d, a):
    return (s[0][0],) + tuple(a["x_shape"][1:]), d[0]


def _conv_grad_x_ref(dy, w, *, x_shape, stride=1, padding=0, dilation=1):
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n = dy.shape[0]
    _, c, h, wd = x_shape
    o, _, kh, kw = w.shape
    ho, wo = dy.shape[2:]
    cols = np.einsum("ok,nop->nkp", w.reshape(o, -1), dy.reshape(n, o, -1)).reshape(n, c, kh, kw, ho, wo)
    dxp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dy.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw] += cols[:, :, i, j]
    return dxp[:, :, ph: ph + h, pw: pw + wd]


def _conv_grad_w_ref(x, dy, *, w_shape, stride=1, padding=0, dilation=1):
    o, c, kh, kw = w_shape
    cols, ho, wo = im2col_ref(x, kh, kw, _pair(stride), _pair(padding), _pair(dilation))
    return np.einsum("nop,nkp->ok", dy.reshape(dy.shape[0], o, -1), cols).reshape(w_shape)


conv2d_grad_x = register(Op(
    "conv2d_grad_x", Kind.OPAQUE, _conv_grad_x_infer, ref=_conv_grad_x_ref, helpers=CONV_HELPERS,
    kernel_sizes=lambda g, n: _conv_sizes(g, n, n, g.args(n)[1], g.args(n)[0]), literal_sizes=_CONV_GEOMETRY,
    kernel=_conv_grad_x_template))

conv2d_grad_w = register(Op(
    "conv2d_grad_w", Kind.OPAQUE, lambda s, d, a: (tuple(a["w_shape"]), d[0]), ref=_conv_grad_w_ref,
    helpers=CONV_HELPERS, kernel_sizes=lambda g, n: _conv_sizes(g, n, g.args(n)[0], n, g.args(n)[1]),
    literal_sizes=_CONV_GEOMETRY, kernel=_conv_grad_w_template))


@conv2d.def_grad
def _(g, n, dy):
    x, w = g.args(n)
    geo = {k: g.attrs(n)[k] for k in ("stride", "padding", "dilation") if k in g.attrs(n)}
    dx = g.add("conv2d_grad_x", dy, w, x_shape=g.shape(x), **geo)
    dw = g.add("conv2d_grad_w", x, dy, w_shape=g.shape(w), **geo)
    return [dx, dw]


# ---- pooling ------------------------------------------------------------------------------------
def _pool_infer(s, d, a):
    x = s[0]
    _spatial(x)
    (kh, kw), (sh, sw), (ph, pw) = _pair(a["kernel"]), _pair(a["stride"]), _pair(a.get("padding", 0))
    if ph * 2 > kh or pw * 2 > kw:
        raise ShapeError("padding must be at most half the kernel")
    ho = _out_size(x[2], kh, sh, ph, 1, "rows")
    wo = _out_size(x[3], kw, sw, pw, 1, "columns")
    return (x[0], x[1], ho, wo), d[0]


def _pool_ref(x, kernel, stride, padding, reduce):
    (kh, kw), s, p = _pair(kernel), _pair(stride), _pair(padding)
    n, c, h, w = x.shape
    fill = -np.inf if reduce == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])), constant_values=fill)
    cols, ho, wo = im2col_ref(xp.reshape(n * c, 1, *xp.shape[2:]), kh, kw, s, (0, 0), (1, 1))
    cols = cols.reshape(n, c, kh * kw, ho, wo)
    return cols.max(axis=2) if reduce == "max" else cols.mean(axis=2)


def _pool_sizes(g, n, x):
    a = g.attrs(n)
    (kh, kw), (sh, sw), (ph, pw) = _pair(a["kernel"]), _pair(a["stride"]), _pair(a.get("padding", 0))
    N, C, H, W = g.shape(x)
    ho = (H + 2 * ph - kh) // sh + 1
    wo = (W + 2 * pw - kw) // sw + 1
    return dict(N=N, C=C, H=H, W=W, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, HO=ho, WO=wo, K=kh * kw)


# Pooling. The window's geometry (kernel, stride, padding) is written into the kernel as
# numbers (`literal_sizes`: its loops unroll; a kernel per geometry), and the template follows
# it: without padding every window lies inside the input, so the taps run without clamps (LeNet's
# 2x2 pool of [64, 6, 24, 24]: 386 -> 43 us); with padding each window's range of taps is
# clamped once per output. Padding taps count as -inf (max) or 0 (avg).
_GEOMETRY = ("KH", "KW", "SH", "SW", "PH", "PW", "K")


def _padded(sizes) -> bool:
    return bool(sizes["PH"] or sizes["PW"])


def _tiled(sizes) -> bool:
    """Do the windows tile the input exactly (no padding, stride = kernel, no remainder)? Then
    every input position is in exactly one window."""
    return (not _padded(sizes) and (sizes["SH"], sizes["SW"]) == (sizes["KH"], sizes["KW"])
            and sizes["H"] == sizes["HO"] * sizes["KH"] and sizes["W"] == sizes["WO"] * sizes["KW"])


_WINDOW = """\
for n in range({N}):
    for c in range({C}):
        for oh in range({HO}):
            h0 = oh * {SH} - {PH}
            kh0 = max(0, -h0)
            kh1 = min({KH}, {H} - h0)
            for ow in range({WO}):
                w0 = ow * {SW} - {PW}
                kw0 = max(0, -w0)
                kw1 = min({KW}, {W} - w0)
"""
_INSIDE = """\
for n in range({N}):
    for c in range({C}):
        for oh in range({HO}):
            h0 = oh * {SH}
            for ow in range({WO}):
                w0 = ow * {SW}
"""
_MAX = """\
                m = -np.inf
                for kh in range(kh0, kh1):
                    for kw in range(kw0, kw1):
                        v = {x0}[n, c, h0 + kh, w0 + kw]
                        if v > m:
                            m = v
                {out}[n, c, oh, ow] = m
"""
# Inside the input the first tap starts the maximum and the taps are selects, not branches
# (a branch per tap mispredicts on ReLU outputs: 3.6x slower in the gradient below)
_MAX_INSIDE = """\
                m = {x0}[n, c, h0, w0]
                for kh in range({KH}):
                    for kw in range({KW}):
                        v = {x0}[n, c, h0 + kh, w0 + kw]
                        m = v if v > m else m
                {out}[n, c, oh, ow] = m
"""
max_pool2d = register(Op(
    "max_pool2d", Kind.OPAQUE, _pool_infer,
    ref=lambda x, *, kernel, stride, padding=0: _pool_ref(x, kernel, stride, padding, "max"),
    kernel_sizes=lambda g, n: _pool_sizes(g, n, g.args(n)[0]), literal_sizes=_GEOMETRY,
    kernel=lambda sz: _WINDOW + _MAX if _padded(sz) else _INSIDE + _MAX_INSIDE))

# The gradient goes to the first maximum of each window (as PyTorch does). When the windows
# tile the input, each window writes all its positions (the gradient or 0): no zeroing pass and
# no scatter-add (LeNet's first pool: 588 -> 136 us).
_MAX_ARG = """\
                m = -np.inf
                bi = -1
                bj = -1
                for kh in range(kh0, kh1):
                    for kw in range(kw0, kw1):
                        v = {x0}[n, c, h0 + kh, w0 + kw]
                        if v > m:
                            m = v
                            bi = kh
                            bj = kw
                if bi >= 0:
                    {out}[n, c, h0 + bi, w0 + bj] += {x1}[n, c, oh, ow]
"""
_MAX_ARG_INSIDE = """\
                m = {x0}[n, c, h0, w0]
                b = 0
                for kh in range({KH}):
                    for kw in range({KW}):
                        v = {x0}[n, c, h0 + kh, w0 + kw]
                        better = v > m
                        m = v if better else m
                        b = kh * {KW} + kw if better else b
"""
_MAX_GRAD_ADD = """\
                {out}[n, c, h0 + b // {KW}, w0 + b % {KW}] += {x1}[n, c, oh, ow]
"""
_MAX_GRAD_TILE = """\
                gv = {x1}[n, c, oh, ow]
                for kh in range({KH}):
                    for kw in range({KW}):
                        {out}[n, c, h0 + kh, w0 + kw] = gv if kh * {KW} + kw == b else {T}(0)
"""


def _max_grad_template(sz) -> str:
    if _padded(sz):
        return "{out}.reshape(-1)[:] = 0\n" + _WINDOW + _MAX_ARG
    if _tiled(sz):
        return _INSIDE + _MAX_ARG_INSIDE + _MAX_GRAD_TILE
    return "{out}.reshape(-1)[:] = 0\n" + _INSIDE + _MAX_ARG_INSIDE + _MAX_GRAD_ADD


max_pool2d_grad = register(Op(
    "max_pool2d_grad", Kind.OPAQUE, lambda s, d, a: (s[0], d[0]), ref=None,
    kernel_sizes=lambda g, n: _pool_sizes(g, n, g.args(n)[0]), literal_sizes=_GEOMETRY,
    kernel=_max_grad_template))


def _max_pool_grad_ref(x, dy, *, kernel, stride, padding=0):
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    dx = np.zeros_like(x)
    n, c, ho, wo = dy.shape
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * sh - ph, j * sw - pw
            win = np.full((n, c, kh, kw), -np.inf)
            rs, cs = max(r0, 0), max(c0, 0)
            re, ce = min(r0 + kh, x.shape[2]), min(c0 + kw, x.shape[3])
            win[:, :, rs - r0:re - r0, cs - c0:ce - c0] = x[:, :, rs:re, cs:ce]
            flat = win.reshape(n, c, -1).argmax(axis=2)
            for a in range(n):
                for b in range(c):
                    dx[a, b, r0 + flat[a, b] // kw, c0 + flat[a, b] % kw] += dy[a, b, i, j]
    return dx


max_pool2d_grad.ref = _max_pool_grad_ref

avg_pool2d = register(Op(
    "avg_pool2d", Kind.OPAQUE, _pool_infer,
    ref=lambda x, *, kernel, stride, padding=0: _pool_ref(x, kernel, stride, padding, "avg"),
    kernel_sizes=lambda g, n: _pool_sizes(g, n, g.args(n)[0]), literal_sizes=_GEOMETRY,
    kernel=_WINDOW + """\
                s = 0.0
                for kh in range(kh0, kh1):
                    for kw in range(kw0, kw1):
                        s += {x0}[n, c, h0 + kh, w0 + kw]
                {out}[n, c, oh, ow] = s / {K}
"""))

# Padding counts toward the divisor (PyTorch's count_include_pad=True).
avg_pool2d_grad = register(Op(
    "avg_pool2d_grad", Kind.OPAQUE, lambda s, d, a: ((s[0][0],) + tuple(a["x_shape"][1:]), d[0]), ref=None,
    kernel_sizes=lambda g, n: _pool_sizes(g, n, n), literal_sizes=_GEOMETRY,
    kernel="{out}.reshape(-1)[:] = 0\n" + _WINDOW + """\
                v = {x0}[n, c, oh, ow] / {K}
                for kh in range(kh0, kh1):
                    for kw in range(kw0, kw1):
                        {out}[n, c, h0 + kh, w0 + kw] += v
"""))


def _avg_pool_grad_ref(dy, *, x_shape, kernel, stride, padding=0):
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    n = dy.shape[0]
    dxp = np.zeros((n, x_shape[1], x_shape[2] + 2 * ph, x_shape[3] + 2 * pw), dy.dtype)
    ho, wo = dy.shape[2:]
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw] += dy / (kh * kw)
    return dxp[:, :, ph: ph + x_shape[2], pw: pw + x_shape[3]]


avg_pool2d_grad.ref = _avg_pool_grad_ref


def _pool_attrs(g, n):
    return {k: g.attrs(n)[k] for k in ("kernel", "stride", "padding") if k in g.attrs(n)}


@max_pool2d.def_grad
def _(g, n, dy):
    return [g.add("max_pool2d_grad", g.args(n)[0], dy, **_pool_attrs(g, n))]


@avg_pool2d.def_grad
def _(g, n, dy):
    return [g.add("avg_pool2d_grad", dy, x_shape=g.shape(g.args(n)[0]), **_pool_attrs(g, n))]


# ---- randomness ---------------------------------------------------------------------------------
# A counter-based generator (SplitMix64 of seed, call-site salt and element index): the same
# numbers in any kernel, fused or not, on any target, and from the NumPy reference.
COUNTER_STRIDE = 0x9E3779B97F4A7C15     # _uniform's step between consecutive counters
RNG_HELPERS = '''\
@njit(cache=True, inline='always')
def _uniform(seed, salt, i):
    z = np.uint64(seed) + np.uint64(salt) * np.uint64(0xD1B54A32D192ED03) + np.uint64(i) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)
'''


def uniform_ref(seed, salt, n):
    with np.errstate(over="ignore"):
        i = np.arange(n, dtype=np.uint64)
        z = np.uint64(seed % 2 ** 64) + np.uint64(salt) * np.uint64(0xD1B54A32D192ED03) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _rand_infer(s, d, a):
    if d[0] not in ("i64", "i32"):
        raise ShapeError("the random seed must be an integer")
    return tuple(a["shape"]), a["dtype"]


register(Op("rand_uniform", Kind.ELEMENTWISE, _rand_infer, helpers=RNG_HELPERS,
            ref=lambda seed, *, shape, salt, dtype: uniform_ref(int(seed), salt, int(np.prod(shape))).reshape(shape).astype(DTYPES[dtype]),
            scalar="{T}(_uniform({0}, {salt}, {flat}))"))
OPS["rand_uniform"].grad = lambda g, n, dy: [None]


def _sample_infer(s, d, a):
    if len(s[0]) == 0:
        raise ShapeError("sample needs logits with a class axis")
    return tuple(s[0][:-1]), "i32"


def _sample_ref(x, seed, *, salt, temperature):
    z = x / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)
    rows = cdf.reshape(-1, cdf.shape[-1])
    u = uniform_ref(int(seed), salt, len(rows)) * rows[:, -1]
    return np.array([min(np.searchsorted(r, v, side="right"), len(r) - 1) for r, v in zip(rows, u)],
                    np.int32).reshape(x.shape[:-1])


# Draw one class per row from softmax(logits / temperature), by inverting its CDF at a
# counter-based uniform number (reproducible from the step's seed).
sample = register(Op(
    "sample", Kind.OPAQUE, _sample_infer, ref=_sample_ref, helpers=RNG_HELPERS,
    kernel_sizes=lambda g, n: {"R": _rows(g.shape(g.args(n)[0])), "C": g.shape(g.args(n)[0])[-1]},
    kernel="""\
xin = {x0}.reshape(({R}, {C}))
yout = {out}.reshape(-1)
for r in range({R}):
    m = xin[r, 0]
    for j in range(1, {C}):
        if xin[r, j] > m:
            m = xin[r, j]
    total = 0.0
    for j in range({C}):
        total += np.exp((xin[r, j] - m) / {temperature})
    # the seed is a scalar input, or a 0-d array inside a scan body (its per-step seed carry)
    u = _uniform(np.asarray({x1}).sum(), {salt}, r) * total
    acc = 0.0
    k = {C} - 1
    for j in range({C}):
        acc += np.exp((xin[r, j] - m) / {temperature})
        if acc > u:
            k = j
            break
    yout[r] = k
"""))
sample.grad = lambda g, n, dy: [None, None]


def _rows(shape):
    from .shapes import numel
    return numel(shape[:-1])
