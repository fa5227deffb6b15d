"""A user's mistakes: one located message (file:line:col, the line, a caret), exit status 2."""
import numpy as np
import pytest

from runtime.cli import main

HEAD = "model mlp(x: f32[B, 64]) -> f32[B, 10] {\n"
TRAIN = "train mlp on digits() {\n    loss = cross_entropy(mlp(x), y)\n}\n"


def check(capsys, path, *extra):
    code = main(["check", str(path), *extra])
    err = capsys.readouterr().err
    return code, err


CASES = [
    # (body of the model, expected line, expected words)
    ("    h = relu(dense(x, 128))\n    return dense(h, 12)\n}\n", 3,
     ["the result of `mlp` must be f32[B, 10], got f32[B, 12]"]),
    ("    param W: [32, 10] = glorot\n    return x @ W\n}\n", 3,
     ["matmul", "[B, 64] @ [32, 10]"]),
    ("    h = rleu(dense(x, 128))\n    return dense(h, 10)\n}\n", 2,
     ["unknown function `rleu`", "did you mean `relu`?"]),
    ("    h = relu(dense(x, 128))\n    return dense(hh, 10)\n}\n", 3,
     ["unknown name `hh`", "did you mean `h`?"]),
    ("    return dense(x, 10, 3)\n}\n", 2, ["`dense` takes 2 arguments (x, units), got 3"]),
    ("    return dense(x, unit = 10)\n}\n", 2, ["`dense` has no parameter `unit`", "did you mean `units`?"]),
    ("    return dense(x)\n}\n", 2, ["`dense` is missing argument `units`"]),
    ("    return dense(x, 10) + dense(x, 5)\n}\n", 2, ["cannot broadcast shapes [B, 10] and [B, 5]"]),
    ("    return sum(x, axis = 2)\n}\n", 2, ["`sum`: axis 2 is out of range for a tensor of rank 2"]),
    ("    param W: [B, 10] = glorot\n    return x @ W\n}\n", 2, ["needs a fixed size"]),
    ("    param W: [64, 10] = gloriot\n    return x @ W\n}\n", 2, ["unknown name `gloriot`", "glorot"]),
]


@pytest.mark.parametrize("body, line, words", CASES)
def test_model_errors(capsys, dl_file, body, line, words):
    p = dl_file(HEAD + body + TRAIN)
    code, err = check(capsys, p)
    assert code == 2
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith(f"{p}:{line}:"), err
    for w in words:
        assert w in err
    lines = err.splitlines()
    assert lines[2].strip().startswith("^"), err          # the caret under the source line


def test_error_inside_stdlib_points_at_the_user_call(capsys, dl_file):
    p = dl_file(HEAD + "    return cross_entropy(x, 3)\n}\n" + TRAIN)
    code, err = check(capsys, p)
    assert code == 2 and err.startswith(f"{p}:2:"), err
    assert "inside `cross_entropy`" in err and "nn.dl" in err


@pytest.mark.parametrize("train, words", [
    ("train mlp on digits() {\n    loss = mlp(x)\n}\n", "the loss must be a float scalar, got f32[B, 10]"),
    ("train mlp on digits() {\n    loss = cross_entropy(mlp(x), y)\n    epoch = 3\n}\n", "unknown train setting `epoch`"),
    ("train mlp on digits() {\n    loss = cross_entropy(mlp(x), y)\n    optimizer = adam(lr = 0.1, mom = 2)\n}\n",
     "`adam` has no option `mom`"),
    ("train mlp on digits() {\n    loss = cross_entropy(mlp(x), y)\n    batch = 0\n}\n", "`batch` must be a positive integer"),
    ("train mlp on digits(tset = 0.2) {\n    loss = cross_entropy(mlp(x), y)\n}\n", "`digits` has no option `tset`"),
    ("train mlp on mnist() {\n    loss = cross_entropy(mlp(x), y)\n}\n", "unknown data source `mnist`"),
    ("train nlp on digits() {\n    loss = cross_entropy(mlp(x), y)\n}\n", "unknown model `nlp`"),
])
def test_train_block_errors(capsys, dl_file, train, words):
    p = dl_file(HEAD + "    return dense(x, 10)\n}\n" + train)
    code, err = check(capsys, p)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"{p}:"), err
    assert words in err


def test_data_file_errors(capsys, dl_file, tmp_path):
    model = HEAD + "    return dense(x, 10)\n}\n"
    p = dl_file(model + 'train mlp on npz("missing.npz") {\n    loss = cross_entropy(mlp(x), y)\n}\n')
    code, err = check(capsys, p)
    assert code == 2 and "data file not found" in err and f"{p}:4:" in err
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    p = dl_file(model + 'train mlp on npz("bad.npz") {\n    loss = cross_entropy(mlp(x), y)\n}\n', "b.dl")
    code, err = check(capsys, p)
    assert code == 2 and "cannot read bad.npz" in err
    np.savez(tmp_path / "keys.npz", images=np.zeros((4, 64)), labels=np.zeros(4))
    p = dl_file(model + 'train mlp on npz("keys.npz") {\n    loss = cross_entropy(mlp(x), y)\n}\n', "c.dl")
    code, err = check(capsys, p)
    assert code == 2 and "has no array `x`" in err and "images" in err
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,0\n3,oops,1\n")
    p = dl_file(model + 'train mlp on csv("d.csv", label = "label") {\n    loss = cross_entropy(mlp(x), y)\n}\n', "d.dl")
    code, err = check(capsys, p)
    assert code == 2 and "d.csv:3: `oops` is not a number" in err


@pytest.mark.parametrize("content", [b"hello, this is text\n", b"\x93NUMPY"])
def test_a_file_that_is_not_npz_says_so(capsys, dl_file, tmp_path, content):
    """A text file (or an .npy) named .npz showed numpy's message about pickled data."""
    (tmp_path / "notnpz.npz").write_bytes(content)
    p = dl_file(HEAD + "    return dense(x, 10)\n}\n" + 'train mlp on npz("notnpz.npz") {\n    loss = cross_entropy(mlp(x), y)\n}\n')
    code, err = check(capsys, p)
    assert code == 2 and err.startswith(f"{p}:4:14: error: cannot read notnpz.npz as .npz: it is not an .npz file "
                                        "(np.savez writes a zip archive of .npy arrays)\n"), err
    assert "pickle" not in err
    from dsl.diagnostics import DlcError
    from runtime import checkpoint
    with pytest.raises(DlcError, match=r"cannot read checkpoint .*notnpz.npz: it is not an .npz file"):
        checkpoint.load(tmp_path / "notnpz.npz")


def test_data_shape_mismatch_names_both_shapes(capsys, dl_file, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 63), np.float32), y=np.arange(10) % 2)
    p = dl_file(HEAD + "    return dense(x, 10)\n}\n" + 'train mlp on npz("d.npz") {\n    loss = cross_entropy(mlp(x), y)\n}\n')
    code, err = check(capsys, p)
    assert code == 2
    assert "argument `x` of `mlp` must be f32[B, 64], got f32[B, 63]" in err


def test_bad_flags_exit_2(capsys, dl_file):
    p = dl_file(HEAD + "    return dense(x, 10)\n}\n" + TRAIN)
    with pytest.raises(SystemExit) as e:
        main(["run", str(p), "--epochs", "many"])
    assert e.value.code == 2
    assert "--epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["ir", str(p), "--format", "jpeg"])
    assert e.value.code == 2
    assert main(["ir", str(p), "--stage", "nope"]) == 2
    assert "unknown stage `nope`" in capsys.readouterr().err
    assert main(["check", "no/such/file.dl"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_import_errors_and_debug(capsys, dl_file):
    p = dl_file('import "lib/missing.dl"\n' + HEAD + "    return dense(x, 10)\n}\n" + TRAIN)
    code, err = check(capsys, p)
    assert code == 2 and f"{p}:1:1" in err and "cannot import" in err
    with pytest.raises(Exception) as e:          # --debug lets the exception (and traceback) through
        main(["check", str(p), "--debug"])
    assert "cannot import" in str(e.value)


# ---- option ranges: a value that cannot work is refused where it is written --------------------------------
@pytest.mark.parametrize("opt, col, words", [
    ("adam(lr = 1e-3, beta2 = 1.0)", 41, "`beta2` must be in [0, 1), got 1.0"),     # was ZeroDivisionError
    ("adam(beta1 = 1.0)", 30, "`beta1` must be in [0, 1), got 1.0"),
    ("adamw(beta1 = 1.5)", 31, "`beta1` must be in [0, 1), got 1.5"),
    ("adam(beta2 = -0.1)", 30, "`beta2` must be in [0, 1), got -0.1"),
    ("adam(eps = 0)", 28, "`eps` must be a positive number, got 0"),
    ("rmsprop(alpha = 2)", 33, "`alpha` must be in [0, 1), got 2"),
    ("rmsprop(eps = 0.0)", 31, "`eps` must be a positive number, got 0.0"),
    ("sgd(momentum = 1)", 32, "`momentum` must be in [0, 1), got 1"),
    ("sgd(lr = -0.1)", 26, "`lr` must be a non-negative number, got -0.1"),
    ("adamw(weight_decay = -0.01)", 38, "`weight_decay` must be a non-negative number, got -0.01"),
])
def test_optimizer_options_out_of_range(capsys, dl_file, opt, col, words):
    p = dl_file(HEAD + "    return dense(x, 10)\n}\n" +
                f"train mlp on digits() {{\n    loss = cross_entropy(mlp(x), y)\n    optimizer = {opt}\n}}\n")
    for cmd in (["check"], ["run", "--epochs", "1"]):     # `run` refuses it before compiling
        assert main([cmd[0], str(p), *cmd[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{p}:6:{col}: error: {words}\n"), err
        assert err.splitlines()[2].strip().startswith("^") and "internal error" not in err, err


def test_optimizer_spec_checks_its_options():
    from compiler.optim import OptimizerSpec
    with pytest.raises(ValueError, match=r"`beta2` must be in \[0, 1\)"):
        OptimizerSpec("adam", 1e-3, beta2=1.0)
    assert OptimizerSpec("adam", 1e-3, beta1=0.0, beta2=0.0).beta2 == 0.0


@pytest.mark.parametrize("call, words", [
    ("dropout(x, rate = 1.5)", "`rate` must be in [0, 1), got 1.5"),
    ("dropout(x, rate = -0.5)", "`rate` must be in [0, 1), got -0.5"),
    ("dropout(x, 1.0)", "`rate` must be in [0, 1), got 1.0"),        # was a NaN at run time
    ("layer_norm(x, eps = -1)", "`eps` must be positive, got -1"),
    ("layer_norm(x, eps = 0)", "`eps` must be positive, got 0"),
    ("batch_norm(x, eps = -1e-5)", "`eps` must be positive, got -1e-05"),
    ("batch_norm(x, momentum = 1.5)", "`momentum` must be in [0, 1], got 1.5"),
])
def test_layer_options_out_of_range(capsys, dl_file, call, words):
    p = dl_file(HEAD + f"    return dense({call}, 10)\n}}\n" + TRAIN)
    code, err = check(capsys, p)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"{p}:2:18: error: {words}\n"), err          # at the user's call
    assert err.splitlines()[2].strip().startswith("^") and f"inside `{call.split('(')[0]}`" in err, err


def test_group_norm_eps_out_of_range(capsys, dl_file):
    p = dl_file("model m(x: f32[B, 4, 4, 4]) -> f32[B, 4, 4, 4] {\n    return group_norm(x, 2, eps = -1)\n}\n")
    code, err = check(capsys, p)
    assert code == 2 and err.startswith(f"{p}:2:12: error: `eps` must be positive, got -1\n"), err


@pytest.mark.parametrize("call", ["dropout(x, rate = 0)", "dropout(x, rate = 0.99)", "batch_norm(x, momentum = 1)"])
def test_layer_options_in_range_pass(capsys, dl_file, call):
    assert check(capsys, dl_file(HEAD + f"    return dense({call}, 10)\n}}\n" + TRAIN))[0] == 0


def test_in_range_takes_an_interval(capsys, dl_file):
    p = dl_file(HEAD + '    r = in_range(0.5, "0 to 1")\n    return dense(x, 10)\n}\n' + TRAIN)
    code, err = check(capsys, p)
    assert code == 2 and err.startswith(f"{p}:2:9: error: `in_range` takes an interval"), err
