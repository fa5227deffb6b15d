"""ONNX export (dlc IR -> ONNX, run by onnxruntime), import (ONNX -> .dl + checkpoint) and a
sample of the ONNX conformance suite (scripts/onnx_conformance.py runs all of it)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from compiler.api import compile_function  # noqa: E402
from compiler.onnx_export import RANDOM  # noqa: E402
from compiler.ops import evaluate  # noqa: E402
from compiler.shapes import DTYPES, resolve  # noqa: E402
from runtime import checkpoint  # noqa: E402
from runtime.cli import main  # noqa: E402
from runtime.onnx_io import eval_program, export_file, import_file, weights_of  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _reference(path, weights, batch: dict, rows: int, rng: int = 12345):
    """The evaluation program run by dlc's NumPy reference interpreter, and the noise it drew."""
    _, g = eval_program(path)
    feeds = {}
    for n in g.inputs:
        d = g[n]
        if d["attrs"]["kind"] == "data":
            # labels, unread by the outputs: zeros
            feeds[n] = batch[d["name"]] if d["name"] in batch else \
                np.zeros(resolve(d["shape"], {"B": rows}), DTYPES[d["dtype"]])
        elif d["attrs"]["kind"] == "scalar":
            feeds[n] = np.int64(rng)
        else:
            feeds[n] = weights[d["name"]]
    vals = evaluate(g, feeds)
    noise = [vals[n] for n in g.topo() if g.op(n) in RANDOM]
    return {k: vals[v] for k, v in g.outputs.items()}, noise


def _batch(sess, n=5, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in sess.get_inputs():
        if i.name.startswith("noise_"):
            continue
        shape = [n if isinstance(d, str) else d for d in i.shape]
        out[i.name] = (rng.standard_normal(shape).astype(np.float32) if "float" in i.type
                       else rng.integers(0, 10, shape).astype(np.int32))
    return out


# every example: vae, gan and diffusion draw noise, which becomes an input; a scan is an ONNX
# Scan (a Loop over range(n)), the decoders' argmax included
@pytest.mark.parametrize("name", ["mlp", "vae", "lstm_digits"] + [pytest.param(n, marks=pytest.mark.slow) for n in (
    "cnn", "lenet28", "vit_digits", "gpt", "gan", "diffusion", "gru_digits", "tagger", "seq2seq", "caption",
    "translate")])
def test_export_matches_dlc_reference(name, tmp_path):
    path = EXAMPLES / f"{name}.dl"
    prog, _ = eval_program(path)
    weights = weights_of(prog, None, seed=3)
    rng = np.random.default_rng(4)
    for k in prog.states:               # running statistics away from their initial 0 and 1
        weights[k] = rng.uniform(0.5, 2.0, weights[k].shape).astype(weights[k].dtype)
    ck = tmp_path / "w.safetensors"
    checkpoint.save(ck, {k: weights[k] for k in prog.params}, {k: weights[k] for k in prog.states}, {})
    model = export_file(path, str(ck), tmp_path / "m.onnx")
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    batch = _batch(sess, n=5)
    want, noise = _reference(path, weights, batch, rows=5)
    feeds = {**batch, **{f"noise_{k}": v for k, v in enumerate(noise)}}
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want[k]).max()))


@pytest.mark.slow
def test_export_matches_dlc_predict(tmp_path):
    """The exported CNN (conv, batch norm on running statistics, pooling) against the compiled
    evaluation program `dlc predict` runs, on held-out digits, from a checkpoint."""
    from runtime.session import Options, Session
    s = Session(EXAMPLES / "cnn.dl", Options(train=False))
    rng = np.random.default_rng(5)
    for v in list(s.params.values()) + list(s.state.values()):
        v[...] = rng.uniform(0.5, 1.5, v.shape) * np.where(rng.random(v.shape) < 0.5, -1, 1) * (v.std() or 1)
    for k in s.program.states:
        s.state[k][...] = np.abs(s.state[k])
    s.save(tmp_path / "ck.safetensors")
    assert main(["export", str(EXAMPLES / "cnn.dl"), "--load", str(tmp_path / "ck.safetensors"), "-o",
                 str(tmp_path / "cnn.onnx")]) == 0
    batch = {k: np.ascontiguousarray(v[:16]) for k, v in s.dataset.test.items()}
    want = s.run_eval(batch)["output"]
    got = ort.InferenceSession(str(tmp_path / "cnn.onnx")).run(None, {"x": batch["x"]})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_export_refuses_an_op_naming_the_line(tmp_path, capsys, dl_file):
    path = dl_file("""
model m(x: f32[B, 4]) -> f32[B, 4] {
    return x + 0 * cumsum(x, axis = 1)
}
""")
    from compiler import onnx_export
    saved = onnx_export.EXPORTERS.pop("cumsum")       # an op without an exporter entry
    try:
        assert main(["export", str(path), "-o", str(tmp_path / "m.onnx")]) == 2
    finally:
        onnx_export.EXPORTERS["cumsum"] = saved
    err = capsys.readouterr().err
    assert "cannot export op `cumsum`" in err and "model.dl:3:" in err
    assert not (tmp_path / "m.onnx").exists()


def _gemm_model():
    """x -> Gemm(W^T, b) -> Relu -> MatMul(V) -> Add(c) -> Softmax: written with onnx.helper."""
    rng = np.random.default_rng(1)
    W, b = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    V, c = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "V"], ["m"], name="fc2"),
             helper.make_node("Add", ["m", "c"], ["z"], name="fc2_bias"),
             helper.make_node("Softmax", ["z"], ["y"], axis=-1, name="prob")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(a, k) for k, a in dict(W=W, b=b, V=V, c=c).items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_import_recognises_dense_layers_and_runs(tmp_path, capsys):
    model = _gemm_model()
    onnx.save(model, tmp_path / "g.onnx")
    dl, ck = import_file(tmp_path / "g.onnx", tmp_path / "net.dl")
    text = dl.read_text()
    assert "model net(x: f32[N, 4])" in text
    assert text.count("dense(") == 2 and "softmax(" in text
    params, state, _ = checkpoint.load(ck)
    assert sorted(params) == ["net/dense_1/W", "net/dense_1/b", "net/dense_2/W", "net/dense_2/b"]
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "g.onnx")).run(None, {"x": x})[0]
    got = compile_function(str(dl), "net", dtype="f32", training=False)(x=x, **params)["output"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert main(["check", str(dl)]) == 0
    assert "4 parameter tensors" in capsys.readouterr().out


def test_import_unsupported_op_names_op_and_node(tmp_path, capsys):
    node = helper.make_node("Hardmax", ["x"], ["y"], name="pick_max")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "h.onnx")
    assert main(["import", str(tmp_path / "h.onnx"), "-o", str(tmp_path / "h.dl")]) == 2
    assert capsys.readouterr().err.strip() == "error: ONNX node `pick_max` (Hardmax): dlc does not support this op"
    assert not (tmp_path / "h.dl").exists()


@pytest.mark.slow
def test_round_trip_mlp_through_cli(tmp_path, capsys):
    """dlc export -> dlc import (with mlp.dl's train block) -> the same outputs, and the result
    is a .dl file like any other: `dlc run --load` fine-tunes it from the imported weights."""
    assert main(["export", "examples/mlp.dl", "-o", str(tmp_path / "mlp.onnx")]) == 0
    assert main(["import", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "back.dl"), "--train",
                 "examples/mlp.dl"]) == 0
    text = (tmp_path / "back.dl").read_text()
    assert text.count("dense(") == 3 and "train back on digits" in text
    params, _, _ = checkpoint.load(tmp_path / "back.safetensors")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "mlp.onnx")).run(None, {"x": x})[0]
    got = compile_function(str(tmp_path / "back.dl"), "back", dtype="f32", training=False)(x=x, **params)["output"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["run", str(tmp_path / "back.dl"), "--load", str(tmp_path / "back.safetensors"), "--epochs", "1",
                 "--quiet", "--json"]) == 0
    assert '"epochs": 1' in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "vit_digits", "gpt", "diffusion"])
def test_round_trip_examples(name, tmp_path):
    """export -> import -> compile: the imported .dl file computes what the exported model does
    (conv2d layers, batch norm and attention written out as primitives, a causal mask as state)."""
    export_file(EXAMPLES / f"{name}.dl", None, tmp_path / "m.onnx")
    dl, ck = import_file(tmp_path / "m.onnx", tmp_path / "back.dl")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    batch = _batch(sess, n=3)
    rng = np.random.default_rng(1)
    for i in sess.get_inputs():         # diffusion's draws (its timestep embedding casts a comparison: bool -> f32)
        if i.name.startswith("noise_"):
            batch[i.name] = rng.standard_normal([3 if isinstance(d, str) else d for d in i.shape]).astype(np.float32)
    want = sess.run(None, batch)[0]
    params, state, _ = checkpoint.load(ck)
    fn = compile_function(str(dl), "back", dtype="f32", training=False)
    got = fn(**batch, **params, **state)["output"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_conformance_cases_run_and_refusals_are_named():
    """Cases of the suite through scripts/onnx_conformance.py's runner (which runs them all)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import onnx_conformance as conf
    cases = {c.name: c for c in conf.cases("MaxPool")}      # (collecting one op's cases is quicker)
    assert conf.run_case(cases["test_maxpool_2d_precomputed_pads"]) == ("pass", "")
    assert conf.run_case(cases["test_maxpool_2d_default"]) == ("pass", "")
    status, why = conf.run_case(cases["test_maxpool_2d_ceil"])
    assert status == "refused" and "ceil_mode" in why


def test_a_causal_mask_constant_is_imported_as_an_expression():
    """A folded causal mask is written as `iota >= iota` (a fresh run of the imported file gets
    the mask, not state starting at zeros); any other boolean constant stays state."""
    from compiler.onnx_import import _band_mask
    r, c = np.indices((5, 5))
    assert _band_mask(r >= c) == "(iota([5, 5], 0) >= iota([5, 5], 1))"
    assert _band_mask((r - 1 >= c)[None, None]) == "reshape(iota([5, 5], 0) - 1 >= iota([5, 5], 1), [1, 1, 5, 5])"
    assert _band_mask(r == c) is None and _band_mask(np.ones((2, 3, 3), bool)) is None
    rr, cc = np.indices((3, 4))
    assert _band_mask(rr + 1 >= cc) == "(iota([3, 4], 0) + 1 >= iota([3, 4], 1))"


def test_a_greedy_decoders_argmax_round_trips(tmp_path, dl_file):
    """dlc exports its int32 argmax as ONNX's int64 ArgMax then a Cast to int32; importing that
    Cast is the identity (it was refused: i64 -> i32)."""
    p = dl_file("""model m(x: f32[B, 64]) -> f32[B, 10] {
    h = dense(x, 10)
    return h, argmax(h)
}
train m on digits(test = 0.2) {
    logits, tokens = m(x)
    loss = cross_entropy(logits, y)
}""")
    export_file(p, None, tmp_path / "m.onnx")
    dl, ck = import_file(tmp_path / "m.onnx", tmp_path / "back.dl")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})
    params, state, _ = checkpoint.load(ck)
    got = compile_function(str(dl), "back", dtype="f32", training=False)(x=x, **params, **state)
    np.testing.assert_allclose(got["output"], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["output2"], want[1])
