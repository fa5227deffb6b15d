"""The Transformer vocabulary of `dsl/stdlib/transformer.dl`.

- The golden cases `attention_causal` and `attention_cross` (PyTorch, float64) run through
  `multi_head_attention` itself, compiled: values, attention weights and every gradient.
- Each composite function (positions, attention, masks, encoder and decoder blocks, pre- and
  post-norm) is compared with an independent NumPy implementation, and its gradients with
  respect to the inputs and every parameter with central differences (NumPy evaluator).
- Misuse (an unknown option string) is one located error.
- Slow: `examples/vit_digits.dl` trains to its figure.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_ops import check_graph, rng

from compiler.api import compile_function, lower_function
from compiler.ops import evaluate
from dsl.diagnostics import DlcError
from runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"


def load(case: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{case}.npz") as d:
        return {k: d[k] for k in d.files}


def check(actual, expected, what: str) -> None:
    assert np.shape(actual) == np.shape(expected), f"{what}: shape {np.shape(actual)} != {np.shape(expected)}"
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-12, err_msg=what)


def golden_params(d: dict) -> dict:
    """`param.attn.Wq` -> the dlc parameter `net/attn/Wq`."""
    return {"net/" + k[len("param."):].replace(".", "/"): v for k, v in d.items() if k.startswith("param.")}


# ---- golden: torch.nn.MultiheadAttention, float64 ------------------------------------------------

CAUSAL = """
model net(ids: i64[B, 5], u: f64[B, 5, 8]) -> f64[] {
    x = embedding(ids, 11, 8, name = "embed")
    return sum(multi_head_attention(x, heads = 2, causal = true, name = "attn") * u)
}
"""

CAUSAL_OUT = """
model net(ids: i64[B, 5]) {
    x = embedding(ids, 11, 8, name = "embed")
    y, w = multi_head_attention(x, heads = 2, causal = true, returns = "weights", name = "attn")
    return concat([y, mean(w, axis = 1)])
}
"""


def test_golden_causal_self_attention():
    d = load("attention_causal")
    params = golden_params(d)
    out = compile_function(CAUSAL, grad=list(params))(ids=d["input.ids"], u=d["upstream"], **params)
    check(out["loss"], d["loss"], "loss")
    for name in params:
        key = "grad." + name[len("net/"):].replace("/", ".")
        check(out[f"grad:{name}"], d[key], key)
    y = compile_function(CAUSAL_OUT)(ids=d["input.ids"], **params)["output"]
    check(y[..., :8], d["output.y"], "output.y")
    check(y[..., 8:], d["output.weights_head_mean"], "output.weights_head_mean")


CROSS = """
model net(x_dec: f64[B, T, 8], x_enc: f64[B, S, 8], u: f64[B, T, 8]) -> f64[] {
    return sum(multi_head_attention(x_dec, x_enc, heads = 2, name = "attn") * u)
}
"""


def test_golden_cross_attention():
    d = load("attention_cross")
    params = golden_params(d)
    f = compile_function(CROSS, grad=["x_dec", "x_enc"] + list(params))
    out = f(x_dec=d["input.x_dec"], x_enc=d["input.x_enc"], u=d["upstream"], **params)
    check(out["loss"], d["loss"], "loss")
    check(out["grad:x_dec"], d["grad.x_dec"], "grad.x_dec")
    check(out["grad:x_enc"], d["grad.x_enc"], "grad.x_enc")
    for name in params:
        key = "grad." + name[len("net/"):].replace("/", ".")
        check(out[f"grad:{name}"], d[key], key)
    # the output itself: d sum(y * u) / du = y
    fy = compile_function(CROSS, grad=["u"])
    check(fy(x_dec=d["input.x_dec"], x_enc=d["input.x_enc"], u=d["upstream"], **params)["grad:u"],
          d["output.y"], "output.y")


# ---- independent NumPy references ---------------------------------------------------------------

def np_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_layer_norm(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["gamma"] + p["beta"]


def np_mha(x, kv, p, heads, mask=None):
    """torch.nn.MultiheadAttention (batch_first) with weights [in, out]; mask true = attend."""
    n, t, d = x.shape
    s, dh = kv.shape[1], d // heads
    q = (x @ p["Wq"] + p["bq"]).reshape(n, t, heads, dh)
    k = (kv @ p["Wk"] + p["bk"]).reshape(n, s, heads, dh)
    v = (kv @ p["Wv"] + p["bv"]).reshape(n, s, heads, dh)
    scores = np.einsum("nthd,nshd->nhts", q, k) / np.sqrt(dh)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    w = np_softmax(scores)
    o = np.einsum("nhts,nshd->nthd", w, v).reshape(n, t, d)
    return o @ p["Wo"] + p["bo"], w


def np_ffn(x, p, activation="relu"):
    h = x @ p["dense_1/W"] + p["dense_1/b"]
    h = np.maximum(h, 0) if activation == "relu" else 0.5 * h * (1 + _erf(h / np.sqrt(2)))
    return h @ p["dense_2/W"] + p["dense_2/b"]


def _erf(x):
    from scipy.special import erf
    return erf(x)


def np_causal(t):
    return np.tril(np.ones((t, t), bool))


def np_encoder(x, p, heads, norm, mask=None, activation="relu"):
    mha, ffn = p.sub("multi_head_attention_1"), p.sub("feed_forward_1")
    ln1, ln2 = p.sub("layer_norm_1"), p.sub("layer_norm_2")
    if norm == "pre":
        h = np_layer_norm(x, ln1)
        x = x + np_mha(h, h, mha, heads, mask)[0]
        return x + np_ffn(np_layer_norm(x, ln2), ffn, activation)
    x = np_layer_norm(x + np_mha(x, x, mha, heads, mask)[0], ln1)
    return np_layer_norm(x + np_ffn(x, ffn, activation), ln2)


def np_decoder(x, mem, p, heads, norm, memory_mask=None):
    sa, ca, ffn = p.sub("multi_head_attention_1"), p.sub("multi_head_attention_2"), p.sub("feed_forward_1")
    ln = [p.sub(f"layer_norm_{i}") for i in (1, 2, 3)]
    causal = np_causal(x.shape[1])
    if norm == "pre":
        h = np_layer_norm(x, ln[0])
        x = x + np_mha(h, h, sa, heads, causal)[0]
        x = x + np_mha(np_layer_norm(x, ln[1]), mem, ca, heads, memory_mask)[0]
        return x + np_ffn(np_layer_norm(x, ln[2]), ffn)
    x = np_layer_norm(x + np_mha(x, x, sa, heads, causal)[0], ln[0])
    x = np_layer_norm(x + np_mha(x, mem, ca, heads, memory_mask)[0], ln[1])
    return np_layer_norm(x + np_ffn(x, ffn), ln[2])


class Params(dict):
    """Parameter values by their path below a scope; `sub` looks inside a call's scope."""

    def sub(self, scope: str) -> "Params":
        return Params({k[len(scope) + 1:]: v for k, v in self.items() if k.startswith(scope + "/")})


def lowered(src: str, data: dict, seed: int = 0):
    """Lower `src` in f64 (model `m`), draw every parameter at random (scale ~1, so that the
    layer norms and softmaxes are far from saturation), and return
    (graph, output node, {input name: node}, all inputs, parameters below `m/<first call>`)."""
    _, prog = lower_function(src, dtype="f64")
    g = prog.graph
    r = rng(seed)
    values = {name: r.normal(scale=0.5, size=p.shape) for name, p in sorted(prog.params.items())}
    nodes = {g[n]["name"]: n for n in g.inputs}
    inputs = {**data, **values}
    assert set(nodes) == set(inputs), sorted(nodes)
    (scope,) = {name.split("/")[1] for name in values}
    return g, g.outputs["output"], nodes, inputs, Params(values).sub(f"m/{scope}")


def run_and_grad_check(src, data, seed=0):
    g, y, nodes, inputs, p = lowered(src, data, seed)
    out, _ = check_graph(g, y, nodes, inputs, rtol=1e-5, atol=1e-7)
    return out, p


# ---- positions --------------------------------------------------------------------------------------

def test_positional_encoding_is_the_sinusoid_table():
    f = compile_function("model m(x: f64[B, 7, 6]) { return sinusoidal_positions(x) }")
    x = rng(1).normal(size=(2, 7, 6))
    pos, i = np.arange(7)[:, None], np.arange(3)[None, :]
    table = np.zeros((7, 6))
    table[:, 0::2] = np.sin(pos / 10000 ** (2 * i / 6))
    table[:, 1::2] = np.cos(pos / 10000 ** (2 * i / 6))
    np.testing.assert_allclose(f(x=x)["output"], x + table, rtol=1e-12, atol=1e-14)


def test_learned_positions_add_a_trained_row_per_position():
    src = "model m(x: f64[2, 3, 4]) { return learned_positions(x, max_len = 5) }"
    x = rng(2).normal(size=(2, 3, 4))
    out, p = run_and_grad_check(src, {"x": x})
    np.testing.assert_allclose(out, x + p["P"][:3], rtol=1e-12)


# ---- attention ------------------------------------------------------------------------------------

def test_scaled_dot_product_attention_with_a_mask():
    src = """
model m(q: f64[2, 2, 3, 4], k: f64[2, 2, 5, 4], v: f64[2, 2, 5, 3], keep: f64[2, 1, 3, 5]) {
    return scaled_dot_product_attention(q, k, v, keep > 0.0)
}"""
    r = rng(3)
    q, k, v = r.normal(size=(2, 2, 3, 4)), r.normal(size=(2, 2, 5, 4)), r.normal(size=(2, 2, 5, 3))
    keep = np.where(r.uniform(size=(2, 1, 3, 5)) < 0.6, 1.0, -1.0)
    keep[..., 0] = 1.0                                   # every query sees some key
    g, y, nodes, inputs, _ = _lowered_plain(src, dict(q=q, k=k, v=v, keep=keep))
    out, _ = check_graph(g, y, nodes, inputs, rtol=1e-5, atol=1e-7)
    w = np_softmax(np.where(keep > 0, q @ k.transpose(0, 1, 3, 2) / 2.0, -np.inf))
    np.testing.assert_allclose(out, w @ v, rtol=1e-12)


def _lowered_plain(src, data):
    _, prog = lower_function(src, dtype="f64")
    g = prog.graph
    return g, g.outputs["output"], {g[n]["name"]: n for n in g.inputs}, data, None


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_self_attention(causal):
    src = f"model m(x: f64[2, 4, 6]) {{ return multi_head_attention(x, heads = 3, causal = {str(causal).lower()}) }}"
    x = rng(4).normal(size=(2, 4, 6))
    out, p = run_and_grad_check(src, {"x": x})
    np.testing.assert_allclose(out, np_mha(x, x, p, 3, np_causal(4) if causal else None)[0], rtol=1e-10)


def test_cross_attention_to_a_wider_memory_with_padding():
    """Queries of width 4 attend to a memory of width 6; keys whose id is negative are padding
    and get no weight, so the padded positions' values cannot change the output."""
    src = """
model m(x: f64[2, 3, 4], mem: f64[2, 5, 6], ids: i32[2, 5]) {
    return multi_head_attention(x, mem, heads = 2, mask = padding_mask(ids))
}"""
    r = rng(5)
    x, mem = r.normal(size=(2, 3, 4)), r.normal(size=(2, 5, 6))
    ids = np.array([[3, 1, 4, -1, -1], [1, 5, 9, 2, 6]], np.int32)
    out, p = run_and_grad_check(src, {"x": x, "mem": mem, "ids": ids})
    np.testing.assert_allclose(out, np_mha(x, mem, p, 2, (ids >= 0)[:, None, None, :])[0], rtol=1e-10)
    mem2 = mem.copy()
    mem2[0, 3:] = 100.0
    g, y, nodes, inputs, _ = lowered(src, {"x": x, "mem": mem2, "ids": ids})
    np.testing.assert_allclose(evaluate(g, {nodes[k]: v for k, v in inputs.items()})[y], out, rtol=1e-12)


def test_attention_dropout_drops_weights_only_in_training():
    src = "model m(x: f64[B, 4, 8]) { return multi_head_attention(x, heads = 2, dropout = 0.5) }"
    x = rng(6).normal(size=(3, 4, 8))
    _, train = lower_function(src, dtype="f64")
    _, infer = lower_function(src, dtype="f64", training=False)
    assert "rand_uniform" in {train.graph.op(n) for n in train.graph.nodes()}
    assert "rand_uniform" not in {infer.graph.op(n) for n in infer.graph.nodes()}
    f = compile_function(src, training=False)
    names = sorted(f.params)
    r = rng(7)
    params = {n: r.normal(scale=0.5, size=f.params[n].shape) for n in names}
    p = Params(params).sub("m/multi_head_attention_1")
    np.testing.assert_allclose(f(x=x, **params)["output"], np_mha(x, x, p, 2)[0], rtol=1e-10)


def test_no_mask_costs_nothing():
    """`mask = true` (the default) is folded away at compile time: no `where` in the graph."""
    _, prog = lower_function("model m(x: f64[B, 4, 8]) { return multi_head_attention(x, heads = 2) }", dtype="f64")
    ops = {prog.graph.op(n) for n in prog.graph.nodes()}
    assert "where" not in ops and "softmax" in ops


# ---- blocks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["pre", "post"])
def test_encoder_block(norm):
    src = f"""
model m(x: f64[2, 3, 4]) {{
    return transformer_encoder_block(x, heads = 2, ff = 6, norm = "{norm}")
}}"""
    x = rng(8).normal(size=(2, 3, 4))
    out, p = run_and_grad_check(src, {"x": x})
    np.testing.assert_allclose(out, np_encoder(x, p, 2, norm), rtol=1e-10)


def test_encoder_block_causal_with_padding_and_gelu():
    src = """
model m(x: f64[2, 4, 4], ids: i32[2, 4]) {
    return transformer_encoder_block(x, heads = 2, ff = 5, mask = padding_mask(ids), causal = true,
                                     activation = "gelu")
}"""
    x = rng(9).normal(size=(2, 4, 4))
    ids = np.array([[1, 2, -1, -1], [4, 3, 2, 1]], np.int32)
    out, p = run_and_grad_check(src, {"x": x, "ids": ids})
    mask = np_causal(4) & (ids >= 0)[:, None, None, :]
    np.testing.assert_allclose(out, np_encoder(x, p, 2, "pre", mask, "gelu"), rtol=1e-10)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_decoder_block(norm):
    src = f"""
model m(x: f64[2, 3, 4], mem: f64[2, 5, 4], ids: i32[2, 5]) {{
    return transformer_decoder_block(x, mem, heads = 2, ff = 6, memory_mask = padding_mask(ids),
                                     norm = "{norm}")
}}"""
    r = rng(10)
    x, mem = r.normal(size=(2, 3, 4)), r.normal(size=(2, 5, 4))
    ids = np.array([[1, 2, 3, -1, -1], [4, 3, 2, 1, 0]], np.int32)
    out, p = run_and_grad_check(src, {"x": x, "mem": mem, "ids": ids})
    np.testing.assert_allclose(out, np_decoder(x, mem, p, 2, norm, (ids >= 0)[:, None, None, :]), rtol=1e-10)


def test_the_options_are_checked():
    src = """
model m(x: f32[B, 3, 4]) {
    return transformer_encoder_block(x, heads = 2, norm = "middle")
}"""
    with pytest.raises(DlcError) as err:
        lower_function(src, filename="net.dl")
    e = err.value
    assert '`norm` must be one of "pre", "post", got "middle"' in e.message
    assert (e.loc.file, e.loc.line, e.loc.col) == ("net.dl", 3, 12)


def test_a_bad_option_is_one_located_error_with_status_2(tmp_path, capsys):
    path = tmp_path / "bad.dl"
    path.write_text("""model m(x: f32[B, 8, 8]) -> f32[B, 8, 8] {
    return multi_head_attention(x, heads = 2, returns = "both")
}
""")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"bad\.dl:2:12: error: `returns` must be one of \"output\", \"weights\", got \"both\"", err)
    assert "Traceback" not in err


@pytest.mark.parametrize("call, words", [
    ("transformer_encoder_block(x, heads = 3)", "heads (3) must divide the model width (10)"),  # was a raw reshape
    ("multi_head_attention(x, heads = 4)", "heads (4) must divide the model width (10)"),
    ("multi_head_attention(x, heads = 0)", "heads must be a positive integer, got the number 0"),
])
def test_heads_must_divide_the_width(tmp_path, capsys, call, words):
    path = tmp_path / "heads.dl"
    path.write_text(f"model m(x: f32[B, 6, 10]) -> f32[B, 6, 10] {{\n    return {call}\n}}\n")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:2:12: error: {words}\n"), err
    assert err.splitlines()[2].strip().startswith("^") and "reshape" not in err, err


# ---- the number-words task (runtime/data.py) --------------------------------------------------------

def test_number_words_read_back_to_every_number():
    from runtime.data import NUMBER_WORDS, ONES, TENS, number_words
    value = {w: i for i, w in enumerate(ONES)} | {w: 10 * i for i, w in enumerate(TENS) if w}

    def read(words):                      # an independent reader: units, x100, x1000
        total = part = 0
        for w in words:
            if w == "thousand":
                total, part = total + part * 1000, 0
            elif w == "hundred":
                part *= 100
            else:
                part += value[w]
        return total + part

    texts = [number_words(k) for k in range(10000)]
    assert all(read(t) == k for k, t in enumerate(texts))
    assert len({" ".join(t) for t in texts}) == 10000
    assert {w for t in texts for w in t} == set(NUMBER_WORDS)
    assert " ".join(number_words(3042)) == "three thousand forty two"


# ---- the example ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_vit_digits_reaches_its_figure(capsys):
    assert main(["run", str(ROOT / "examples" / "vit_digits.dl"), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["test"]["accuracy"] >= 0.97, report
