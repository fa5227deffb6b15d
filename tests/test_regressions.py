"""Regression tests for the bugs a new user met in the first hour (issue 7, "Bad input").

Each test reproduces one reported bug with a minimal `.dl` file: the fix is either correct
behaviour (checked against an independent NumPy computation) or one located error, exit 2.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from compiler.api import compile_function, lower_function
from runtime.cli import main
from runtime.session import Options, Session

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def located_error(capsys, path, *argv, cmd="check"):
    """Run `dlc CMD path`; expect exit 2 and one located message. Returns the message."""
    code = main([cmd, str(path), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith(f"{path}:"), err
    lines = err.splitlines()
    assert lines[2].strip().startswith("^"), err
    return err


# ---- numbers-only arithmetic folds at compile time ---------------------------------------------
def test_builtins_on_numbers_fold_to_numbers():
    src = """
model f(x: f64[3]) -> f64[3] {
    return x / sqrt(2) + exp(1.0) * 2 * 3 - abs(-4) + maximum(1, 2.5) + erf(0.5) + tanh(0.3)
}
"""
    _, prog = lower_function(src, "f")          # folded in the front end, before any pass
    ops = {prog.graph.op(n) for n in prog.graph.topo()}
    assert not ops & {"sqrt", "exp", "abs", "maximum", "erf", "tanh"}, ops
    f = compile_function(src, "f")
    x = np.array([1.0, -2.0, 0.5])
    want = x / math.sqrt(2) + math.e * 6 - 4 + 2.5 + math.erf(0.5) + math.tanh(0.3)
    np.testing.assert_allclose(f(x=x)["output"], want, rtol=1e-14)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_gelu_and_divide_by_sqrt_train(act, dl_file):
    """`x / sqrt(2)` (stdlib gelu, attention's / sqrt(dh)) used to crash the fusion pass."""
    p = dl_file(f"""
model m(x: f32[B, 64]) -> f32[B, 10] {{
    h = {act}(dense(x, 32))
    return dense(h / sqrt(32), 10)
}}
train m on digits() {{
    loss = cross_entropy(m(x), y)
    optimizer = adam(lr = 0.01)
    epochs = 2
}}
""")
    rep = Session(p).fit(progress=False)
    assert rep["test"]["accuracy"] > 0.5


# ---- --dtype f64 -----------------------------------------------------------------------------------
def test_f64_run_matches_f32(capsys):
    mlp = EXAMPLES / "mlp.dl"
    reports = {}
    for dt in ("f32", "f64"):
        assert main(["run", str(mlp), "--dtype", dt, "--epochs", "2", "--json", "--quiet"]) == 0
        reports[dt] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    a, b = reports["f32"]["test"], reports["f64"]["test"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.01)


# ---- data sources take positional arguments ---------------------------------------------------------
def _source(text, base_dir, seed=0):
    from dsl.parser import parse
    from runtime import data
    module = parse(f"model m(x: f32[B, 4]) -> f32[B, 4] {{\n    return x\n}}\ntrain m on {text} {{\n"
                   "    loss = mean(m(x))\n}\n", str(base_dir / "t.dl"))
    train = next(it for it in module.items if type(it).__name__ == "TrainDef")
    return data.load(train.data, base_dir, seed)


def test_data_sources_take_positional_arguments(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "f.npz", features=X, labels=y)
    (tmp_path / "f.csv").write_text("a,b,c,d,species\n" + "".join(
        ",".join(map(str, r)) + f",{k}\n" for r, k in zip(X.tolist(), y)))
    d = _source("digits(0.3)", tmp_path)
    assert d.info["test_size"] == pytest.approx(0.3 * 1797, abs=1)
    t = _source("tagging(200, 12, 20)", tmp_path)
    assert t.train["x"].shape[1] == 12 and t.train["x"].max() <= 20 and t.info["train_size"] == 160
    for text in ('csv("f.csv", "species")', 'npz("f.npz", "features", "labels")'):
        ds = _source(text, tmp_path)
        xs = np.concatenate([ds.train["x"], ds.test["x"]])
        ys = np.concatenate([ds.train["y"], ds.test["y"]])
        assert xs.shape == (50, 4) and sorted(ys.tolist()) == sorted(y.tolist())
    assert _source('npz("f.npz", "features", "labels")', tmp_path).train["y"].tolist() == \
        _source('npz("f.npz", x = "features", y = "labels")', tmp_path).train["y"].tolist()


@pytest.mark.parametrize("text, words", [
    ("digits(0.3, test = 0.2)", "`digits`: option `test` given twice"),
    ("tagging(1, 2, 3, 0.2, false, 7)", "`tagging` takes at most 5 positional arguments (n, length, vocab, test, scale)"),
    ("csv()", "`csv` is missing `path`"),
    ('csv("f.csv", 2.5)', "`label` is a column name or index"),
    ('csv("f.csv", 9)', "there is no column 9"),
    ("digits(scale = 3)", "`scale` is true or false"),
])
def test_data_source_argument_errors(capsys, dl_file, tmp_path, text, words):
    (tmp_path / "f.csv").write_text("a,b,c,d,label\n1,2,3,4,0\n5,6,7,8,1\n")
    p = dl_file(f"model m(x: f32[B, 4]) -> f32[B, 4] {{\n    return x\n}}\ntrain m on {text} {{\n"
                "    loss = mean(m(x))\n}\n")
    err = located_error(capsys, p)
    assert words in err and f"{p}:4:" in err


# ---- indices are checked before any kernel reads them ---------------------------------------------
EMBED = """model m(x: i32[B, 12]) -> f32[B, 12, 2] {
    h = embedding(x, 20, 16)
    return dense(h, 2)
}
train m on tagging(200, 12, 20) {
    loss = cross_entropy(m(x), y)
}
"""


@pytest.mark.parametrize("cmd", ["check", "run"])
def test_embedding_ids_beyond_the_table_are_a_data_error(capsys, dl_file, cmd):
    """Ids 1..20 into a 20-row table used to corrupt memory (double free) after a few epochs."""
    p = dl_file(EMBED)
    err = located_error(capsys, p, cmd=cmd)
    assert f"{p}:2:9:" in err and "embedding(x, 20, 16)" in err
    assert "`x` from `tagging(200, 12, 20)` holds the id 20" in err
    assert "`m/embedding_1/E` [20, 16] has 20 rows (ids 0 to 19)" in err
    assert f"the data source is at {p}:5:12" in err


def test_embedding_ids_in_range_train(dl_file):
    rep = Session(dl_file(EMBED.replace("20, 16", "21, 16"))).fit(progress=False)
    assert math.isfinite(rep["test"]["loss"])


def test_labels_beyond_the_classes_are_a_data_error(capsys, dl_file):
    """A 5-way head on the 10 digit classes used to train to 35.6 % without a word."""
    p = dl_file("model m(x: f32[B, 64]) -> f32[B, 5] {\n    return dense(x, 5)\n}\n"
                "train m on digits() {\n    loss = cross_entropy(m(x), y)\n}\n")
    err = located_error(capsys, p, cmd="run")
    assert f"{p}:5:12:" in err and "`y` from `digits()` holds the label 9" in err
    assert "has 5 classes (labels 0 to 4" in err and "`y` holds 0 to 9" in err


SEQ2SEQ = (EXAMPLES / "seq2seq.dl").read_text()


@pytest.mark.parametrize("edit, words", [
    (("out = dense(h, 13)", "out = dense(h, 15)"), "indexed with come from argmax over 15 classes"),
    (("tok = full([B], 1,", "tok = full([B], 13,"), "indexed with include the constant 13"),
])
def test_decoder_ids_computed_beyond_the_table_are_a_compile_error(capsys, dl_file, edit, words):
    """A greedy decoder feeding back argmax over more classes than its embedding has rows."""
    src = SEQ2SEQ.replace(*edit).replace("f32[B, 9, 13]", "f32[B, 9, 15]" if "15" in edit[1] else "f32[B, 9, 13]")
    p = dl_file(src)
    assert "e = embedding(tok, 13, 32)" in located_error(capsys, p)      # dlc check lowers both programs
    err = located_error(capsys, p, "--epochs", "0", cmd="run")
    assert "e = embedding(tok, 13, 32)" in err and "`reverser/embedding_2/E` [13, 32] has 13 rows" in err
    assert words in err


def test_index_reads_follow_data_into_scans():
    from compiler.bounds import index_reads
    from compiler.lower import lower_train
    from dsl.parser import parse_file
    from runtime import data
    path = EXAMPLES / "seq2seq.dl"
    module = parse_file(path)
    ds = data.load(next(it for it in module.items if type(it).__name__ == "TrainDef").data, path.parent, 0)
    prog, _ = lower_train(module, ds.fields())
    reads = {(r.input, r.limit, r.negative_ok) for r in index_reads(prog.graph)}
    # x: the encoder's embedding; y_in: the decoder's, inside the scan body; y: the loss's onehot
    assert reads == {("x", 13, False), ("y_in", 13, False), ("y", 13, True)}


# ---- reductions over integers and booleans --------------------------------------------------------
def test_integer_max_of_negative_values():
    """Integer max started from -inf cast to int32: max of [[-7, -2, -9, -4]] gave -1."""
    f = compile_function("model f(x: i32[B, 4]) -> i32[B] {\n    return max(x, axis = 1)\n}\n", "f")
    x = np.array([[-7, -2, -9, -4], [3, -1, 8, 0]], np.int32)
    out = f(x=x)["output"]
    assert out.dtype == np.int32 and out.tolist() == x.max(axis=1).tolist()
    g = compile_function("model f(x: i64[B, 3]) -> i64[B] {\n    return max(x, axis = 1)\n}\n", "f")
    y = np.array([[-2**40, -5, -2**62]], np.int64)
    assert g(x=y)["output"].tolist() == y.max(axis=1).tolist()


def test_max_of_booleans_is_any():
    f = compile_function("model f(x: f64[B, 4]) -> bool[B] {\n    return max(x > 0, axis = 1)\n}\n", "f")
    x = np.array([[-1.0, -2, -3, -4], [-1.0, 2, -3, -4]])
    assert f(x=x)["output"].tolist() == [False, True]


def test_sum_of_booleans_counts():
    """sum(x > 0) returned a bool: a count silently became "any"."""
    f = compile_function("model f(x: f64[B, 5]) -> i32[B] {\n    return sum(x > 0, axis = 1)\n}\n", "f")
    x = np.array([[1.0, -2, 3, 4, -5], [-1.0, -2, -3, -4, -5]])
    out = f(x=x)["output"]
    assert out.dtype == np.int32 and out.tolist() == (x > 0).sum(axis=1).tolist()
    total = compile_function("model f(x: f64[B, 5]) -> i32[] {\n    return sum(x > 0)\n}\n", "f")
    assert int(total(x=x)["output"]) == int((x > 0).sum())


# ---- matmul with broadcast batch dimensions ----------------------------------------------------------
@pytest.mark.parametrize("sa, sb", [((3, 4), (2, 4, 5)), ((1, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (6, 4, 5))])
def test_matmul_broadcasts_batch_dimensions(sa, sb):
    """f64[3,4] @ f64[2,4,5] passed the shape rule, then codegen raised NotImplementedError."""
    dims = lambda s: ", ".join(map(str, s))  # noqa: E731
    out = np.broadcast_shapes(sa[:-2], sb[:-2]) + (sa[-2], sb[-1])
    src = (f"model f(a: f64[{dims(sa)}], b: f64[{dims(sb)}], u: f64[{dims(out)}]) -> f64[] {{\n"
           "    return sum((a @ b) * u)\n}\n")
    r = np.random.default_rng(0)
    a, b, u = r.normal(size=sa), r.normal(size=sb), r.normal(size=out)
    f = compile_function(src, "f", grad=["a", "b"])
    res = f(a=a, b=b, u=u)
    np.testing.assert_allclose(res["loss"], np.sum((a @ b) * u), rtol=1e-12)
    # d/da sum(u * a@b) = u @ b^T summed back over a's broadcast axes; d/db = a^T @ u likewise
    np.testing.assert_allclose(res["grad:a"], _unbroadcast(u @ np.swapaxes(b, -1, -2), sa), rtol=1e-10)
    np.testing.assert_allclose(res["grad:b"], _unbroadcast(np.swapaxes(a, -1, -2) @ u, sb), rtol=1e-10)


def _unbroadcast(x, shape):
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    return x.sum(axis=tuple(i for i, d in enumerate(shape) if d == 1), keepdims=True)


# ---- builtin arguments of the wrong kind are located errors ----------------------------------------
@pytest.mark.parametrize("expr, words", [
    ("initial(0.0, 4)", "`initial`: shape must be a list of dimensions"),
    ("full([2, 4], x)", "`full`: value must be a number, got f32[B, 64]"),
    ('full([2, 4], "a")', "`full`: value must be a number, got 'a'"),
    ('full([B], 1.5, dtype = "i32")', "`full`: an i32 tensor holds integers, got 1.5"),
    ("slice(x, 0.5, 2)", "`slice`: start must be an integer >= 0, got the number 0.5"),
    ("transpose(x, perm = 3)", "`transpose`: perm must list the axes 0 to 1 in a new order, got the number 3"),
    ("transpose(x, perm = [0, 0])", "got [0, 0]"),
    ("sum(x, keepdims = 3)", "`sum`: keepdims must be true or false"),
    ("concat([x, 3])", "`concat` joins tensors of one rank"),
    ("zeros([B, -1])", "`zeros`: shape must be a list of dimensions"),
    ("reshape(x, [B, 2.5])", "got [B, 2.5]"),
    ("initial(x, [B, 3])", "an initial state must be [B, 3], got f32[B, 64]"),
    ("sqrt(-1)", "`sqrt(-1)` is nan"),
    ("log(0)", "`log(0)` is -inf"),
    ("x * (-8) ** 0.5", "cannot compute -8 ** 0.5: the result is not a finite real number"),
    ("x * 10 ** 400", "cannot compute 10 ** 400: the result is not a finite real number"),
])
def test_builtin_argument_errors(capsys, dl_file, expr, words):
    p = dl_file(f"model m(x: f32[B, 64]) -> f32[B, 64] {{\n    h = {expr}\n    return x\n}}\n")
    err = located_error(capsys, p)
    assert f"{p}:2:{9 + 4 * expr.startswith('x * ')}:" in err and words in err


# ---- seeds --------------------------------------------------------------------------------------------
def test_seed_expression_in_a_train_block_is_used(dl_file):
    """`seed = 2 * 3` was ignored and 0 used."""
    body = "model m(x: f32[B, 64]) -> f32[B, 10] {\n    return dense(x, 10)\n}\n" \
           "train m on digits() {\n    loss = cross_entropy(m(x), y)\n    seed = %s\n}\n"
    a = Session(dl_file(body % "2 * 3", "a.dl"), Options(train=False))
    b = Session(dl_file(body % "6", "b.dl"), Options(train=False))
    c = Session(dl_file(body % "0", "c.dl"), Options(train=False))
    assert a.seed == 6
    np.testing.assert_array_equal(a.dataset.test["y"], b.dataset.test["y"])
    np.testing.assert_array_equal(a.params["m/dense_1/W"], b.params["m/dense_1/W"])
    assert not np.array_equal(a.params["m/dense_1/W"], c.params["m/dense_1/W"])


def test_train_step_and_session_draw_the_same_random_stream(dl_file, tmp_path):
    """api.TrainStep seeded its steps 1, 2, ... while Session mixed in the run's seed."""
    from compiler.api import compile_train_step
    from compiler.lower import OptimizerSpec
    r = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=r.normal(size=(40, 4)), y=np.arange(40) % 2)
    p = dl_file('model m(x: f32[B, 4]) -> f32[B, 4] {\n    param w: [4] = ones\n    return x * w * rand_like(x)\n}\n'
                'train m on npz("d.npz", scale = false) {\n    loss = mean(m(x))\n    optimizer = sgd(lr = 0)\n'
                '    seed = 5\n}\n')
    s = Session(p, Options(dtype="f64"))
    step = compile_train_step("model m(x: f64[B, 4]) -> f64[] {\n    param w: [4] = ones\n"
                              "    return mean(x * w * rand_like(x))\n}\n", OptimizerSpec("sgd", 0.0), seed=5)
    step.params["m/w"] = np.ones(4)
    batch = {"x": s.dataset.train["x"][:8].copy(), "y": s.dataset.train["y"][:8].copy()}
    for _ in range(3):
        assert step(x=batch["x"]) == pytest.approx(s.train_step(batch)[0], rel=1e-12)


# ---- string options are checked ------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["rnn", "lstm", "gru"])
def test_misspelt_returns_is_an_error(capsys, dl_file, layer):
    """`returns = "final"` silently meant "sequence"."""
    p = dl_file(f'model m(x: f32[B, 8, 8]) -> f32[B, 10] {{\n    h = {layer}(x, 16, returns = "final")\n'
                "    return dense(h, 10)\n}\n")
    err = located_error(capsys, p)
    assert f"{p}:2:9:" in err and f"inside `{layer}`" in err
    assert '`returns` must be one of "sequence", "last", "state", got "final"' in err


# ---- losses compare like with like; metrics follow the loss ---------------------------------------------
def _regression_data(tmp_path):
    r = np.random.default_rng(0)
    X = r.normal(size=(200, 3)).astype(np.float32)
    y = (X @ np.array([1.0, -2.0, 0.5]) + 0.1 * r.normal(size=200)).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=X, y=y)


def test_mse_of_b1_against_b_is_an_error_naming_both_shapes(capsys, dl_file, tmp_path):
    """mse(pred [B, 1], y [B]) broadcast to [B, B] and trained to a wrong MSE (10.75, not 0.023)."""
    _regression_data(tmp_path)
    p = dl_file("model m(x: f32[B, 3]) -> f32[B, 1] {\n    return dense(x, 1)\n}\n"
                'train m on npz("reg.npz") {\n    loss = mse(m(x), y)\n}\n')
    err = located_error(capsys, p)
    assert f"{p}:5:12:" in err and "inside `mse`" in err
    assert "`target` is f32[B] but `pred` is f32[B, 1]" in err and "must be [B, 1]" in err


@pytest.mark.parametrize("loss, words", [
    ("bce_with_logits(m(x), y)", "`target` is i32[B] but `logits` is f32[B, 1]"),
    ("cross_entropy(m(x), reshape(y, [-1, 1]))", "`labels` is i32[B, 1] but `logits` is f32[B, 1]"),
])
def test_other_losses_reject_broadcast_targets(capsys, dl_file, tmp_path, loss, words):
    np.savez(tmp_path / "b.npz", x=np.zeros((20, 3), np.float32), y=np.arange(20) % 2)
    p = dl_file("model m(x: f32[B, 3]) -> f32[B, 1] {\n    return dense(x, 1)\n}\n"
                f'train m on npz("b.npz") {{\n    loss = {loss}\n}}\n')
    err = located_error(capsys, p)
    assert words in err


def test_regression_reports_mse_and_mae_not_accuracy(dl_file, tmp_path):
    _regression_data(tmp_path)
    p = dl_file("model m(x: f32[B, 3]) -> f32[B] {\n    return reshape(dense(x, 1), [-1])\n}\n"
                'train m on npz("reg.npz") {\n    loss = mse(m(x), y)\n    optimizer = adam(lr = 0.05)\n'
                "    epochs = 30\n}\n")
    s = Session(p)
    rep = s.fit(progress=False)
    t = rep["test"]
    assert set(t) == {"loss", "mse", "mae"}
    pred = s.run_eval(s.dataset.test)["output"]
    y = s.dataset.test["y"]
    assert t["mse"] == pytest.approx(np.mean((pred - y) ** 2), rel=1e-5) == pytest.approx(t["loss"], rel=1e-5)
    assert t["mae"] == pytest.approx(np.mean(np.abs(pred - y)), rel=1e-5)
    assert t["mse"] < 0.05                       # the noise is 0.01; a [B, B] broadcast gave 10.75


def test_autoencoder_reports_no_accuracy_and_predicts_values(capsys, dl_file, tmp_path):
    p = dl_file("model ae(x: f32[B, 64]) -> f32[B, 64] {\n    return dense(relu(dense(x, 16)), 64)\n}\n"
                "train ae on digits() {\n    loss = mse(ae(x), x)\n    epochs = 1\n}\n")
    ck = tmp_path / "ae.npz"
    assert main(["run", str(p), "--quiet", "--save", str(ck)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" not in out and "mae" in out
    s = Session(p)
    t = s.evaluate(s.dataset.test)
    pred = s.run_eval(s.dataset.test)["output"]
    assert t["mae"] == pytest.approx(np.mean(np.abs(pred - s.dataset.test["x"])), rel=1e-5)   # against x, the target
    assert main(["predict", str(p), "--load", str(ck), "--index", "0", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["predictions"][0]
    assert row["prediction"].startswith("[") and "(64 values)" in row["prediction"]


def test_bce_reports_binary_accuracy(dl_file, tmp_path):
    r = np.random.default_rng(1)
    X = r.normal(size=(300, 2)).astype(np.float32)
    np.savez(tmp_path / "b.npz", x=X, y=(X[:, 0] + X[:, 1] > 0).astype(np.float32))
    p = dl_file("model m(x: f32[B, 2]) -> f32[B] {\n    return reshape(dense(x, 1), [-1])\n}\n"
                'train m on npz("b.npz") {\n    loss = bce_with_logits(m(x), y)\n    optimizer = adam(lr = 0.05)\n'
                "    epochs = 10\n}\n")
    s = Session(p)
    t = s.fit(progress=False)["test"]
    assert set(t) == {"loss", "accuracy"}
    logits = s.run_eval(s.dataset.test)["output"]
    assert t["accuracy"] == pytest.approx(np.mean((logits > 0) == (s.dataset.test["y"] > 0.5)))
    assert t["accuracy"] > 0.9


def test_metric_the_loss_does_not_have_is_an_error(capsys, dl_file, tmp_path):
    _regression_data(tmp_path)
    p = dl_file("model m(x: f32[B, 3]) -> f32[B] {\n    return reshape(dense(x, 1), [-1])\n}\n"
                'train m on npz("reg.npz") {\n    loss = mse(m(x), y)\n    metrics = [accuracy, loss]\n}\n')
    err = located_error(capsys, p, "--epochs", "0", cmd="run")
    assert f"{p}:6:15:" in err and "`accuracy` is not a metric of a model trained with `mse`" in err
    assert "its metrics: mse, mae, loss" in err


def test_metrics_follow_the_loss_through_a_users_def(dl_file):
    from runtime.metrics import Task
    p = dl_file("model m(x: f32[B, 64]) -> f32[B, 10] {\n    return dense(x, 10)\n}\n"
                "def objective(x, y) {\n    return cross_entropy(m(x), y) + 0.0\n}\n"
                "train m on digits() {\n    loss = objective(x, y)\n    epochs = 1\n}\n")
    s = Session(p)
    assert s.task == Task("cross_entropy", "y")
    assert set(s.fit(progress=False)["test"]) == {"loss", "accuracy"}


# ---- what the command prints -------------------------------------------------------------------------
def test_run_output_lines(capsys, dl_file):
    p = dl_file("model m(x: f32[B, 64]) -> f32[B, 64] {\n    param w: [64] = ones\n    return x * w\n}\n"
                "train m on digits() {\n    loss = mse(m(x), x)\n    metrics = [mae, loss]\n}\n")
    assert main(["run", str(p), "--epochs", "0"]) == 0
    cap = capsys.readouterr()
    assert "1 parameter tensor (64 values)" in cap.err          # not "1 parameter tensors"
    test = cap.out.strip().splitlines()[-1]
    assert test.startswith("test: loss 0.0000") and "mae 0.0000" in test      # every metric asked for
    assert "None" not in test and "ms/step" not in test               # no steps were run


# ---- compile_function checks its arguments ----------------------------------------------------------
def test_compile_function_names_a_misshapen_input():
    f = compile_function("model f(x: f64[B, 4], y: f64[B]) -> f64[B] {\n    return sum(x, axis = 1) + y\n}\n", "f")
    x = np.ones((3, 4))
    np.testing.assert_allclose(f(x=x, y=np.arange(3.0))["output"], 4 + np.arange(3.0))
    with pytest.raises(ValueError, match=r"input `x` must be f64\[B, 4\], got shape \[3, 5\]"):
        f(x=np.ones((3, 5)), y=np.zeros(3))
    with pytest.raises(ValueError, match=r"input `y` must be f64\[B\], got shape \[2\] \(with B = 3\)"):
        f(x=x, y=np.zeros(2))
    with pytest.raises(ValueError, match=r"input `x` must be f64\[B, 4\], got shape \[4\]"):
        f(x=np.ones(4), y=np.zeros(3))


# ---- cosmetics -----------------------------------------------------------------------------------------
def test_dot_labels_break_lines(capsys):
    mlp = EXAMPLES / "mlp.dl"
    assert main(["ir", str(mlp), "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert 'n0 [label="x\\nf32[B, 64]"' in dot          # DOT's line break, not a literal backslash
    assert "\\\\n" not in dot


def test_summary_lists_the_layers_when_the_loss_calls_the_model_through_a_def(capsys, dl_file):
    p = dl_file("model m(x: f32[B, 64]) -> f32[B, 10] {\n    return dense(relu(dense(x, 32)), 10)\n}\n"
                "def objective(x, y) {\n    return cross_entropy(m(x), y)\n}\n"
                "train m on digits() {\n    loss = objective(x, y)\n}\n")
    assert main(["check", str(p)]) == 0
    out = capsys.readouterr().out
    assert "dense_1 (dense)  [B, 32]            2,080" in out
    assert "dense_2 (dense)  [B, 10]              330" in out


def test_a_resumed_run_goes_on_numbering_epochs(capsys, dl_file, tmp_path):
    p = dl_file("model m(x: f32[B, 64]) -> f32[B, 10] {\n    return dense(x, 10)\n}\n"
                "train m on digits() {\n    loss = cross_entropy(m(x), y)\n    batch = 256\n}\n")
    ck = tmp_path / "ck.npz"
    assert main(["run", str(p), "--epochs", "2", "--save", str(ck)]) == 0
    first = capsys.readouterr().err
    assert "epoch   1/2" in first and "epoch   2/2" in first
    assert main(["run", str(p), "--epochs", "2", "--load", str(ck)]) == 0
    again = capsys.readouterr().err
    assert "epoch   3/4" in again and "epoch   4/4" in again and "epoch   1/" not in again


def test_ir_stages_are_the_passes():
    """The `dlc ir` stages were listed in three places; now the pipeline names them."""
    from compiler.passes import PASS_NAMES, TRAIN_PIPELINE
    from runtime.cli import STAGES
    assert PASS_NAMES == [p.__name__ for p in TRAIN_PIPELINE]
    assert STAGES == ["ast", "summary", "lowered", *PASS_NAMES, "source"]


def test_predict_input_tokens_are_checked_like_data():
    """`dlc predict --input` batches go through the same check as the data (defence in depth:
    its tokens come from the data source's vocabulary, which the model may not cover)."""
    from compiler.bounds import IndexRead
    from dsl.diagnostics import DlcError
    from runtime import data
    reads = [IndexRead("x", 5, False, "the embedding table `m/E` [5, 8] has 5 rows", None)]
    data.check_indices(reads, {"x": np.array([[0, 4, 1]], np.int32)}, "--input")
    with pytest.raises(DlcError, match=r"`x` from --input holds the id 7, but the embedding table `m/E` \[5, 8\] "
                                       r"has 5 rows \(ids 0 to 4\)"):
        data.check_indices(reads, {"x": np.array([[0, 7, 1]], np.int32)}, "--input")
    with pytest.raises(DlcError, match="holds the id -1"):
        data.check_indices(reads, {"x": np.array([[0, -1]], np.int32)}, "--input")
    labels = [IndexRead("y", 3, True, "the onehot of the loss here has 3 classes", None)]
    data.check_indices(labels, {"y": np.array([-1, 0, 2])}, "`digits()`")      # -1: padding
    with pytest.raises(DlcError, match="holds the label 3"):
        data.check_indices(labels, {"y": np.array([-1, 3])}, "`digits()`")


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_pow_with_an_integer_valued_exponent_does_not_crash(dtype):
    # fastmath `afn` let LLVM turn pow(x, float(i)) into powi, whose helper Numba does not
    # link: the process died (SIGSEGV / "Symbol not found: __powidf2").
    src = "model m(x: f32[4], y: i32[4]) { return x ** float(y) }"
    f = compile_function(src, dtype=dtype)
    x = np.array([1.5, 2.0, 3.0, -2.0], np.float32)
    y = np.array([2, 3, -1, 3], np.int32)
    np.testing.assert_allclose(f(x=x, y=y)["output"], np.power(x.astype(np.float64), y), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_pow_by_a_constant_exponent_is_inline_and_exact(dtype):
    # A compile-time exponent stays `a ** c` in the loop (LLVM expands small integer powers and
    # the loop vectorizes: GELU-tanh's x**3); only a computed exponent calls the `_pow` helper.
    src = ("model m(x: f32[5]) { return x ** 3 + x ** 2.5 + x ** -2 + x ** 7 + x ** 0.5 + x ** float(2 * 3) }")
    f = compile_function(src, dtype=dtype)
    assert "_pow(" not in f.ex.source
    x = np.array([0.5, 1.0, 1.5, 2.0, 3.0], np.float32)
    x64 = x.astype(np.float64)
    want = x64 ** 3 + x64 ** 2.5 + x64 ** -2 + x64 ** 7 + x64 ** 0.5 + x64 ** 6
    np.testing.assert_allclose(f(x=x)["output"], want, rtol=1e-6 if dtype == "f32" else 1e-13)
    g = compile_function("model m(x: f32[4], y: f32[4]) { return x ** y }", dtype=dtype)
    assert "_pow(" in g.ex.source


# ---- a step flushes subnormals to zero, and gives the caller's mode back -------------------------
HALVE = """
model halve(x: f32[B, 4]) {
    return x * 0.5 + 0.0
}
"""


@pytest.mark.skipif(not __import__("compiler.codegen.fpmode", fromlist=["X86"]).X86, reason="x86-64 only")
@pytest.mark.parametrize("fuse", [True, False])
def test_a_step_flushes_subnormals_and_restores_the_mode(fuse):
    # a subnormal made inside a step is zero (a subnormal Adam moment slowed LeNet's kernels 4x);
    # NumPy after the step still computes subnormals: the mode is the step's alone
    f = compile_function(HALVE, dtype="f32", fuse=fuse)
    tiny = np.float32(1.5e-38)                       # normal; half of it is subnormal
    (out,) = f(x=np.full((2, 4), tiny, np.float32)).values()
    np.testing.assert_array_equal(out, np.zeros((2, 4), np.float32))
    assert np.full(4, tiny, np.float32)[0] * np.float32(0.5) > 0    # subnormal outside the step
    (big,) = f(x=np.full((2, 4), 3.0, np.float32)).values()
    np.testing.assert_array_equal(big, np.full((2, 4), 1.5, np.float32))


@pytest.mark.skipif(not __import__("compiler.codegen.fpmode", fromlist=["X86"]).X86, reason="x86-64 only")
def test_a_python_step_restores_the_mode_when_a_kernel_raises():
    from compiler.driver import build
    f = compile_function(HALVE, dtype="f32")
    ex = build(f.graph.copy(), "cpu", compiled_step=False)
    assert "try:" in ex.source and "finally:" in ex.source
    with pytest.raises(Exception):
        ex(np.full((2, 4), 1, np.complex64))          # no kernel for complex data: raises inside the step
    tiny = np.float32(1.5e-38)
    assert np.full(4, tiny, np.float32)[0] * np.float32(0.5) > 0    # still subnormal: the mode came back
