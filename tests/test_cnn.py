"""Convolutional networks and regularizers: dropout, train/eval modes, errors, the CNN example."""
import json

import numpy as np
import pytest

from compiler.api import compile_function
from compiler.ops import evaluate
from runtime.cli import main

DROP = """
model net(x: f32[B, 100]) -> f32[B, 100] {
    return dropout(x, 0.3)
}
"""


def test_dropout_rate_scaling_and_reproducibility():
    f = compile_function(DROP, dtype="f32", training=True)
    x = np.random.default_rng(0).uniform(1, 2, size=(100, 100)).astype(np.float32)
    y = f(x=x, rng=12345)["output"]
    assert y.dtype == np.float32
    dropped = y == 0
    assert abs(dropped.mean() - 0.3) < 0.015                       # the mask rate
    np.testing.assert_allclose(y[~dropped], x[~dropped] / 0.7, rtol=1e-6)   # inverted scaling
    assert np.array_equal(f(x=x, rng=12345)["output"], y)          # same seed, same mask
    other = f(x=x, rng=12346)["output"] == 0
    assert 0.15 < (dropped != other).mean() < 0.6                  # another step, another mask
    # the kernel's generator is the NumPy reference's, bit for bit
    g = f.graph
    feeds = {n: (x if g[n]["name"] == "x" else np.array(12345)) for n in g.inputs}
    np.testing.assert_array_equal(evaluate(g, feeds)[g.outputs["output"]] == 0, dropped)


def test_dropout_is_identity_in_evaluation():
    f = compile_function(DROP, dtype="f32", training=False)
    x = np.random.default_rng(1).normal(size=(4, 100)).astype(np.float32)
    assert np.array_equal(f(x=x)["output"], x)
    assert "rng" not in [i[0] for i in f.ex.inputs]


@pytest.mark.parametrize("body, words", [
    ("conv2d(x, 4, kernel = 11)", "error: conv2d: the kernel (11 rows) is larger than the input (8 rows)\n"),
    ("conv2d(x, 4, kernel = [3, 11])", "error: conv2d: the kernel (11 columns) is larger than the input (8 columns)\n"),
    ("max_pool2d(x, kernel = 11)", "error: max_pool2d: the kernel (11 rows) is larger than the input (8 rows)\n"),
    ("conv2d(x, 4, kernel = 9, padding = 0)", "larger than the input"),
    ("conv(x, zeros_w)", "the input has 1 channels [B, 1, 8, 8] but the kernel expects 3 [4, 3, 3, 3]"),
    ("dense(flatten(max_pool2d(conv2d(x, 4), 2)), 10) + dense(flatten(x), 10, name = \"d\")", None),
])
def test_conv_shape_errors(capsys, dl_file, body, words):
    head = "model m(x: f32[B, 1, 8, 8]) -> f32[B, 10] {\n    param zeros_w: [4, 3, 3, 3] = zeros\n"
    p = dl_file(head + f"    h = {body}\n    return dense(flatten(h), 10)\n}}\n"
                "train m on digits(shape = [1, 8, 8]) {\n    loss = cross_entropy(m(x), y)\n}\n")
    code = main(["check", str(p)])
    err = capsys.readouterr().err
    if words is None:
        assert code == 0, err
        return
    assert code == 2, err
    assert f"{p}:3:" in err and words in err


def test_flatten_into_a_dense_layer_of_the_wrong_size(capsys, dl_file):
    p = dl_file("""
def head(x: [N, 64]) {
    return dense(x, 10)
}
model m(x: f32[B, 1, 8, 8]) -> f32[B, 10] {
    h = max_pool2d(conv2d(x, 4), 2)
    return head(flatten(h))
}
train m on digits(shape = [1, 8, 8]) {
    loss = cross_entropy(m(x), y)
}
""")
    assert main(["check", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:7:" in err
    assert "argument `x` of `head` must be [N, 64], got f32[B, 36]" in err


def test_summary(capsys):
    assert main(["ir", "examples/cnn.dl", "--stage", "summary"]) == 0
    out = capsys.readouterr().out
    assert "conv2d_1 (conv2d)" in out and "[B, 16, 8, 8]" in out and "160" in out
    assert "batch_norm_1 (batch_norm)" in out and "(+32 state)" in out
    assert "total parameters: 13,802  (state: 96 values)" in out


def test_running_statistics_are_checkpointed(tmp_path, capsys):
    ck = tmp_path / "cnn.npz"
    assert main(["run", "examples/cnn.dl", "--epochs", "1", "--save", str(ck), "--json", "--quiet"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[-1])
    from runtime import checkpoint
    params, state, meta = checkpoint.load(ck)
    rv = state["cnn/batch_norm_1/running_var"]
    assert rv.shape == (16,) and not np.allclose(rv, 1.0)      # trained, not the initial ones
    assert main(["run", "examples/cnn.dl", "--epochs", "0", "--load", str(ck), "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert again["test"]["loss"] == pytest.approx(first["test"]["loss"], rel=1e-6)   # evaluation is deterministic


@pytest.mark.slow
def test_cnn_example_reaches_98_percent(capsys):
    assert main(["run", "examples/cnn.dl", "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert rep["test"]["accuracy"] >= 0.98, rep
