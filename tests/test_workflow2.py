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
