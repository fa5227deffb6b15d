"""Primitives for decoders and U-Nets: the transposed convolution.

`conv_transpose2d(x, w)` is the adjoint of `conv2d` with respect to its input: it spreads each
input pixel over a kernel-sized window of a larger output (weights `[in, out, kh, kw]`, as
torch.nn.ConvTranspose2d). It runs the same loop nest as `conv2d_grad_x` (one matmul and a
col2im per image), and its gradients are a `conv2d` (input) and a `conv2d_grad_w` (weights)
with the roles of input and output swapped.

Output size per axis: (in - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1 + output_padding.
"""
from __future__ import annotations

from .ops import OPS, Kind, Op, register
from .ops_nn import CONV_HELPERS, _conv_grad_x_ref, _conv_sizes, _pair, _spatial
from .shapes import FLOATS, ShapeError, fmt_shape

_GEOMETRY = ("stride", "padding", "dilation")


def _transposed_size(h, k, stride, pad, dil, extra, axis):
    out = (h - 1) * stride - 2 * pad + dil * (k - 1) + 1 + extra
    if out < 1:
        raise ShapeError(f"the padding ({pad}) leaves no output {axis}")
    if extra >= max(stride, dil):
        raise ShapeError(f"output_padding ({extra}) must be smaller than the stride or the "
                         f"dilation ({max(stride, dil)})")
    return out


def _conv_t_infer(s, d, a):
    x, w = s
    _spatial(x)
    if len(w) != 4:
        raise ShapeError(f"the weights are [in, out, kh, kw], got {fmt_shape(w)}")
    if x[1] != w[0]:
        raise ShapeError(f"the input has {x[1]} channels {fmt_shape(x)} but the kernel expects {w[0]} {fmt_shape(w)}")
    if d[0] != d[1] or d[0] not in FLOATS:
        raise ShapeError(f"the input and the weights must be float tensors of one dtype, got {d[0]} and {d[1]}")
    (sh, sw), (ph, pw), (dh, dw), (eh, ew) = (_pair(a[k]) for k in _GEOMETRY + ("output_padding",))
    ho = _transposed_size(x[2], w[2], sh, ph, dh, eh, "rows")
    wo = _transposed_size(x[3], w[3], sw, pw, dw, ew, "columns")
    return (x[0], w[1], ho, wo), d[0]


def _conv_t_ref(x, w, *, stride, padding, dilation, output_padding):
    (sh, sw), (ph, pw), (dh, dw), (eh, ew) = (_pair(v) for v in (stride, padding, dilation, output_padding))
    _, cout, kh, kw = w.shape
    h = (x.shape[2] - 1) * sh - 2 * ph + dh * (kh - 1) + 1 + eh
    wd = (x.shape[3] - 1) * sw - 2 * pw + dw * (kw - 1) + 1 + ew
    return _conv_grad_x_ref(x, w, x_shape=(x.shape[0], cout, h, wd), stride=stride, padding=padding,
                            dilation=dilation)


# The loop nest of conv2d_grad_x, with this op's input in the place of dy: sizes are named as
# for the convolution whose adjoint this is (its input is our output, its output our input).
conv_transpose2d = register(Op(
    "conv_transpose2d", Kind.OPAQUE, _conv_t_infer, ref=_conv_t_ref, helpers=CONV_HELPERS,
    kernel=OPS["conv2d_grad_x"].kernel, literal_sizes=OPS["conv2d_grad_x"].literal_sizes,
    kernel_sizes=lambda g, n: _conv_sizes(g, n, n, g.args(n)[1], g.args(n)[0]),
    user_name="conv_transpose"))


@conv_transpose2d.def_grad
def _(g, n, dy):
    x, w = g.args(n)
    geo = {k: g.attrs(n)[k] for k in _GEOMETRY}
    dx = g.add("conv2d", dy, w, **geo)
    dw = g.add("conv2d_grad_w", dy, x, w_shape=g.shape(w), **geo)
    return [dx, dw]
