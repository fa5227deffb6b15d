"""Make the golden cases of the layers added for issue 12, with PyTorch in float64.

The method of ../shared/golden's README: a seeded torch.Generator, leaves drawn from a standard
normal, the forward computed with torch.nn.functional, loss = sum(y * u) with a fixed random u,
`loss.backward()`, everything saved with numpy.savez (no pickles) beside a one-line `note`.
Names follow dlc's: `param.conv.W` is the parameter `net/conv/W` of a test model whose call is
named "conv"; weights keep PyTorch's layouts ([out, in, k...]; transposed convolution [in, out, kh, kw]).

    python tests/golden/make_golden.py          # rewrites the files below; needs torch
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).parent
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


class Leaves:
    """Leaves drawn in order from one seeded generator; float leaves require grad."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.leaves: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, *shape) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, dtype=torch.float64).requires_grad_(True)
        self.leaves[name] = t
        return t

    def finish(self, note: str, **outputs: torch.Tensor) -> dict:
        """loss = sum(y * u) over the single output; gradients of every leaf."""
        (name, y), = outputs.items()
        u = torch.randn(*y.shape, generator=self.gen, dtype=torch.float64)
        loss = (y * u).sum()
        loss.backward()
        out = {"note": np.array(note), "loss": loss.detach().numpy(), "upstream": u.numpy(),
               f"output.{name}": y.detach().numpy()}
        for k, t in self.leaves.items():
            out[k] = t.detach().numpy()
            out["grad." + k.split(".", 1)[1]] = t.grad.numpy()
        return out


@case
def conv1d():
    t = Leaves(101)
    x, w, b = t("input.x", 2, 3, 11), t("param.conv.W", 4, 3, 3), t("param.conv.b", 4)
    y = F.conv1d(x, w, b, stride=2, padding=1)
    return t.finish("y = F.conv1d(x, W, b, stride=2, padding=1); x [2, 3, 11]; W [4, 3, 3]", y=y)


@case
def conv2d_rect():
    t = Leaves(102)
    x, w, b = t("input.x", 2, 3, 7, 9), t("param.conv.W", 4, 3, 3, 2), t("param.conv.b", 4)
    y = F.conv2d(x, w, b, stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    return t.finish("y = F.conv2d(x, W, b, stride=(2, 1), padding=(1, 0), dilation=(1, 2)); W [4, 3, 3, 2]", y=y)


@case
def pool_rect():
    t = Leaves(103)
    x = t("input.x", 2, 3, 7, 8)
    m = F.max_pool2d(x, kernel_size=(2, 3), stride=(2, 1), padding=(1, 1))
    a = F.avg_pool2d(x, kernel_size=(3, 2), stride=(1, 2), padding=(1, 0))   # count_include_pad=True
    y = torch.cat([m.flatten(1), a.flatten(1)], dim=1)
    return t.finish("y = concat(flatten(F.max_pool2d(x, (2, 3), (2, 1), (1, 1))), "
                    "flatten(F.avg_pool2d(x, (3, 2), (1, 2), (1, 0)))) along axis 1", y=y)


@case
def conv_transpose2d():
    t = Leaves(104)
    x, w, b = t("input.x", 2, 3, 4, 5), t("param.up.W", 3, 2, 3, 3), t("param.up.b", 2)
    y = F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1)
    return t.finish("y = F.conv_transpose2d(x, W, b, stride=2, padding=1, output_padding=1); W [in 3, out 2, 3, 3]",
                    y=y)


@case
def conv_transpose2d_rect():
    t = Leaves(105)
    x, w, b = t("input.x", 2, 3, 4, 5), t("param.up.W", 3, 4, 2, 3), t("param.up.b", 4)
    y = F.conv_transpose2d(x, w, b, stride=(2, 1), padding=(0, 1), dilation=(1, 2))
    return t.finish("y = F.conv_transpose2d(x, W, b, stride=(2, 1), padding=(0, 1), dilation=(1, 2)); W [3, 4, 2, 3]",
                    y=y)


@case
def upsample_nearest():
    t = Leaves(106)
    x = t("input.x", 2, 3, 4, 5)
    y = F.interpolate(x, scale_factor=2, mode="nearest")
    return t.finish("y = F.interpolate(x, scale_factor=2, mode='nearest')", y=y)


@case
def group_norm():
    t = Leaves(107)
    x, gamma, beta = t("input.x", 2, 6, 3, 4), t("param.gn.gamma", 6), t("param.gn.beta", 6)
    y = F.group_norm(x, 3, gamma, beta, eps=1e-5)
    return t.finish("y = F.group_norm(x, 3 groups, gamma, beta, eps=1e-5); x [2, 6, 3, 4]", y=y)


@case
def global_avg_pool():
    t = Leaves(108)
    x = t("input.x", 2, 3, 4, 5)
    y = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return t.finish("y = F.adaptive_avg_pool2d(x, 1).flatten(1)", y=y)


@case
def residual():
    """A projecting residual block in training mode (batch statistics)."""
    t = Leaves(109)
    x = t("input.x", 4, 3, 6, 6)
    p = {}
    for name, cin, k in (("conv1", 3, 3), ("conv2", 5, 3), ("proj", 3, 1)):
        p[name] = (t(f"param.res.{name}.W", 5, cin, k, k), t(f"param.res.{name}.b", 5))
    for name in ("bn1", "bn2", "bn_proj"):
        p[name] = (t(f"param.res.{name}.gamma", 5), t(f"param.res.{name}.beta", 5))

    def bn(h, name):
        gamma, beta = p[name]
        return F.batch_norm(h, None, None, gamma, beta, training=True, eps=1e-5)

    h = F.relu(bn(F.conv2d(x, *p["conv1"], stride=2, padding=1), "bn1"))
    h = bn(F.conv2d(h, *p["conv2"], padding=1), "bn2")
    s = bn(F.conv2d(x, *p["proj"], stride=2), "bn_proj")
    y = F.relu(h + s)
    return t.finish("y = relu(bn2(conv2(relu(bn1(conv1(x, stride 2, pad 1))), pad 1)) "
                    "+ bn_proj(proj1x1(x, stride 2))), batch norms in training mode; 3 -> 5 channels", y=y)


def _bidirectional(kind: str, seed: int):
    """torch.nn.{RNN,LSTM,GRU}(bidirectional=True) with weights from dlc-layout leaves:
    Wx [I, G*H], Wh [H, G*H] per direction (torch's weight_ih is Wx.T); biases b (RNN, LSTM: as
    bias_ih, bias_hh zero) or bx, bh (GRU)."""
    from torch.func import functional_call
    t = Leaves(seed)
    n, steps, i, h = 2, 5, 3, 4
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[kind]
    x = t("input.x", n, steps, i)
    weights = {}
    for direction, suffix in (("fwd", ""), ("bwd", "_reverse")):
        p = f"param.{kind}.{direction}"
        weights[f"weight_ih_l0{suffix}"] = t(f"{p}.Wx", i, gates * h).T
        weights[f"weight_hh_l0{suffix}"] = t(f"{p}.Wh", h, gates * h).T
        if kind == "gru":
            weights[f"bias_ih_l0{suffix}"] = t(f"{p}.bx", gates * h)
            weights[f"bias_hh_l0{suffix}"] = t(f"{p}.bh", gates * h)
        else:
            weights[f"bias_ih_l0{suffix}"] = t(f"{p}.b", gates * h)
            weights[f"bias_hh_l0{suffix}"] = torch.zeros(gates * h, dtype=torch.float64)
    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    mod = cls(i, h, batch_first=True, bidirectional=True).double()
    y = functional_call(mod, weights, (x,))[0]
    return t.finish(f"y = torch.nn.{cls.__name__}({i}, {h}, batch_first=True, bidirectional=True)(x)[0], weights "
                    f"from dlc-layout leaves (weight_ih = Wx.T, ...); x [{n}, {steps}, {i}]", y=y)


@case
def rnn_bidirectional():
    return _bidirectional("rnn", 110)


@case
def lstm_bidirectional():
    return _bidirectional("lstm", 111)


@case
def gru_bidirectional():
    return _bidirectional("gru", 112)


def main():
    for name, fn in CASES.items():
        np.savez(HERE / f"{name}.npz", **fn())
        print("wrote", name)


if __name__ == "__main__":
    main()
