"""Issue 11: no traceback reaches a user. Each hostile input ends in one located message
(exit 2), a correct result, or a clear refusal."""
import json
import re

import numpy as np
import pytest

from runtime.cli import main

MODEL = "model m(x: f32[B, 64]) -> f32[B, 10] {{\n    return {body}\n}}\n"


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.err


def located(err: str, path, line: int) -> re.Match:
    m = re.match(rf"{re.escape(str(path))}:{line}:(\d+): error: ", err)
    assert m, err
    return m


# ---- lexing and parsing -----------------------------------------------------------------------
@pytest.mark.parametrize("text, line, words", [
    ('import "\\x"\n', 1, ["bad escape", "truncated"]),
    ('import "\\N{nope}"\n', 1, ["bad escape", "unknown Unicode character name"]),
    ('import "\\u12"\n', 1, ["bad escape"]),
    (MODEL.format(body="x * " + "9" * 5000), 2, ["integer literal", "5000 digits", "too large"]),
    (MODEL.format(body="x * 9223372036854775808"), 2, ["too large"]),
    (MODEL.format(body="x * 1e999"), 2, ["too large for a float"]),
    ("model m(x: f32[B, " + "9" * 30 + "]) -> f32[B, 4] {\n    return x\n}\n", 1, ["too large"]),
])
def test_bad_literals_are_located(capsys, dl_file, text, line, words):
    p = dl_file(text)
    code, err = run_cli(capsys, "check", p)
    assert code == 2
    located(err, p, line)
    for w in words:
        assert w in err
    assert err.splitlines()[2].strip().startswith("^")


@pytest.mark.parametrize("body", [
    "relu(" * 300 + "x" + ")" * 300,
    "x" + " + x" * 600,
    "-" * 600 + "x",
])
def test_deep_nesting_is_refused_not_a_recursion_error(capsys, dl_file, body):
    p = dl_file(MODEL.format(body=body))
    code, err = run_cli(capsys, "check", p)
    assert code == 2
    located(err, p, 2)
    assert "nested too deeply" in err


def test_nesting_below_the_limit_checks(capsys, dl_file):
    p = dl_file(MODEL.format(body="dense(" + "relu(" * 150 + "x" + ")" * 150 + ", 10)"))
    code, err = run_cli(capsys, "check", p)
    assert code == 0, err


def test_non_utf8_file_is_located(capsys, tmp_path):
    p = tmp_path / "latin.dl"
    p.write_bytes(b"model m(x: f32[B, 4]) -> f32[B, 4] {\n  # caf\xe9 au lait\n    return x\n}\n")
    code, err = run_cli(capsys, "check", p)
    assert code == 2
    assert located(err, p, 2).group(1) == "8"
    assert "not UTF-8" in err and "0xe9" in err


@pytest.mark.parametrize("sep", ["\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\u2028", "\x85"])
def test_odd_line_separators_quote_the_reported_line(capsys, dl_file, sep):
    # the lexer ends lines only at \n: the quoted line and caret must be that line
    p = dl_file(f"# one{sep} still one\nmodel m(x: f32[B, 4]) -> f32[B, 4] {{\n    return nope\n}}\n")
    code, err = run_cli(capsys, "check", p)
    assert code == 2
    located(err, p, 3)
    lines = err.splitlines()
    assert lines[1].strip() == "return nope"
    assert lines[2].index("^") == lines[1].index("nope")


def test_directory_instead_of_a_file(capsys, tmp_path):
    d = tmp_path / "dir.dl"
    d.mkdir()
    code, err = run_cli(capsys, "check", d)
    assert code == 2 and "is a directory" in err


def test_internal_errors_exit_3_with_a_hint(capsys, dl_file, monkeypatch):
    import runtime.cli as cli

    def boom(args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(cli, "_check", boom)
    code, err = run_cli(capsys, "check", dl_file(MODEL.format(body="dense(x, 10)")))
    assert code == 3
    assert "internal error, please report" in err and "--debug" in err and "ZeroDivisionError" in err


# ---- data sources ------------------------------------------------------------------------------
DATA_MODEL = ("model m(x: f32[B, {n}]) -> f32[B, {k}] {{\n    return dense(x, {k})\n}}\n"
              "train m on {src} {{\n    loss = cross_entropy(m(x), y)\n    epochs = 1\n}}\n")


def data_case(tmp_path, src, n=4):
    p = tmp_path / "model.dl"
    p.write_text(DATA_MODEL.format(n=n, src=src, k=10 if src.startswith("digits") else 3))
    return p


def _npz(tmp_path, name, **arrays):
    np.savez(tmp_path / name, **arrays)
    return name


OK_CSV = "a,b,c,d,y\n" + "".join(f"{i},{i + 1},{i * 2},{i % 3},{i % 3}\n" for i in range(30))


@pytest.mark.parametrize("setup, src, n, words", [
    (None, 'csv("")', 4, ["path is empty"]),
    ("dir", 'csv("adir")', 4, ["is a directory"]),
    (None, 'csv("' + "a" * 300 + '.csv")', 4, ["cannot open data file", "too long"]),
    ("a,b,c,d,y\n", 'csv("d.csv")', 4, ["header line but no rows"]),
    (OK_CSV, 'csv("d.csv", label = 1.5)', 4, ["`label` is a column name or index"]),
    (OK_CSV, 'csv("d.csv", label = 99)', 4, ["5 columns", "no column 99"]),
    (b"a,b,c,d,y\n1,2,3,4,\xe9\n", 'csv("d.csv")', 4, ["d.csv:2: not UTF-8"]),
    ({"x": np.arange(10.0), "y": np.arange(10) % 3}, 'npz("d.npz")', 1, ["one row per example", "[10]"]),
    ({"x": np.array(1.0), "y": np.array(1)}, 'npz("d.npz")', 1, ["one row per example", "[]"]),
    ({"x": np.zeros((0, 4)), "y": np.zeros(0, int)}, 'npz("d.npz")', 4, ["holds no examples"]),
    ({"x": np.ones((1, 4)), "y": np.array([1])}, 'npz("d.npz")', 4, ["of 1 example leaves none to train on"]),
    ({"x": np.ones((20, 4)), "y": np.arange(20) % 3 + (np.arange(20) == 5) * 2 ** 40}, 'npz("d.npz")', 4,
     ["1099511627778", "32-bit"]),
    (None, "digits(test = 0.9999)", 64, ["leaves none to train on"]),
    (None, "tagging(n = 1000000000000)", 12, ["TiB", "more than the"]),
    (None, "tagging(vocab = 4294967296)", 12, ["32-bit"]),
    (None, "reverse(n = 1000000000000)", 8, ["at most 2,000,000"]),
    (None, "reverse(n = 80008000)", 8, ["at most 2,000,000"]),        # fits in memory, takes an hour
])
def test_bad_data_is_one_located_message(capsys, tmp_path, setup, src, n, words):
    if setup == "dir":
        (tmp_path / "adir").mkdir()
    elif isinstance(setup, dict):
        np.savez(tmp_path / "d.npz", **setup)
    elif isinstance(setup, (str, bytes)):
        f = tmp_path / "d.csv"
        f.write_bytes(setup if isinstance(setup, bytes) else setup.encode())
    p = data_case(tmp_path, src, n)
    code, err = run_cli(capsys, "check", p)
    assert code == 2, err
    located(err, p, 4)
    for w in words:
        assert w in err, err


def test_one_row_dataset_trains_with_test_zero(capsys, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((1, 4)), y=np.array([1]))
    code, err = run_cli(capsys, "check", data_case(tmp_path, 'npz("d.npz", test = 0)'))
    assert code == 0, err


def test_seed_beyond_32_bits_is_refused(capsys, tmp_path):
    p = data_case(tmp_path, "digits()", 64)
    with pytest.raises(SystemExit) as e:
        main(["run", str(p), "--seed", "4294967296"])
    assert e.value.code == 2
    assert "below 4,294,967,296" in capsys.readouterr().err
    p.write_text(p.read_text().replace("epochs = 1", "epochs = 1\n    seed = 4294967296"))
    code, err = run_cli(capsys, "run", p)
    assert code == 2
    located(err, p, 7)


@pytest.mark.parametrize("cmd, flag, value", [("run", "--lr", "nan"), ("run", "--lr", "inf"), ("run", "--lr", "-1"),
                                               ("run", "--batch", "0"), ("predict", "--temperature", "nan"),
                                               ("predict", "--temperature", "-inf")])
def test_bad_numeric_flags(capsys, tmp_path, cmd, flag, value):
    with pytest.raises(SystemExit) as e:
        extra = ["--load", "x.npz"] if cmd == "predict" else []
        main([cmd, str(data_case(tmp_path, "digits()", 64)), flag, value, *extra])
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


# ---- sizes -------------------------------------------------------------------------------------
def test_a_layer_too_wide_is_refused_with_the_figure(capsys, dl_file):
    p = dl_file("model m(x: f32[B, 64]) -> f32[B, 10] {\n    h = dense(x, 1000000000000)\n"
                "    return dense(h, 10)\n}\ntrain m on digits() {\n    loss = cross_entropy(m(x), y)\n}\n")
    for cmd in ("check", "run"):
        code, err = run_cli(capsys, cmd, p)
        assert code == 2, err
        located(err, p, 2)
        # 64 x 1e12 + 1e12 + 1e12 x 10 float32 values
        assert f"{(75e12 + 10) * 4 / 2 ** 40:,.1f} TiB of parameters" in err
        assert "`m/dense_1/W`, f32[64, 1,000,000,000,000]" in err


def test_a_batch_too_large_is_refused_before_allocating(capsys, tmp_path):
    code, err = run_cli(capsys, "run", data_case(tmp_path, "digits()", 64), "--batch", "1000000000000")
    assert code == 2
    assert err.startswith("error: a batch of 1,000,000,000,000") and "more than the" in err


def test_memory_limit_can_be_set(monkeypatch, capsys, tmp_path):
    from runtime.resources import memory_limit
    monkeypatch.setenv("DLC_MEMORY_LIMIT", "2G")
    assert memory_limit() == 2 * 2 ** 30
    # a 64x10 dense layer's weights, gradients and moments alone take 10 KiB
    monkeypatch.setenv("DLC_MEMORY_LIMIT", "1K")
    code, err = run_cli(capsys, "check", data_case(tmp_path, "digits()", 64))
    assert code == 2 and "1.0 KiB of memory" in err


# ---- checkpoints -------------------------------------------------------------------------------
EXAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples"


def _resume_is_bit_identical(tmp_path, example, suffix):
    from runtime.session import Options, Session
    straight = Session(EXAMPLES / example, Options(epochs=4))
    rep4 = straight.fit(progress=False)
    first = Session(EXAMPLES / example, Options(epochs=2))
    first.fit(progress=False)
    ck = tmp_path / f"ck{suffix}"
    first.save(ck)
    resumed = Session(EXAMPLES / example, Options(epochs=2))
    resumed.load(ck)
    rep = resumed.fit(progress=False)
    assert resumed.step_count == straight.step_count and resumed.epoch == 4
    for k in straight.params:
        assert np.array_equal(resumed.params[k], straight.params[k]), k
    for k in straight.state:
        assert np.array_equal(resumed.state[k], straight.state[k]), k
    assert rep["test"] == rep4["test"]


def test_resume_is_bit_identical_mlp(tmp_path):
    _resume_is_bit_identical(tmp_path, "mlp.dl", ".safetensors")


@pytest.mark.slow
def test_resume_is_bit_identical_cnn(tmp_path):
    # batch norm's running statistics, dropout's per-step stream and Adam's moments
    _resume_is_bit_identical(tmp_path, "cnn.dl", ".npz")


@pytest.fixture(scope="module")
def mlp_session():
    from runtime.session import Options, Session
    s = Session(EXAMPLES / "mlp.dl", Options(epochs=1))
    s.fit(progress=False)
    return s


def _rewrite(src, dst, edit_tensors=None, meta=None):
    from runtime import checkpoint
    params, state, m = checkpoint.load(src)
    tensors = {**{f"param/{k}": v for k, v in params.items()}, **{f"state/{k}": v for k, v in state.items()}}
    if edit_tensors:
        edit_tensors(tensors)
    m = meta(m) if meta else m
    np.savez(dst, **tensors, __meta__=np.frombuffer(json.dumps(m).encode(), np.uint8))
    return dst


W = "param/mlp/dense_1/W"


@pytest.mark.parametrize("tensors, meta, words", [
    (lambda t: t.pop(W), None, ["lacks parameter `mlp/dense_1/W`"]),
    (lambda t: t.pop(next(k for k in t if k.startswith("state/adam.m/"))), None, ["lacks state `adam.m/"]),
    (lambda t: t.update({"param/extra": np.zeros(3, np.float32)}), None, ["has parameter `extra`"]),
    (lambda t: t.update({"state/extra": np.zeros(3, np.float32)}), None, ["has state `extra`"]),
    (lambda t: t.update({W: t[W].astype(np.float16)}), None,
     ["`mlp/dense_1/W` is float16[64, 128]", "float32[64, 128]"]),
    (lambda t: t.update({W: t[W].astype(np.int32)}), None, ["int32[64, 128]"]),
    (lambda t: t.update({W: t[W][:3]}), None, ["float32[3, 128]"]),
    (None, lambda m: {**m, "step": "many"}, ["metadata `step`", '"many"']),
    (None, lambda m: {**m, "step": -4}, ["metadata `step`"]),
    (None, lambda m: [1, 2], ["must be a JSON object, got list"]),
    (None, lambda m: {**m, "phases": [1]}, ["metadata `phases`"]),
    (None, lambda m: {**m, "data_order": {"bit_generator": "nope"}}, ["metadata `data_order`"]),
])
def test_bad_checkpoints_name_what_is_wrong(mlp_session, tmp_path, tensors, meta, words):
    from dsl.diagnostics import DlcError
    good = tmp_path / "good.npz"
    mlp_session.save(good)
    bad = _rewrite(good, tmp_path / "bad.npz", tensors, meta)
    before = {k: v.copy() for k, v in mlp_session.params.items()}
    with pytest.raises(DlcError) as e:
        mlp_session.load(bad)
    msg = str(e.value)
    assert msg.startswith(f"error: {bad}: "), msg
    for w in words:
        assert w in msg, msg
    for k, v in before.items():             # a refused checkpoint changes nothing
        assert np.array_equal(mlp_session.params[k], v)


def test_garbage_checkpoint(capsys, tmp_path):
    ck = tmp_path / "ck.safetensors"
    ck.write_bytes(b"\x00\x01garbage" * 10)
    code, err = run_cli(capsys, "run", EXAMPLES / "mlp.dl", "--epochs", "0", "--load", ck, "--quiet")
    assert code == 2 and "cannot read checkpoint" in err


@pytest.mark.parametrize("target, words", [
    ("missing/dir/ck.safetensors", ["does not exist"]),
    (".", ["a checkpoint is a .safetensors or .npz file"]),
    ("adir.npz", ["is a directory; refusing to replace it"]),
    ("/dev/full", ["a checkpoint is a .safetensors or .npz file"]),
])
def test_save_path_is_checked_before_training(capsys, tmp_path, monkeypatch, target, words):
    import runtime.session as session
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir.npz").mkdir()
    monkeypatch.setattr(session.Session, "fit", lambda *a, **k: pytest.fail("trained before checking --save"))
    code, err = run_cli(capsys, "run", EXAMPLES / "mlp.dl", "--save", target, "--quiet")
    assert code == 2
    for w in words:
        assert w in err, err


def test_save_refuses_a_device_node(tmp_path):
    import os
    import stat
    from dsl.diagnostics import DlcError
    from runtime import checkpoint
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    with pytest.raises(DlcError, match="not a regular file; refusing"):
        checkpoint.save(fifo, {"w": np.zeros(2)}, {}, {})
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_failed_save_leaves_no_temp_file_and_the_old_checkpoint(tmp_path, monkeypatch):
    import os
    from runtime import checkpoint
    ck = tmp_path / "ck.npz"
    checkpoint.save(ck, {"w": np.ones(2)}, {}, {"step": 1})

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    from dsl.diagnostics import DlcError
    with pytest.raises(DlcError, match="No space left"):
        checkpoint.save(ck, {"w": np.zeros(2)}, {}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]
    params, _, meta = checkpoint.load(ck)
    assert meta["step"] == 1 and np.array_equal(params["w"], np.ones(2))


# ---- numerical faults --------------------------------------------------------------------------
NUM = ("model m(x: f32[B, 64]) -> f32[B, 10] {{\n    h = dense(x, 32)\n    h = {expr}\n    return dense(h, 10)\n}}\n"
       "train m on digits() {{\n    loss = cross_entropy(m(x), y)\n    optimizer = {opt}\n    epochs = 2\n}}\n")


@pytest.mark.parametrize("expr, opt, line, words", [
    # the model's own NaN, forward: named at the op, not blamed on the learning rate
    ("sqrt(h - 100.0)", "adam(lr = 1e-3)", 3, ["the model computes NaN", "`sqrt` in the forward pass", "step 1",
                                               "not the learning rate"]),
    # finite loss, infinite gradient: found in the backward pass
    ("h + sqrt(h * 0.0)", "adam(lr = 1e-3)", 3, ["the model computes an infinity", "backward pass", "step 1"]),
    # a huge first update (Adam moves every weight by about lr), and a loss that climbs
    ("relu(h)", "adam(lr = 1e9)", 8, ["training diverged", "moved parameter `m/dense_1/W` by 1e+09"]),
    ("relu(h)", "sgd(lr = 1e9)", 8, ["training diverged", "moved parameter"]),
    ("relu(h)", "sgd(lr = 30.0)", 8, ["training diverged: the loss rose from", "try a smaller learning rate"]),
])
def test_numerical_faults_are_named(capsys, dl_file, expr, opt, line, words):
    p = dl_file(NUM.format(expr=expr, opt=opt))
    code, err = run_cli(capsys, "run", p, "--quiet")
    assert code == 2, err
    located(err, p, line)
    for w in words:
        assert w in err, err


def test_first_nonfinite_replays_with_the_references():
    # the locator is a NumPy replay of the step: independent of the kernels
    from runtime import numerics
    from runtime.session import Options, Session
    s = Session(EXAMPLES / "mlp.dl", Options(epochs=1))
    batch = {k: v[:8] for k, v in s.dataset.train.items()}
    params = {k: v.copy() for k, v in s.params.items()}
    state = {k: v.copy() for k, v in s.state.items()}
    from compiler.optim import step_scalars
    sc = {"rng": 0, **step_scalars(s.phases[0].optimizer, 1)}
    assert numerics.first_nonfinite(s, 0, params, state, batch, sc) is None
    params["mlp/dense_2/W"][:, 0] = 3e38            # finite weights whose products overflow float32
    n, g, v = numerics.first_nonfinite(s, 0, params, {k: v.copy() for k, v in state.items()}, batch, sc)
    assert g[n]["op"] == "matmul" and g[g.args(n)[1]]["name"] == "mlp/dense_2/W" and g[n]["role"] == "forward"
    assert not np.isfinite(v[:, 0]).all() and np.isfinite(v[:, 1:]).all()


# ---- the kernel cache --------------------------------------------------------------------------
def _run_mlp(capsys):
    code = main(["run", str(EXAMPLES / "mlp.dl"), "--epochs", "0", "--quiet", "--json"])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, json.loads(out.out.strip().splitlines()[-1]), out.err


def _run_mlp_process(cache):
    import os
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(EXAMPLES / "mlp.dl"), "--epochs", "0",
                        "--quiet", "--json"], capture_output=True, text=True, cwd=EXAMPLES.parent,
                       env={**os.environ, "DLC_CACHE_DIR": str(cache)}, timeout=300)
    assert "Traceback" not in p.stderr
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("which", ["nbi", "nbc"])
def test_a_damaged_kernel_cache_repairs_itself(tmp_path, which):
    # in separate processes: Numba reads its on-disk cache only in a fresh one
    code, first, _ = _run_mlp_process(tmp_path)
    assert code == 0
    files = list(tmp_path.glob(f"kernels/__pycache__/*.{which}"))
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[:20])
    code, again, err = _run_mlp_process(tmp_path)
    assert code == 0 and "was damaged" in err and again["test"] == first["test"]
    code, third, err = _run_mlp_process(tmp_path)      # repaired: no warning, kernels from the cache
    assert code == 0 and "damaged" not in err and third["kernel_cache_hit"]


def test_an_unusable_cache_dir_falls_back_with_a_warning(capsys, tmp_path, monkeypatch):
    import compiler.cache as cache
    f = tmp_path / "a-file"
    f.write_text("")
    monkeypatch.setenv("DLC_CACHE_DIR", str(f))
    monkeypatch.setattr(cache, "_FALLBACK", None)
    d1, d2 = cache.cache_dir(), cache.cache_dir()
    assert d1 == d2 and d1.is_dir() and f not in d1.parents
    assert capsys.readouterr().err.count("warning: cannot use the kernel cache") == 1
    code, rep, err = _run_mlp(capsys)
    assert code == 0 and rep["test"]


def test_shared_parameter_shapes_are_not_swapped(capsys, dl_file):
    p = dl_file('model m(x: f32[B, 4]) -> f32[B, 3] {\n    h = dense(x, 4, name = "s")\n'
                '    return dense(h, 3, name = "s")\n}\n')
    code, err = run_cli(capsys, "check", p)
    assert code == 2
    located(err, p, 3)
    # here (line 3) W is [4, 3]; at its first use (line 2) it was [4, 4]
    assert f"is [4, 3] here but [4, 4] at its first use ({p}:2:" in err


def test_a_killed_saves_temp_file_is_removed_by_the_next_save(tmp_path):
    import os
    import time
    from runtime import checkpoint
    ck = tmp_path / "ck.npz"
    stale, fresh = tmp_path / ".ck.npz.abc123.tmp", tmp_path / ".ck.npz.def456.tmp"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"x")                         # maybe another save in progress: kept
    old = time.time() - 2 * checkpoint.STALE_SECONDS
    os.utime(stale, (old, old))
    checkpoint.save(ck, {"w": np.ones(2)}, {}, {})
    assert not stale.exists() and fresh.exists() and ck.exists()


def test_a_training_checkpoint_loads_for_prediction(mlp_session, tmp_path):
    from runtime.session import Options, Session
    ck = tmp_path / "ck.safetensors"
    mlp_session.save(ck)
    s = Session(EXAMPLES / "mlp.dl", Options(train=False, seed=None))
    s.load(ck)                               # the optimizer's moments are not needed here
    for k, v in mlp_session.params.items():
        assert np.array_equal(s.params[k], v)


def test_column_labels_do_not_broadcast_against_logits(capsys, tmp_path):
    # y of shape [N, 1] against logits [B, 3] was broadcast to [B, B, 3]: a wrong loss
    np.savez(tmp_path / "d.npz", x=np.ones((40, 4)), y=(np.arange(40) % 3).reshape(40, 1))
    p = data_case(tmp_path, 'npz("d.npz")')
    code, err = run_cli(capsys, "check", p)
    assert code == 2 and "[B, 1]" in err, err


def test_a_module_file_deleted_before_numba_reads_it_is_written_again(tmp_path, monkeypatch):
    """The cache directory cleared between writing a kernel module and Numba looking at it:
    Numba finds no file ("no locator available"); the module is written again and loads."""
    from compiler import cache
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path / "c"))
    src = "from numba import njit\n\n@njit(cache=True)\ndef f(x):\n    return x + 1\n"
    real, calls = cache._write, []

    def write_then_lose(path, source):
        out = real(path, source)
        calls.append(path)
        if len(calls) == 1:
            out.unlink()                  # the race: gone before Numba's cache locator sees it
        return out
    monkeypatch.setattr(cache, "_write", write_then_lose)
    mod = cache.load(src, "cpu", name="dlc_race_test_module")
    assert mod.f(41) == 42 and len(calls) == 2
