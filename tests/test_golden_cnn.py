"""Golden cases for convolutional networks and normalization: dlc against PyTorch (float64)."""
from __future__ import annotations

import numpy as np
import pytest

from compiler.api import compile_function

from test_golden import check, load


def params_of(d: dict, model: str = "net") -> dict:
    return {f"{model}/" + k[6:].replace(".", "/"): v for k, v in d.items() if k.startswith("param.")}


def check_grads(out: dict, d: dict, model: str = "net"):
    for k, v in d.items():
        if k.startswith("grad."):
            name = k[5:]
            key = "grad:" + (name if name in ("x",) else f"{model}/" + name.replace(".", "/"))
            check(out[key], v, k)


CNN = """
model net(x: f64[B, 3, 9, 9], y: i32[B]) -> f64[] {
    h = relu(conv2d(x, 4, kernel = 3, stride = 2, padding = 1, name = "conv"))
    h = max_pool2d(h, 2)
    return cross_entropy(dense(flatten(h), 5, name = "dense"), y)
}
"""

CNN_OUTPUTS = """
model net(x: f64[B, 3, 9, 9]) -> f64[B, 5] {
    c = conv2d(x, 4, kernel = 3, stride = 2, padding = 1, name = "conv")
    return dense(flatten(max_pool2d(relu(c), 2)), 5, name = "dense")
}
"""


@pytest.mark.parametrize("fuse", [True, False])
def test_cnn_maxpool(fuse):
    d = load("cnn_maxpool")
    p = params_of(d)
    f = compile_function(CNN, grad=["x"] + list(p), fuse=fuse)
    out = f(x=d["input.x"], y=d["input.y"], **p)
    check(out["loss"], d["loss"], "loss")
    check_grads(out, d)
    logits = compile_function(CNN_OUTPUTS, fuse=fuse)(x=d["input.x"], **p)["output"]
    check(logits, d["output.logits"], "logits")


def test_conv_avgpool():
    d = load("conv_avgpool")
    src = """
model net(x: f64[B, 3, 8, 8], u: f64[B, 4, 3, 3]) -> f64[] {
    param W: [4, 3, 3, 3] = zeros
    return sum(avg_pool2d(conv(x, W), 2) * u)
}
"""
    f = compile_function(src, grad=["x", "net/W"])
    out = f(x=d["input.x"], u=d["upstream"], **{"net/W": d["param.conv.W"]})
    check(out["loss"], d["loss"], "loss")
    check(out["grad:x"], d["grad.x"], "grad.x")
    check(out["grad:net/W"], d["grad.conv.W"], "grad.conv.W")
    y = compile_function(src.replace("-> f64[] {", "-> f64[B, 4, 3, 3] {").replace(
        "sum(avg_pool2d(conv(x, W), 2) * u)", "avg_pool2d(conv(x, W), 2)"))(x=d["input.x"], u=d["upstream"],
                                                                               **{"net/W": d["param.conv.W"]})
    check(y["output"], d["output.y"], "output.y")


@pytest.mark.parametrize("case, shape", [("batchnorm1d", "B, 4"), ("batchnorm2d", "B, 3, 5, 5")])
def test_batch_norm_training(case, shape):
    d = load(case)
    src = f"""
model net(x: f64[{shape}], u: f64[{shape}]) -> f64[] {{
    return sum(batch_norm(x, name = "bn") * u)
}}
"""
    p = params_of(d)
    f = compile_function(src, grad=["x"] + list(p), training=True)
    out = f(x=d["input.x"], u=d["upstream"], **p, **{"net/bn/running_mean": np.zeros(p["net/bn/gamma"].shape),
                                                      "net/bn/running_var": np.ones(p["net/bn/gamma"].shape)})
    check(out["loss"], d["loss"], "loss")
    check_grads(out, d)
    if "running_mean" in d:            # the running statistics after one step (unbiased variance)
        check(out["state:net/bn/running_mean"], d["running_mean"], "running_mean")
        check(out["state:net/bn/running_var"], d["running_var"], "running_var")


def test_batch_norm_evaluation_uses_running_statistics():
    src = """
model net(x: f64[B, 3]) -> f64[B, 3] {
    return batch_norm(x, name = "bn")
}
"""
    f = compile_function(src, training=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3))
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2, size=3)
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    out = f(x=x, **{"net/bn/gamma": gamma, "net/bn/beta": beta, "net/bn/running_mean": mean,
                    "net/bn/running_var": var})["output"]
    check(out, (x - mean) / np.sqrt(var + 1e-5) * gamma + beta, "eval batch norm")
    assert not any(k.startswith("state:") for k in f.ex.outputs)     # evaluation changes no state


def test_layer_norm():
    d = load("layernorm")
    src = """
model net(x: f64[B, 4, 8], u: f64[B, 4, 8]) -> f64[] {
    return sum(layer_norm(x, name = "ln") * u)
}
"""
    p = params_of(d)
    out = compile_function(src, grad=["x"] + list(p))(x=d["input.x"], u=d["upstream"], **p)
    check(out["loss"], d["loss"], "loss")
    check_grads(out, d)
