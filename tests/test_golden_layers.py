"""Golden cases for the layers of issue 12 (dsl/stdlib/layers.dl, conv_transpose2d, rectangular
convolutions and pooling): dlc against PyTorch in float64 (tests/golden/make_golden.py).

Each model computes loss = sum(y * u) with u an input, so one compiled function checks the
forward values too: d loss / d u = y.
"""
from __future__ import annotations

import numpy as np
import pytest

from compiler.api import compile_function

from test_golden import check, load

CASES = {   # golden case -> the layer applied to x, as a .dl expression
    "conv1d": "conv1d(x, 4, kernel = 3, stride = 2, padding = 1, name = \"conv\")",
    "conv2d_rect": "conv2d(x, 4, kernel = [3, 2], stride = [2, 1], padding = [1, 0], dilation = [1, 2], "
                   "name = \"conv\")",
    "pool_rect": "concat([flatten(max_pool2d(x, kernel = [2, 3], stride = [2, 1], padding = [1, 1])), "
                 "flatten(avg_pool2d(x, kernel = [3, 2], stride = [1, 2], padding = [1, 0]))], axis = 1)",
    "conv_transpose2d": "conv_transpose2d(x, 2, kernel = 3, stride = 2, padding = 1, output_padding = 1, "
                        "name = \"up\")",
    "conv_transpose2d_rect": "conv_transpose2d(x, 4, kernel = [2, 3], stride = [2, 1], padding = [0, 1], "
                             "dilation = [1, 2], name = \"up\")",
    "upsample_nearest": "upsample(x)",
    "group_norm": "group_norm(x, 3, name = \"gn\")",
    "global_avg_pool": "global_avg_pool(x)",
    "residual": "residual(x, 5, stride = 2, name = \"res\")",
    "rnn_bidirectional": "rnn(x, 4, bidirectional = true, name = \"rnn\")",
    "lstm_bidirectional": "lstm(x, 4, bidirectional = true, name = \"lstm\")",
    "gru_bidirectional": "gru(x, 4, bidirectional = true, name = \"gru\")",
}


def _dims(shape):
    return ", ".join(["B", *map(str, shape[1:])])


# Fusing group norm's backward graph once made a cycle between kernels (fusion now checks
# legality on the graph of kernels): both the fused and the unfused program are checked.
PARAMS = [pytest.param(c, True) for c in CASES]
PARAMS.append(pytest.param("group_norm", False, id="group_norm-unfused"))


@pytest.mark.parametrize("case, fuse", PARAMS)
def test_layer_against_pytorch(case, fuse):
    d = load(case)
    params = {"net/" + k[6:].replace(".", "/"): v for k, v in d.items() if k.startswith("param.")}
    src = f"""
model net(x: f64[{_dims(d['input.x'].shape)}], u: f64[{_dims(d['upstream'].shape)}]) -> f64[] {{
    return sum({CASES[case]} * u)
}}
"""
    f = compile_function(src, grad=["x", "u", *params], fuse=fuse)
    missing = set(params) - set(f.params)
    assert not missing, f"the golden case has parameters the model lacks: {missing}"
    out = f(x=d["input.x"], u=d["upstream"], **params, **_fresh_state(f))
    check(out["loss"], d["loss"], f"{case}: loss")
    check(out["grad:u"], d["output.y"], f"{case}: output")
    check(out["grad:x"], d["grad.x"], f"{case}: grad.x")
    for name in params:
        check(out[f"grad:{name}"], d["grad." + name[4:].replace("/", ".")], f"{case}: grad of {name}")


def _fresh_state(f):
    """Batch-norm running statistics at their initial values (zeros and ones)."""
    return {name: (np.ones if name.endswith("running_var") else np.zeros)(shape)
            for name, kind, shape, _ in f.ex.inputs if kind == "state"}
