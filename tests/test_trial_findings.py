"""What a new-user trial of 2026-12-07 found: metrics scored against the wrong target, a short
`--input` read past the program's arrays, metrics asked for and silently dropped."""
import json

import numpy as np
import pytest

from dsl.diagnostics import DlcError
from runtime.cli import main
from runtime.session import Options, Session


def _run(tmp_path, capsys, src, *flags):
    p = tmp_path / "m.dl"
    p.write_text(src)
    assert main(["run", str(p), "--json", "--quiet", *flags]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def test_metrics_score_the_target_expression_the_loss_uses(tmp_path, capsys):
    """`mse(ae(x / 16), x / 16)`: the test MSE is the loss, not the error against raw `x`."""
    rep = _run(tmp_path, capsys, """
model ae(x: f32[B, 64]) -> f32[B, 64] { return dense(relu(dense(x, 16)), 64) }
train ae on digits(test = 0.2, scale = false) {
    loss = mse(ae(x / 16), x / 16)
    optimizer = adam(lr = 3e-3)
    epochs = 2
    metrics = [loss, mse, mae]
}""")
    t = rep["test"]
    assert t["mse"] == pytest.approx(t["loss"], rel=1e-4), t
    assert rep["test_report"]["mse"] == pytest.approx(t["loss"], rel=1e-4)
    assert 0 < t["mae"] < 1                 # pixels / 16 are in [0, 1]


def test_metrics_of_a_bound_target_are_computed(tmp_path, capsys):
    rep = _run(tmp_path, capsys, """
model reg(x: f32[B, 64]) -> f32[B, 1] { return dense(x, 1) }
train reg on digits(test = 0.2) {
    target = mean(x, axis = 1, keepdims = true)
    loss = mse(reg(x), target)
    optimizer = adam(lr = 3e-3)
    epochs = 3
    metrics = [loss, mse, r2]
}""")
    t = rep["test"]
    assert set(t) >= {"loss", "mse", "r2"}, t
    assert t["mse"] == pytest.approx(t["loss"], rel=1e-4)
    assert rep["test_report"]["r2"] == pytest.approx(t["r2"])


def test_the_task_is_the_loss_that_trains_the_named_model(tmp_path, capsys):
    """With phases, the metrics follow the loss of the model after `train`, not the first loss."""
    rep = _run(tmp_path, capsys, """
model clf(x: f32[B, 64]) -> f32[B, 10] { return dense(relu(dense(x, 32)), 10) }
model rec(x: f32[B, 64]) -> f32[B, 64] { return dense(relu(dense(x, 16)), 64) }
train clf on digits(test = 0.2) {
    phase recon {
        loss   = mse(rec(x), x)
        params = ["rec"]
    }
    phase head {
        loss      = cross_entropy(clf(x), y)
        params    = ["clf"]
        optimizer = adam(lr = 3e-3)
    }
    epochs  = 4
    metrics = [accuracy]
}""")
    assert rep["test"]["accuracy"] > 0.8, rep["test"]
    assert "confusion" in rep["test_report"]


def test_exact_on_one_label_per_example_is_its_accuracy(tmp_path, capsys):
    rep = _run(tmp_path, capsys, """
model net(x: f32[B, 64]) -> f32[B, 10] { return dense(x, 10) }
train net on digits(test = 0.2) {
    loss = cross_entropy(net(x), y)
    optimizer = adam(lr = 1e-2)
    epochs = 2
    metrics = [exact, accuracy]
}""")
    assert rep["test"]["exact"] == pytest.approx(rep["test"]["accuracy"]) and rep["test"]["exact"] > 0.5


TAGGER = """
model tg(x: i32[B, 10]) -> f32[B, 10, 2] {
    return dense(embedding(x, 9, 8), 2)
}
train tg on tagging(n = 300, length = 10, vocab = 8) {
    loss = cross_entropy(tg(x), y)
    optimizer = adam(lr = 5e-3)
    batch = 32
    epochs = 1
}
"""


def test_a_short_input_is_refused_where_the_data_has_no_padding(tmp_path, capsys):
    p = tmp_path / "tg.dl"
    p.write_text(TAGGER)
    ck = tmp_path / "tg.npz"
    assert main(["run", str(p), "--save", str(ck), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["predict", str(p), "--load", str(ck), "--input", "2 3"]) == 2
    assert "reads exactly 10 tokens" in capsys.readouterr().err
    assert main(["predict", str(p), "--load", str(ck), "--input", "2 3 4 5 6 7 8 1 2 3", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)["predictions"][0]["prediction"].split()
    assert len(pred) == 10


def test_a_batch_of_the_wrong_shape_is_an_error_not_a_read_past_the_end(tmp_path):
    p = tmp_path / "tg.dl"
    p.write_text(TAGGER)
    s = Session(p, Options(epochs=1))
    good = {k: np.ascontiguousarray(v[:4]) for k, v in s.dataset.test.items()}
    assert s.run_eval(good)["output"].shape == (4, 10, 2)
    short = {**good, "x": np.ascontiguousarray(good["x"][:, :3])}
    with pytest.raises(DlcError, match=r"`x` is \[4, 3\] int32; the program reads \[B, 10\] int32"):
        s.run_eval(short)
    with pytest.raises(DlcError, match=r"`y` is \[3, 10\]"):       # B bound by x: 4
        s.train_step({**good, "y": np.ascontiguousarray(good["y"][:3])})
    with pytest.raises(DlcError, match="int64"):
        s.run_eval({**good, "x": good["x"].astype(np.int64)})
    loss, out = s.train_step(good)                  # and the right shapes still run
    assert np.isfinite(loss) and out.shape == (4, 10, 2)


@pytest.mark.parametrize("pad, want", [("right", [5, 6, "P", "P"]), ("left", ["P", "P", 5, 6]), (None, ["P", "P", 5, 6])])
def test_input_tokens_are_padded_on_the_data_sources_side(pad, want):
    from types import SimpleNamespace

    from runtime.data import PAD
    from runtime.predict import encode_inputs
    vocab = ["<pad>", "<s>", "</s>", "a", "b", "five", "six"]
    ds = SimpleNamespace(info={"input_vocab": vocab, "pad": pad}, train={"x": np.zeros((2, 4), np.int32)})
    batch, _ = encode_inputs(ds, ["five six"])
    assert batch["x"].tolist() == [[PAD if w == "P" else w for w in want]]


def _check(tmp_path, capsys, src, name="m.dl"):
    p = tmp_path / name
    p.write_text(src)
    rc = main(["check", str(p)])
    return rc, capsys.readouterr().err


def test_an_unknown_model_is_pointed_at_by_its_name(tmp_path, capsys):
    rc, err = _check(tmp_path, capsys, """model net(x: f32[B, 64]) -> f32[B, 10] { return dense(x, 10) }
train nett on digits() {
    loss = cross_entropy(nett(x), y)
}""")
    assert rc == 2
    assert "m.dl:2:7: error: unknown model `nett`" in err and "did you mean `net`" in err
    assert err.splitlines()[2].strip() == "^~~~"


def test_an_unknown_schedule_lists_the_schedules(tmp_path, capsys):
    rc, err = _check(tmp_path, capsys, """model net(x: f32[B, 64]) -> f32[B, 10] { return dense(x, 10) }
train net on digits() {
    loss = cross_entropy(net(x), y)
    optimizer = adam(lr = 1e-3, schedule = linear())
}""")
    assert rc == 2 and "m.dl:4:44: error: unknown schedule `linear`" in err and "cosine" in err


def test_a_file_importing_itself_is_read_once(tmp_path, capsys):
    rc, err = _check(tmp_path, capsys, """import "m.dl"
model net(x: f32[B, 64]) -> f32[B, 10] { return dense(x, 10) }
train net on digits() {
    loss = cross_entropy(net(x), y)
}""")
    assert rc == 0, err


# ---- the second trial (later chapters) ----------------------------------------------------------
def test_a_nan_after_masked_attention_is_blamed_on_its_op_not_the_masks_infinity(tmp_path, capsys):
    p = tmp_path / "nan.dl"
    p.write_text("""model enc(x: i32[B, 6]) -> f32[B, 13] {
    h = embedding(unpad(x), 30, 16)
    h = transformer_encoder_block(h, heads = 2, mask = padding_mask(x))
    h = sqrt(h - 100.0)
    return dense(mean(h, axis = 1), 13)
}
train enc on number_words(test = 0.2) {
    loss      = cross_entropy(enc(x), y[:, 0])
    optimizer = adam(lr = 1e-3)
    batch     = 64
    epochs    = 1
}""")
    assert main(["run", str(p), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nan.dl:4:9: error: the model computes NaN: `sqrt` in the forward pass" in err, err


def test_text_that_is_not_utf8_is_a_located_error(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"hello \xff\xfe world " * 20)
    p = tmp_path / "m.dl"
    p.write_text("""model lm(x: i32[B, 8]) -> f32[B, 8, 16] { return dense(embedding(x, 16, 8), 16) }
train lm on text("bad.txt", context = 8) {
    loss = cross_entropy(lm(x), y)
}""")
    assert main(["run", str(p), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "m.dl:2:13: error: `text`:" in err and "is not UTF-8 text (byte 0xff at offset 6)" in err


def test_sample_and_predict_seeds_are_range_checked(capsys):
    for cmd in ("sample", "predict"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "examples/gan.dl", "--load", "x.npz", "--seed", str(2 ** 63)])
        assert e.value.code == 2
        assert "--seed: must be below 4,294,967,296" in capsys.readouterr().err


def test_predict_reads_a_character_models_input_as_characters():
    from types import SimpleNamespace

    from runtime.predict import encode_inputs
    chars = [" ", ".", "a", "b", "c"]
    ds = SimpleNamespace(info={"input_vocab": chars, "vocab": chars, "join": ""},
                         train={"x": np.zeros((2, 4), np.int32)})
    assert encode_inputs(ds, ["ab c"])[0]["x"].tolist() == [[2, 3, 0, 4]]
    with pytest.raises(DlcError, match="reads exactly 4 characters.*dlc sample --prompt"):
        encode_inputs(ds, ["ab"])
    with pytest.raises(DlcError, match="unknown character 'z'"):
        encode_inputs(ds, ["abcz"])


def _tiny_gan(tmp_path, capsys, *flags):
    """tests/test_generative.py's two-phase GAN, trained one epoch: (its .dl file, its checkpoint)."""
    from tests.test_generative import TINY_GAN
    p = tmp_path / "gan.dl"
    p.write_text(TINY_GAN)
    ck = tmp_path / "g.safetensors"
    assert main(["run", str(p), *flags, "--save", str(ck), "--quiet"]) == 0
    capsys.readouterr()
    return p, ck


def test_sample_refuses_a_checkpoint_it_would_round(tmp_path, capsys):
    p, ck = _tiny_gan(tmp_path, capsys, "--dtype", "f64")
    assert main(["sample", str(p), "--load", str(ck), "-n", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "is float64[4, 64], the program's is float32[4, 64]" in err and "same --dtype" in err
    assert main(["sample", str(p), "--load", str(ck), "-n", "2", "--dtype", "f64", "--out", str(tmp_path / "s.png")]) == 0


def test_sample_refuses_flags_it_would_ignore(tmp_path, capsys):
    p, ck = _tiny_gan(tmp_path, capsys)
    assert main(["sample", str(p), "--load", str(ck), "-n", "2", "--json"]) == 2
    assert "--json is for text programs; `samples` draws images" in capsys.readouterr().err


def test_samples_that_are_not_images_point_at_the_generate_block(tmp_path, capsys):
    p = tmp_path / "g.dl"
    p.write_text("""model G(z: f32[B, 4]) -> f32[B, 10] { return sigmoid(dense(z, 10)) }
train G on digits(test = 0.2) {
    loss = mse(G(x[:, 0:4]), x[:, 0:10])
    epochs = 1
}
generate samples(n) { return G(normal([n, 4])) }""")
    ck = tmp_path / "g.npz"
    assert main(["run", str(p), "--save", str(ck), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["sample", str(p), "--load", str(ck), "-n", "2", "--out", str(tmp_path / "s.png")]) == 2
    assert "g.dl:6:30: error: cannot show samples of shape [2, 10] as images" in capsys.readouterr().err


def test_ir_shows_a_sampling_program(tmp_path, capsys):
    from tests.test_generative import TINY_GAN
    p = tmp_path / "gan.dl"
    p.write_text(TINY_GAN)
    assert main(["ir", str(p), "--program", "samples", "--stage", "fused"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph samples  (after fusion)") and "kernels:" in out
    assert main(["ir", str(p), "--program", "sample"]) == 2
    assert "its generate blocks: samples, tokens" in capsys.readouterr().err
    assert main(["ir", str(p), "--program", "samples", "--stage", "autodiff"]) == 2
    assert "`samples` has no `autodiff` stage" in capsys.readouterr().err


# ---- the third trial (data and workflow) --------------------------------------------------------
def _csv_model(tmp_path, header, rows, extra=""):
    (tmp_path / "d.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    p = tmp_path / "m.dl"
    p.write_text(f"""model net(x: f32[B, 2]) -> f32[B, 2] {{ return dense(x, 2) }}
train net on csv("d.csv", label = "y"{extra}) {{
    loss = cross_entropy(net(x), y)
}}""")
    return p


@pytest.mark.parametrize("header, rows, message", [
    ("a,a,y", ["1,2,0", "3,4,1"], "the column `a` appears twice in its header"),
    ("1.5,2,0", ["1,2,0", "3,4,1"], "its first line, read as the header, is all numbers"),
])
def test_csv_headers_that_would_misread_the_data_are_errors(tmp_path, capsys, header, rows, message):
    p = _csv_model(tmp_path, header, rows)
    assert main(["check", str(p)]) == 2
    err = capsys.readouterr().err
    assert message in err and "m.dl:2:" in err


def test_csv_header_cells_are_stripped(tmp_path, capsys):
    p = _csv_model(tmp_path, "a, b, y", [f"{i},{-i},{i % 2}" for i in range(20)])
    assert main(["check", str(p)]) == 0, capsys.readouterr().err


def test_predict_csv_columns_go_by_name_or_not_at_all(tmp_path, capsys):
    from types import SimpleNamespace

    from runtime.predict import _read_csv
    ds = SimpleNamespace(info={"csv_features": [("a", None), ("b", None)]})
    f = tmp_path / "in.csv"
    f.write_text("b,a\n2,1\n")
    assert _read_csv(ds, f).tolist() == [[1.0, 2.0]]              # by name, reordered
    f.write_text("b,zz\n2,1\n")
    with pytest.raises(DlcError, match="has no column `a`"):       # was: read by position
        _read_csv(ds, f)
    f.write_text("a,a,b\n1,2,3\n")
    with pytest.raises(DlcError, match="`a` appears twice"):
        _read_csv(ds, f)
    f.write_text("1,2\n3,4\n")                                    # no header: by position
    assert _read_csv(ds, f).tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_a_16_bit_grey_image_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    from runtime.data import read_image
    a = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")                  # mode I;16
    Image.fromarray((a // 257).astype(np.uint8)).save(tmp_path / "g8.png")
    x16, x8 = read_image(tmp_path / "g16.png", 8, 1), read_image(tmp_path / "g8.png", 8, 1)
    np.testing.assert_allclose(x16, x8, atol=1 / 255)
    assert x16.min() == 0 and x16.max() == pytest.approx(1.0)


def test_predict_an_empty_npz_is_an_error(tmp_path):
    from types import SimpleNamespace

    from runtime.predict import read_input_file
    ds = SimpleNamespace(info={}, train={"x": np.zeros((3, 4), np.float32)})
    np.savez(tmp_path / "e.npz", x=np.ones((0, 4)))
    with pytest.raises(DlcError, match=r"holds no examples \(\[0, 4\]\)"):
        read_input_file(ds, str(tmp_path / "e.npz"))


def test_a_resumed_run_keeps_the_best_epoch_and_the_log(tmp_path, capsys):
    p = tmp_path / "dv.dl"
    p.write_text("""model net(x: f32[B, 64]) -> f32[B, 10] { return dense(x, 10) }
train net on digits(test = 0.2, val = 0.1) {
    loss = cross_entropy(net(x), y)
    optimizer = adam(lr = 0.3)
    batch = 64
}""")
    ck, lg = tmp_path / "e1.safetensors", tmp_path / "run.jsonl"
    assert main(["run", str(p), "--epochs", "4", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert whole["best_epoch"] == 1          # this lr overfits after the first epoch (the trial's case)
    assert main(["run", str(p), "--epochs", "1", "--save", str(ck), "--log", str(lg), "--json"]) == 0
    capsys.readouterr()
    assert main(["run", str(p), "--epochs", "3", "--resume", str(ck), "--log", str(lg), "--json"]) == 0
    out = capsys.readouterr()
    assert " *" not in out.err                # no later epoch is marked best: epoch 1 stays the best
    assert "the best epoch (1, val loss" in out.err and "before this run resumed" in out.err
    assert [json.loads(line)["epoch"] for line in lg.read_text().splitlines()] == [1, 2, 3, 4]
    assert main(["run", str(p), "--epochs", "0", "--plot", str(tmp_path / "p.png")]) == 0
    assert "no epoch ran, nothing to plot" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


def test_empty_labels_and_empty_class_folders_are_errors(tmp_path, capsys):
    p = _csv_model(tmp_path, "a,b,y", ["1,2,cat", "3,4,", "5,6,dog"])
    assert main(["check", str(p)]) == 2
    assert "d.csv:3: the label `y` is empty" in capsys.readouterr().err
    from PIL import Image
    for c in ("a", "b", "empty"):
        (tmp_path / "pics" / c).mkdir(parents=True)
    for c in ("a", "b"):
        for i in range(3):
            Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(tmp_path / "pics" / c / f"{i}.png")
    q = tmp_path / "img.dl"
    q.write_text("""model net(x: f32[B, 1, 4, 4]) -> f32[B, 3] { return dense(flatten(x), 3) }
train net on images("pics", size = 4) { loss = cross_entropy(net(x), y) }""")
    assert main(["check", str(q)]) == 2
    assert "the class folder `empty` of" in capsys.readouterr().err


def test_checkpoints_that_are_not_finite_or_from_another_run_are_said(tmp_path, capsys):
    from runtime import checkpoint
    p = tmp_path / "d.dl"
    p.write_text("""model net(x: f32[B, 64]) -> f32[B, 10] { return dense(x, 10) }
train net on digits(test = 0.2) {
    loss = cross_entropy(net(x), y)
    optimizer = adam(lr = 1e-2)
    epochs = 1
}""")
    ck = tmp_path / "a.npz"
    assert main(["run", str(p), "--save", str(ck), "--quiet"]) == 0
    q = tmp_path / "d30.dl"
    q.write_text(p.read_text().replace("test = 0.2", "test = 0.3").replace("adam(lr = 1e-2)", "sgd(lr = 0.1)"))
    capsys.readouterr()
    assert main(["run", str(q), "--resume", str(ck), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "was trained on `digits(test = 0.2)`, seed 0; this run reads `digits(test = 0.3)`" in err
    assert "was trained with adam: its optimizer state is dropped" in err
    params, state, meta = checkpoint.load(ck)
    params["net/dense_1/W"][0, 0] = np.nan
    checkpoint.save(tmp_path / "nan.npz", params, state, meta)
    assert main(["predict", str(p), "--load", str(tmp_path / "nan.npz"), "--index", "0"]) == 2
    assert "parameter `net/dense_1/W` holds 1 NaN or infinite value" in capsys.readouterr().err
