"""The training workflow of issue 12, second part: metrics that follow the task (checked against
NumPy and scikit-learn), `dlc predict` on any model, real-world data sources, graph pictures
and the progress bar."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.cli import main
from runtime.metrics import Accumulator, Task

ROOT = Path(__file__).resolve().parent.parent


# ---- metrics -------------------------------------------------------------------------------------
def _feed(task, wanted, out, y, keep=False, batches=3):
    acc = Accumulator(task, wanted, keep=keep)
    for part in np.array_split(np.arange(len(out)), batches):
        acc.add(out[part], {task.target: y[part]})
    return acc


def test_classification_metrics_against_numpy_and_sklearn():
    from sklearn.metrics import top_k_accuracy_score
    rng = np.random.default_rng(0)
    n, c = 300, 6
    y = rng.integers(0, c, n)
    out = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y] * rng.random((n, 1))    # better than chance
    acc = _feed(Task("cross_entropy", "y"), ["accuracy", "top2", "top3", "f1", "loss"], out, y)
    m = acc.result()
    pred = out.argmax(1)
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    for k in (2, 3):
        assert m[f"top{k}"] == pytest.approx(top_k_accuracy_score(y, out, k=k, labels=np.arange(c)))
    cm = np.zeros((c, c), int)                         # the confusion matrix and F1, by hand
    np.add.at(cm, (y, pred), 1)
    prec, rec = np.diag(cm) / cm.sum(0), np.diag(cm) / cm.sum(1)
    f1 = 2 * prec * rec / (prec + rec)
    assert m["f1"] == pytest.approx(f1.mean())
    rep = acc.report(class_names=list("abcdef"))
    assert rep["confusion"] == cm.tolist() and rep["classes"] == list("abcdef")
    np.testing.assert_allclose(rep["precision"], prec)
    np.testing.assert_allclose(rep["recall"], rec)
    np.testing.assert_allclose(rep["f1"], f1)
    assert rep["support"] == np.bincount(y, minlength=c).tolist()


def test_sequence_metrics_skip_padding():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, (50, 7))
    y[rng.random((50, 7)) < 0.3] = -1                 # padding
    out = rng.normal(size=(50, 7, 4))
    m = _feed(Task("cross_entropy", "y"), ["accuracy", "exact", "top2"], out, y).result()
    mask = y >= 0
    pred = out.argmax(-1)
    assert m["accuracy"] == pytest.approx(np.mean(pred[mask] == y[mask]))
    assert m["exact"] == pytest.approx(np.mean(np.all((pred == y) | ~mask, axis=1)))
    top2 = np.argsort(-out, -1)[..., :2]
    assert m["top2"] == pytest.approx(np.mean((top2 == y[..., None]).any(-1)[mask]))


def test_binary_auc_against_the_rank_statistic():
    rng = np.random.default_rng(2)
    y = (rng.random(200) < 0.4).astype(np.float32)
    logit = rng.normal(size=200) + 1.5 * y
    acc = _feed(Task("bce_with_logits", "y"), ["accuracy", "auc"], logit, y)
    pos, neg = logit[y > 0.5], logit[y < 0.5]         # AUC = P(a positive outranks a negative)
    auc = np.mean(pos[:, None] > neg[None, :])
    assert acc.result()["auc"] == pytest.approx(auc)
    rep = acc.report()
    (tn, fp), (fn, tp) = rep["confusion"]
    assert tp == np.sum((logit > 0) & (y > 0.5)) and fp == np.sum((logit > 0) & (y < 0.5))
    assert tn + fp + fn + tp == 200
    assert _feed(Task("bce_with_logits", "y"), ["auc"], logit, np.ones(200)).result()["auc"] is None


def test_regression_metrics_against_numpy():
    rng = np.random.default_rng(3)
    y = rng.normal(size=(80, 3))
    out = y + 0.3 * rng.normal(size=(80, 3))
    m = _feed(Task("mse", "y"), ["mse", "rmse", "r2"], out, y).result()
    err = out - y
    assert m["mse"] == pytest.approx(np.mean(err ** 2)) and m["rmse"] == pytest.approx(np.sqrt(np.mean(err ** 2)))
    r2 = 1 - (err ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    assert m["r2"] == pytest.approx(r2.mean()) and "mae" not in m
    assert _feed(Task("mse", "y"), [], out, y, keep=True).report()["mae"] == pytest.approx(np.abs(err).mean())


@pytest.mark.slow
def test_run_prints_the_per_class_report_and_keeps_it_in_json(capsys, dl_file):
    p = dl_file("model m(x: f32[B, 64]) -> f32[B, 10] {\n    return dense(x, 10)\n}\n"
                "train m on digits() {\n    loss = cross_entropy(m(x), y)\n    optimizer = adam(lr = 0.01)\n"
                "    epochs = 2\n    metrics = [accuracy, top3, f1, loss]\n}\n")
    assert main(["run", str(p), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["class", "precision", "recall", "f1", "support"]
    assert any(ln.startswith("confusion matrix") for ln in out) and out[-1].startswith("test: loss")
    assert "top3" in out[-1] and "f1" in out[-1]
    assert main(["run", str(p), "--quiet", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.splitlines()[-1])
    cm = np.array(rep["test_report"]["confusion"])
    assert cm.shape == (10, 10) and cm.sum() == 360
    assert rep["test"]["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert rep["test"]["f1"] == pytest.approx(rep["test_report"]["macro_f1"])


def test_unknown_metric_names_the_choices(capsys, dl_file):
    p = dl_file("model m(x: f32[B, 64]) -> f32[B, 10] {\n    return dense(x, 10)\n}\n"
                "train m on digits() {\n    loss = cross_entropy(m(x), y)\n    metrics = [accuracy, auc]\n}\n")
    assert main(["check", str(p)]) == 0          # a known name: checked against the loss when run
    assert main(["run", str(p), "--epochs", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{p}:6:" in err and "`auc` is not a metric of a model trained with `cross_entropy`" in err
    assert "top3, top5 (any topK)" in err


# ---- CSV with text columns, and `dlc predict` on feature vectors ----------------------------------
def _pets_csv(path, n=60, seed=0):
    """Two numbers, a text feature and a text class that depends on them."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    colour = rng.choice(["red", "green", "blue"], n)
    cls = np.where(a + (colour == "red") > 0.5, "dog", np.where(b > 0, "cat", "bird"))
    lines = ["a,colour,b,kind"] + [f"{x:.6f},{c},{y:.6f},{k}" for x, c, y, k in zip(a, colour, b, cls)]
    path.write_text("\n".join(lines) + "\n")
    return a, b, colour, cls


PETS = """
model m(x: f32[B, 5]) -> f32[B, 3] {
    return dense(x, 3)
}
train m on csv("pets.csv", label = "kind", onehot = ["colour"], test = 0) {
    loss = cross_entropy(m(x), y)
    optimizer = adam(lr = 0.05)
    epochs = 3
    batch = 16
}
"""


def test_csv_text_classes_and_one_hot_features(dl_file, tmp_path):
    from runtime.session import Session
    a, b, colour, cls = _pets_csv(tmp_path / "pets.csv")
    s = Session(dl_file(PETS))
    ds = s.dataset
    assert ds.info["class_names"] == ["bird", "cat", "dog"]                    # sorted
    np.testing.assert_array_equal(ds.train["y"], np.searchsorted(["bird", "cat", "dog"], cls))
    raw = np.column_stack([a, colour == "blue", colour == "green", colour == "red", b]).astype(np.float64)
    mu, sd = raw.mean(0), raw.std(0)                                          # test = 0: the file's order
    np.testing.assert_allclose(ds.train["x"], (raw - mu) / sd, rtol=1e-5, atol=1e-5)


def test_csv_text_feature_without_onehot_says_how(capsys, dl_file, tmp_path):
    _pets_csv(tmp_path / "pets.csv")
    p = dl_file(PETS.replace(', onehot = ["colour"]', ""))
    assert main(["check", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:5:" in err and "column `colour` holds text (`blue`, `green`, `red`, ...)" in err
    assert 'onehot = ["colour"]' in err


@pytest.mark.slow
def test_predict_feature_file_names_classes_and_writes_outputs(capsys, dl_file, tmp_path):
    from runtime.session import Options, Session
    _pets_csv(tmp_path / "pets.csv")
    p = dl_file(PETS)
    ck = tmp_path / "pets.safetensors"
    assert main(["run", str(p), "--quiet", "--save", str(ck)]) == 0
    capsys.readouterr()
    # the training file itself as input: the label column is ignored, colours one-hot, scaled
    assert main(["predict", str(p), "--load", str(ck), "--input-file", str(tmp_path / "pets.csv"), "--top", "2",
                 "--output", str(tmp_path / "preds.npz"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    s = Session(p, Options(epochs=0))
    s.load(ck)
    logits = s.run_eval(s.dataset.train)["output"].astype(np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = np.array(["bird", "cat", "dog"])
    assert [r["prediction"] for r in rows] == list(names[logits.argmax(1)])
    np.testing.assert_allclose([[p for _, p in r["top"]] for r in rows], -np.sort(-probs, 1)[:, :2], rtol=1e-5)
    assert [r["top"][1][0] for r in rows] == list(names[np.argsort(-probs, 1)[:, 1]])
    saved = np.load(tmp_path / "preds.npz")
    np.testing.assert_allclose(saved["probabilities"], probs, rtol=1e-5)
    assert list(saved["classes"]) == list(names) and list(saved["prediction"]) == list(names[logits.argmax(1)])
    # an npz of the scaled-back features gives the same; a CSV output has a column per class
    raw = s.dataset.train["x"] * s.dataset.info["scaling"]["x"][1] + s.dataset.info["scaling"]["x"][0]
    np.savez(tmp_path / "in.npz", x=raw[:4])
    assert main(["predict", str(p), "--load", str(ck), "--input-file", str(tmp_path / "in.npz"),
                 "--output", str(tmp_path / "preds.csv")]) == 0
    lines = (tmp_path / "preds.csv").read_text().splitlines()
    assert lines[0] == "input,prediction,p_bird,p_cat,p_dog" and len(lines) == 5
    np.testing.assert_allclose([[float(v) for v in ln.split(",")[2:]] for ln in lines[1:]], probs[:4], rtol=1e-4)
    # mistakes: a colour never seen in training, a bad output suffix
    (tmp_path / "bad.csv").write_text("a,colour,b\n0.1,purple,0.2\n")
    assert main(["predict", str(p), "--load", str(ck), "--input-file", str(tmp_path / "bad.csv")]) == 2
    assert "bad.csv:2: column `colour` holds `purple`, not a category seen in training" in capsys.readouterr().err
    assert main(["predict", str(p), "--load", str(ck), "--output", str(tmp_path / "p.txt")]) == 2
    assert "a .csv or .npz file" in capsys.readouterr().err
    # the classes the checkpoint was trained on are kept: data that now names others is refused
    csv_text = (tmp_path / "pets.csv").read_text()
    (tmp_path / "pets.csv").write_text(csv_text.replace(",bird", ",fish"))
    assert main(["predict", str(p), "--load", str(ck)]) == 2
    assert "trained on the classes bird, cat, dog; the data now holds cat, dog, fish" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_regression_prints_values(capsys, dl_file, tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=(x @ [1.0, -2.0, 0.5]).astype(np.float32))
    p = dl_file('model m(x: f32[B, 3]) -> f32[B] {\n    return reshape(dense(x, 1), [-1])\n}\n'
                'train m on npz("reg.npz") {\n    loss = mse(m(x), y)\n    epochs = 1\n    metrics = [rmse, r2]\n}\n')
    ck = tmp_path / "reg.npz.safetensors"
    assert main(["run", str(p), "--quiet", "--save", str(ck)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("test report: mse") and "r2" in out[0] and "rmse" in out[-1]
    np.savez(tmp_path / "q.npz", x=x[:3])
    assert main(["predict", str(p), "--load", str(ck), "--input-file", str(tmp_path / "q.npz"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert "top" not in rows[0] and "probability" not in rows[0]
    from runtime.session import Options, Session
    s = Session(p, Options(epochs=0))
    s.load(ck)
    mu, sd = s.dataset.info["scaling"]["x"]
    expected = ((x[:3] - mu) / sd) @ s.params["m/dense_1/W"] + s.params["m/dense_1/b"]      # values, not class ids
    np.testing.assert_allclose([float(r["prediction"]) for r in rows], expected.ravel(), rtol=1e-3)


# ---- data sources: streaming, IDX, image folders --------------------------------------------------
def _load(src: str, base: Path, seed: int = 0):
    from dsl.parser import parse
    from runtime import data
    return data.load(parse(f"train m on {src} {{\n}}\n").items[0].data, base, seed)


def test_streamed_npz_is_read_a_batch_at_a_time_and_matches_the_in_memory_loader(tmp_path):
    import tracemalloc
    from runtime.streaming import Rows
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(4000, 1000)) * 3 + 1).astype(np.float32)          # 16 MB
    np.savez(tmp_path / "big.npz", x=x, y=rng.integers(0, 4, 4000))
    _load('npz("big.npz", stream = true)', tmp_path)                      # imports and caches warmed
    tracemalloc.start()
    streamed = _load('npz("big.npz", val = 0.1, stream = true)', tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.nbytes / 2, peak                 # never the whole array (chunks of the passes only)
    memory = _load('npz("big.npz", val = 0.1, stream = false)', tmp_path)
    for split in ("train", "val", "test"):
        s, m = getattr(streamed, split), getattr(memory, split)
        assert isinstance(s["x"], Rows) and isinstance(s["x"].base, np.memmap) and isinstance(m["x"], np.ndarray)
        assert s["x"].shape == m["x"].shape and s["x"].dtype == m["x"].dtype == np.float32
        np.testing.assert_array_equal(s["y"], m["y"])
        idx = np.random.default_rng(1).permutation(len(m["x"]))[:64]         # a shuffled batch
        np.testing.assert_allclose(s["x"][idx], m["x"][idx], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s["x"][3:9], m["x"][3:9], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_streamed_data_trains_like_in_memory_data(dl_file, tmp_path):
    from runtime.session import Options, Session
    from runtime.streaming import Rows
    from sklearn.datasets import load_digits
    dg = load_digits()
    np.savez(tmp_path / "d.npz", x=dg.data[:600].astype(np.float32), y=dg.target[:600])
    src = ("model m(x: f32[B, 64]) -> f32[B, 10] {\n    return dense(x, 10)\n}\n"
           'train m on npz("d.npz", stream = STREAM) {\n    loss = cross_entropy(m(x), y)\n    epochs = 2\n}\n')
    reps = []
    for stream in ("true", "false"):
        s = Session(dl_file(src.replace("STREAM", stream), f"{stream}.dl"), Options())
        assert isinstance(s.dataset.train["x"], Rows) == (stream == "true")
        reps.append(s.fit(progress=False))
    assert reps[0]["test"]["loss"] == pytest.approx(reps[1]["test"]["loss"], rel=1e-4)


def _write_idx(path, a: np.ndarray, code: int):
    """An IDX file written independently of the reader: header, then big-endian data."""
    import struct
    big = a.astype(a.dtype.newbyteorder(">"))
    path.write_bytes(struct.pack(">BBBB", 0, 0, code, a.ndim) + struct.pack(f">{a.ndim}i", *a.shape) + big.tobytes())


@pytest.mark.parametrize("stream", ["false", "true"])
def test_idx_files_as_mnist_ships_them(tmp_path, stream):
    import gzip
    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 256, (40, 5, 4)).astype(np.uint8)
    labels = (np.arange(40) % 4).astype(np.uint8)
    _write_idx(tmp_path / "img-idx3-ubyte", imgs, 0x08)
    _write_idx(tmp_path / "lab-idx1-ubyte", labels, 0x08)
    ds = _load(f'idx("img-idx3-ubyte", "lab-idx1-ubyte", test = 0, scale = false, stream = {stream})', tmp_path)
    np.testing.assert_array_equal(np.asarray(ds.train["x"]), imgs.astype(np.float32))       # test = 0: in order
    np.testing.assert_array_equal(ds.train["y"], labels)
    # gzipped, float32 big-endian, reshaped for a CNN
    f32 = rng.normal(size=(40, 6)).astype(np.float32)
    _write_idx(tmp_path / "f.idx", f32, 0x0D)
    (tmp_path / "lab.gz").write_bytes(gzip.compress((tmp_path / "lab-idx1-ubyte").read_bytes()))
    ds = _load('idx("f.idx", "lab.gz", test = 0, scale = false, shape = [1, 2, 3])', tmp_path)
    np.testing.assert_array_equal(np.asarray(ds.train["x"]), f32.reshape(40, 1, 2, 3))


@pytest.mark.parametrize("files, words", [
    (("lab-idx1-ubyte", "img-idx3-ubyte"), "the images file is [N, rows, cols]"),
    (("img-idx3-ubyte", "img-idx3-ubyte"), "were the two files given the other way round?"),
    (("img-idx3-ubyte", "short"), "the header promises (40,) values, the file is shorter"),
    (("img-idx3-ubyte", "junk"), "junk is not an IDX file"),
])
def test_idx_errors_are_located(capsys, dl_file, tmp_path, files, words):
    _write_idx(tmp_path / "img-idx3-ubyte", np.zeros((40, 5, 4), np.uint8), 0x08)
    _write_idx(tmp_path / "lab-idx1-ubyte", np.zeros(40, np.uint8), 0x08)
    (tmp_path / "short").write_bytes((tmp_path / "lab-idx1-ubyte").read_bytes()[:20])
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    p = dl_file("model m(x: f32[B, 5, 4]) -> f32[B, 4] {\n    return dense(flatten(x), 4)\n}\n"
                f'train m on idx("{files[0]}", "{files[1]}") {{\n    loss = cross_entropy(m(x), y)\n}}\n')
    assert main(["check", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:4:" in err and words in err, err


def test_image_folders_one_class_per_subfolder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(7)
    pixels = {}
    for cls in ("cat", "dog"):
        (tmp_path / "pics" / cls).mkdir(parents=True)
        for i in range(3):
            a = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
            Image.fromarray(a).save(tmp_path / "pics" / cls / f"{i}.png")
            pixels[(cls, i)] = a
    (tmp_path / "pics" / "dog" / "notes.txt").write_text("not an image")
    ds = _load('images("pics", size = 6, test = 0, scale = false)', tmp_path)
    assert ds.info["class_names"] == ["cat", "dog"] and ds.train["x"].shape == (6, 1, 6, 6)
    np.testing.assert_array_equal(ds.train["y"], [0, 0, 0, 1, 1, 1])
    # grey as ITU-R 601 luma, as Pillow's "L"; at the same size no resampling
    grey = [a.astype(int) @ [299, 587, 114] / 1000 for a in pixels.values()]
    np.testing.assert_allclose(ds.train["x"][:, 0], np.array(grey) / 255.0, atol=1.5 / 255)
    # RGB, channels first; a uniform image stays its colour at any size
    colours = rng.integers(0, 256, (2, 3))
    for cls, c in zip(("a", "b"), colours):
        (tmp_path / "flat" / cls).mkdir(parents=True)
        Image.fromarray(np.broadcast_to(c, (5, 7, 3)).astype(np.uint8)).save(tmp_path / "flat" / cls / "x.png")
    rgb = _load('images("flat", size = 4, channels = 3, test = 0, scale = false)', tmp_path)
    assert rgb.train["x"].shape == (2, 3, 4, 4)
    np.testing.assert_allclose(rgb.train["x"], np.broadcast_to(colours[:, :, None, None] / 255.0, (2, 3, 4, 4)),
                               atol=1e-6)


# ---- graph pictures ------------------------------------------------------------------------------
def _ir(capsys, *args):
    assert main(["ir", str(ROOT / "examples" / "mlp.dl"), *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.skipif(__import__("shutil").which("dot") is None, reason="Graphviz's dot is not installed")
def test_ir_svg_and_png_through_graphviz(capsys, tmp_path):
    import re
    import subprocess
    dot = _ir(capsys, "--stage", "grad", "--format", "dot")
    r = subprocess.run(["dot", "-Tplain"], input=dot.encode(), capture_output=True)
    assert r.returncode == 0 and not r.stderr, r.stderr              # Graphviz reads it without a warning
    labels = re.findall(r'^  n\d+ \[label="([^"]*)"', dot, re.M)
    text = _ir(capsys, "--stage", "grad")
    ops = re.findall(r"^  (%\d+) += (\w+)\(", text, re.M)
    shown = [re.match(r"(%\d+) = (\w+)", lab).groups() for lab in labels if " = " in lab]
    assert len(ops) > 40 and sorted(ops) == sorted(shown)               # every op, named as in the listing
    svg = _ir(capsys, "--stage", "grad", "--format", "svg")
    assert svg.lstrip().startswith("<?xml") and svg.count('class="node"') == len(labels)
    _ir(capsys, "--stage", "lowered", "--format", "png", "-o", str(tmp_path / "g.png"))
    from PIL import Image
    with Image.open(tmp_path / "g.png") as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_ir_png_without_graphviz_says_how(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert main(["ir", str(ROOT / "examples" / "mlp.dl"), "--format", "png", "-o", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "needs Graphviz's `dot` program" in err and "--format dot" in err


@pytest.mark.slow
def test_ir_html_page_is_self_contained_and_opens_in_chromium(capsys, tmp_path):
    import re
    import shutil
    import subprocess
    page = tmp_path / "g.html"
    _ir(capsys, "--stage", "lowered", "--format", "html", "-o", str(page))
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text) and "<link" not in text
    assert "@import" not in text and "url(" not in text                  # nothing fetched
    listing = _ir(capsys, "--stage", "lowered")
    n_ops = sum(1 for ln in listing.splitlines() if re.match(r"  %\d+ ", ln))
    n_inputs = listing.split("ops:")[0].count("\n  %")
    assert len(re.findall(r'<span id="L\d+">', text)) == n_ops + n_inputs == n_ops + 8     # x, y, 3 W and 3 b
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None or shutil.which("dot") is None:
        pytest.skip("headless Chromium and Graphviz are needed to open the page")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}"]
    r = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, timeout=120)
    nodes = re.search(rb'data-nodes="(\d+)"', r.stdout)          # set by the page's script when it ran
    assert nodes and int(nodes.group(1)) > n_ops, r.stdout[:300]
    subprocess.run([browser, *flags, f"--screenshot={tmp_path / 's.png'}", "--window-size=1200,900", page.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image
    with Image.open(tmp_path / "s.png") as im:
        a = np.asarray(im.convert("L"))
    assert a.shape == (900, 1200) and (a < 128).mean() > 0.01 and a.std() > 20     # drawn, not blank


# ---- progress within an epoch ------------------------------------------------------------------------
@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_on_a_terminal_only(dl_file, monkeypatch, terminal, tmp_path):
    import os
    import pty
    import sys
    from runtime.session import Session
    p = dl_file("model m(x: f32[B, 64]) -> f32[B, 10] {\n    return dense(x, 10)\n}\n"
                "train m on digits() {\n    loss = cross_entropy(m(x), y)\n    epochs = 2\n    batch = 16\n}\n")
    s = Session(p)
    monkeypatch.setattr(Session, "PROGRESS_DELAY", 0.0)
    if terminal:
        import fcntl
        import struct
        import termios
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))     # a 100-column terminal
        err = os.fdopen(slave, "w")
    else:
        err = open(tmp_path / "err.txt", "w")
    assert err.isatty() == terminal
    monkeypatch.setattr(sys, "stderr", err)
    lines = []
    s.fit(progress=True, log=lines.append)
    err.flush()
    if terminal:                    # read what reached the terminal before closing its other end
        os.set_blocking(master, False)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except (BlockingIOError, OSError):
                break
            out += chunk
        os.close(master)
        text = out.decode(errors="replace")
        batches = -(-len(s.dataset.train["y"]) // 16)
        assert "epoch 1/2" in text and "epoch 2/2" in text and f"/{batches} [" in text and "batch/s" in text, text
    else:
        assert (tmp_path / "err.txt").read_text() == ""           # not a terminal: no bar at all
    err.close()
    assert [ln.split()[:2] for ln in lines] == [["epoch", "1/2"], ["epoch", "2/2"]]    # the per-epoch lines stay


def test_ir_every_stage_as_a_page(capsys, tmp_path):
    from compiler.passes import PASS_NAMES
    assert main(["ir", str(ROOT / "examples" / "mlp.dl"), "--stage", "all", "--format", "html",
                 "-o", str(tmp_path / "pages")]) == 0
    stages = ["lowered", *PASS_NAMES]
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == sorted(f"{st}.html" for st in stages)
    for st in stages:
        page = (tmp_path / "pages" / f"{st}.html").read_text()
        assert f"mlp after {st}" in page and f"<b>{st}</b>" in page
        assert all(f'href="{o}.html"' in page for o in stages if o != st)     # linked to the others, locally
    assert "kernel k0" in (tmp_path / "pages" / "fusion.html").read_text()
    assert main(["ir", str(ROOT / "examples" / "mlp.dl"), "--stage", "all"]) == 2
    assert "--format html -o DIR" in capsys.readouterr().err


def test_ir_pages_without_graphviz_say_so_once(capsys, tmp_path, monkeypatch):
    """The warning was printed once per page (7 times)."""
    import shutil
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    assert main(["ir", str(ROOT / "examples" / "mlp.dl"), "--stage", "all", "--format", "html",
                 "-o", str(tmp_path / "pages")]) == 0
    err = capsys.readouterr().err
    assert err.count("Graphviz's `dot` is not installed") == 1, err
    assert len(list((tmp_path / "pages").iterdir())) > 1
    assert main(["ir", str(ROOT / "examples" / "mlp.dl"), "--format", "html", "-o", str(tmp_path / "one.html")]) == 0
    assert capsys.readouterr().err.count("Graphviz's `dot` is not installed") == 1


@pytest.mark.slow
def test_predict_an_image_file_with_a_model_trained_on_image_folders(capsys, dl_file, tmp_path):
    from PIL import Image

    from runtime.session import Options, Session
    rng = np.random.default_rng(8)
    for k, cls in enumerate(("dark", "light")):
        (tmp_path / "pics" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 128, (5, 5)).astype(np.uint8) + 127 * k).save(tmp_path / "pics" / cls / f"{i}.png")
    p = dl_file("model m(x: f32[B, 1, 4, 4]) -> f32[B, 2] {\n    return dense(flatten(x), 2)\n}\n"
                'train m on images("pics", size = 4, test = 0) {\n    loss = cross_entropy(m(x), y)\n    epochs = 2\n}\n')
    ck = tmp_path / "m.npz"
    assert main(["run", str(p), "--quiet", "--save", str(ck)]) == 0
    capsys.readouterr()
    img = tmp_path / "pics" / "light" / "3.png"
    assert main(["predict", str(p), "--load", str(ck), "--input-file", str(img), "--top", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["predictions"][0]
    s = Session(p, Options(epochs=0))
    s.load(ck)
    logits = s.run_eval({k: v[9:10] for k, v in s.dataset.train.items()})["output"][0].astype(np.float64)
    probs = np.exp(logits) / np.exp(logits).sum()                  # test = 0: example 9 is light/3.png
    assert row["prediction"] == ["dark", "light"][int(np.argmax(logits))]
    np.testing.assert_allclose(sorted(p for _, p in row["top"]), sorted(probs), rtol=1e-5)
