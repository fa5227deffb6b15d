"""Golden cases: dlc against reference values computed by PyTorch in float64.

The reference files live in `tests/golden/` (see its README): each holds the leaves
(`input.*`, `param.*`), the forward values (`output.*`), the `loss` and every gradient
(`grad.*`). Each test builds the same computation in a `.dl` model and compares in float64.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compiler.api import compile_function, compile_train_step
from compiler.lower import OptimizerSpec

GOLDEN = Path(__file__).parent / "golden"
RTOL, ATOL = 1e-6, 1e-12


def load(case: str) -> dict[str, np.ndarray]:
    path = GOLDEN / f"{case}.npz"
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def check(actual, expected, what: str) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)


# ---- MLP: dense -> relu -> dense -> softmax cross-entropy ------------------------------------

MLP = """
model net(x: f64[B, 5], y: i32[B]) -> f64[] {
    h = relu(dense(x, 7, name = "dense1"))
    return cross_entropy(dense(h, 3, name = "dense2"), y)
}
"""

MLP_LOGITS = """
model net(x: f64[B, 5]) -> f64[B, 3] {
    h = relu(dense(x, 7, name = "dense1"))
    return dense(h, 3, name = "dense2")
}
"""

MLP_PARAMS = ["dense1.W", "dense1.b", "dense2.W", "dense2.b"]


def _dl(name: str) -> str:
    """Golden parameter name (`dense1.W`) -> dlc parameter name (`net/dense1/W`)."""
    return "net/" + name.replace(".", "/")


def test_mlp():
    d = load("mlp")
    params = {_dl(n): d[f"param.{n}"] for n in MLP_PARAMS}
    f = compile_function(MLP, grad=["x"] + list(params))
    out = f(x=d["input.x"], y=d["input.y"].astype(np.int32), **params)
    check(out["loss"], d["loss"], "loss")
    check(out["grad:x"], d["grad.x"], "grad.x")
    for n in MLP_PARAMS:
        check(out[f"grad:{_dl(n)}"], d[f"grad.{n}"], f"grad.{n}")

    fwd = compile_function(MLP_LOGITS)
    logits = fwd(x=d["input.x"], **params)["output"]
    check(logits, d["output.logits"], "output.logits")
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    check(e / e.sum(axis=-1, keepdims=True), d["output.probs"], "output.probs")


# ---- activations: y = act(x), loss = sum(y * u) ----------------------------------------------

ACTIVATIONS = {            # golden case -> dlc expression in x
    "relu": "relu(x)",
    "sigmoid": "sigmoid(x)",
    "tanh": "tanh(x)",
    "softmax": "softmax(x)",
    "log_softmax": "log_softmax(x)",
    "gelu_tanh": "gelu_tanh(x)",
    "gelu_erf": "gelu(x)",
    "exp": "exp(x)",
    "softplus": "softplus(x)",
    "leaky_relu_0.1": "leaky_relu(x, 0.1)",
    "elu": "elu(x)",
    "silu": "silu(x)",
}


@pytest.mark.parametrize("case", list(ACTIVATIONS))
def test_activation(case):
    d = load(f"act_{case}")
    expr = ACTIVATIONS[case]
    x, u = d["input.x"], d["upstream"]
    shape = ", ".join(map(str, x.shape))

    loss_fn = compile_function(
        f"model f(x: f64[{shape}], u: f64[{shape}]) -> f64[] {{ return sum({expr} * u) }}", grad=["x"])
    out = loss_fn(x=x, u=u)
    check(out["loss"], d["loss"], "loss")
    check(out["grad:x"], d["grad.x"], "grad.x")

    fwd = compile_function(f"model f(x: f64[{shape}]) -> f64[{shape}] {{ return {expr} }}")
    check(fwd(x=x)["output"], d["output.y"], "output.y")


# ---- losses ----------------------------------------------------------------------------------

LOSSES = {                 # golden case -> (dlc loss, input that gets a gradient)
    "loss_mse": ("mse(pred, target)", "pred"),
    "loss_bce_logits": ("bce_with_logits(logits, target)", "logits"),
}


@pytest.mark.parametrize("case", list(LOSSES))
def test_loss(case):
    d = load(case)
    expr, wrt = LOSSES[case]
    n = d[f"input.{wrt}"].shape[-1]         # batch dimension symbolic, as in a real model
    f = compile_function(f"model f({wrt}: f64[B, {n}], target: f64[B, {n}]) -> f64[] {{ return {expr} }}",
                         grad=[wrt])
    out = f(**{wrt: d[f"input.{wrt}"], "target": d["input.target"]})
    check(out["loss"], d["loss"], "loss")
    check(out[f"grad:{wrt}"], d[f"grad.{wrt}"], f"grad.{wrt}")


# ---- optimizers: three steps on loss = sum((p - target)**2 * weight) -------------------------

OPTIM_MODEL = """
model f(target: f64[5], weight: f64[5]) -> f64[] {
    param p: [5] = zeros
    return sum((p - target) ** 2 * weight)
}
"""

# The golden files do not record the hyper-parameters: these were recovered from the data by
# searching a grid of plausible values with an independent NumPy re-implementation of
# torch.optim (`_torch_reference` below); each is the unique setting on that grid that
# reproduces `steps` to 1e-12. Adam's betas/eps (.9/.999, 1e-8) are stated in the files' note.
OPTIMIZERS = {
    "sgd": dict(name="sgd", lr=0.1),
    "sgd_momentum": dict(name="sgd", lr=0.1, momentum=0.9),
    "sgd_nesterov": dict(name="sgd", lr=0.1, momentum=0.9, nesterov=True),
    "sgd_l2": dict(name="sgd", lr=0.1, weight_decay=0.01),
    "adam": dict(name="adam", lr=0.1),
    "adam_l2": dict(name="adam", lr=0.1, weight_decay=0.01),
    "adamw": dict(name="adamw", lr=0.1, weight_decay=0.01),
    "rmsprop": dict(name="rmsprop", lr=0.01, alpha=0.99),
}


def _torch_reference(p0, target, weight, name, lr, momentum=0.0, nesterov=False, weight_decay=0.0,
                     alpha=0.99, beta1=0.9, beta2=0.999, eps=1e-8, steps=3):
    """torch.optim's update rules, in NumPy (to check the recovered hyper-parameters)."""
    p, buf = p0.copy(), None
    m, v = np.zeros_like(p), np.zeros_like(p)
    out = []
    for t in range(1, steps + 1):
        g = 2 * (p - target) * weight
        if name == "adamw":
            p = p * (1 - lr * weight_decay)
        elif weight_decay:
            g = g + weight_decay * p
        if name == "sgd":
            if momentum:
                buf = g.copy() if buf is None else momentum * buf + g
                g = g + momentum * buf if nesterov else buf
            p = p - lr * g
        elif name in ("adam", "adamw"):
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            p = p - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps)
        elif name == "rmsprop":
            v = alpha * v + (1 - alpha) * g * g
            p = p - lr * g / (np.sqrt(v) + eps)
        out.append(p.copy())
    return np.array(out)


@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_optimizer_hyperparameters(case):
    """The recovered hyper-parameters reproduce the golden steps (independently of dlc)."""
    d = load(f"optim_{case}")
    ref = _torch_reference(d["p0"], d["target"], d["weight"], **OPTIMIZERS[case])
    np.testing.assert_allclose(ref, d["steps"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_optimizer(case):
    d = load(f"optim_{case}")
    hp = dict(OPTIMIZERS[case])
    spec = OptimizerSpec(hp.pop("name"), hp.pop("lr"), decay="all", **hp)   # p is 1-D: decay it too
    step = compile_train_step(OPTIM_MODEL, spec)
    step.params["f/p"] = d["p0"].copy()
    p = d["p0"]
    for i, expected in enumerate(d["steps"]):
        loss = step(target=d["target"], weight=d["weight"])
        check(loss, np.sum((p - d["target"]) ** 2 * d["weight"]), f"loss at step {i + 1}")
        p = step.params["f/p"].copy()
        check(p, expected, f"p after step {i + 1}")
