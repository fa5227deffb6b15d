"""Metrics follow the loss: what a run reports depends on what the model is trained to do.

| loss              | task           | metrics (defaults first)                                          |
|-------------------|----------------|-------------------------------------------------------------------|
| `cross_entropy`   | classification | `accuracy` (argmax vs labels, per token; padding skipped), `exact` |
|                   |                | (whole sequences), `f1` (macro), `top3`, `top5`, ... (top-k)       |
| `bce_with_logits` | binary         | `accuracy` (logit > 0 vs target > 0.5, per element), `auc`         |
| `mse`             | regression     | `mse`, `mae`, `rmse`, `r2` (against the loss's target)             |
| anything else     | —              | `loss` only (an autoencoder has no accuracy)                       |

The task comes from lowering (`compiler/train_block.py`): the first standard-library loss
call whose prediction is computed from the trained model's output (in any phase, inside the
user's own `def`s too), and the target that loss compares it with: a data field (`y`, `x`),
or an expression (`x / 16`, a binding), which the programs then compute as their output
"target", so the metrics use exactly what the loss does.

Besides the metrics a run follows each epoch, the test split gets a full report at the end
(`Accumulator.report`): per-class precision, recall, F1 and the confusion matrix for a
classifier, AUC and the confusion matrix of a binary one, and every regression metric.
scikit-learn computes them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from dsl.diagnostics import DlcError, Loc

# loss -> (task, metrics it offers, default metrics)
LOSSES = {
    "cross_entropy": ("classification", ("accuracy", "exact", "loss", "f1", "topK"), ("accuracy", "loss")),
    "bce_with_logits": ("binary", ("accuracy", "loss", "auc"), ("accuracy", "loss")),
    "mse": ("regression", ("mse", "mae", "loss", "rmse", "r2"), ("loss", "mse", "mae")),
}
NAMES = ("accuracy", "exact", "loss", "mse", "mae", "rmse", "r2", "f1", "auc")     # and top2, top3, ...
TOP_K = re.compile(r"top([1-9][0-9]*)")


def known(name: str) -> bool:
    """A metric name dlc has (for any task): `accuracy`, ..., or `topK`."""
    return name in NAMES or TOP_K.fullmatch(name) is not None


def top_k(name: str) -> int | None:
    """`top5` -> 5; any other name -> None."""
    m = TOP_K.fullmatch(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Task:
    loss: str | None           # the standard-library loss, or None (a loss written by hand)
    target: str | None         # the data field the loss compares the model's output with
    computed: bool = False     # ... or the programs compute it (`x / 16`): their output "target"

    @property
    def kind(self) -> str | None:
        return LOSSES[self.loss][0] if self.loss else None

    @property
    def available(self) -> tuple:
        return LOSSES[self.loss][1] if self.loss else ("loss",)

    @property
    def defaults(self) -> list:
        return list(LOSSES[self.loss][2]) if self.loss else ["loss"]


def task_of(info) -> Task:
    """The task of a lowered train block (`compiler.program.TaskInfo`: the loss that trains the
    model's output and where its target is)."""
    if info.loss is not None and info.loss not in LOSSES:
        raise AssertionError(f"no metrics for the loss {info.loss}")
    return Task(info.loss, "target" if info.computed else info.field, info.computed)


def check(task: Task, wanted, loc: Loc | None) -> None:
    """The metrics a train block asks for must be ones its loss has."""
    for m in wanted:
        if m not in task.available and not (top_k(m) and "topK" in task.available):
            trained = f"trained with `{task.loss}`" if task.loss else "whose loss is not a standard-library loss"
            raise DlcError(f"`{m}` is not a metric of a model {trained}", loc,
                           [f"its metrics: {', '.join(task.available)}".replace("topK", "top3, top5 (any topK)")])


class Accumulator:
    """Metrics over a split, fed batch by batch: `add(output, batch)`, then `result()` (the
    metrics asked for) or `report()` (the test split's full report)."""

    def __init__(self, task: Task, wanted, keep: bool = False):
        self.task, self.wanted = task, [m for m in wanted if m != "loss"]
        self.keep = keep or bool(self.wanted)        # a full report needs the outputs even unasked
        self.ks = sorted({k for m in self.wanted if (k := top_k(m))})
        self.parts: list[tuple] = []                 # per batch: (prediction, target, rank or None, classes)

    def add(self, out: np.ndarray, batch: dict, target: np.ndarray | None = None) -> None:
        """One batch's outputs; its targets are the batch's field, or `target` (the program's
        output "target") where the loss compares with an expression."""
        y = target if self.task.computed else batch.get(self.task.target) if self.task.target else None
        if y is None or not self.keep:
            return
        if self.task.kind == "classification":
            if out.ndim == y.ndim + 1:
                # the rank of the true class among the scores (0: the argmax) serves every top-k
                true = np.take_along_axis(out, np.maximum(y, 0)[..., None].astype(np.intp), -1)
                rank = (out > true).sum(-1) if self.ks else None
                self.parts.append((out.argmax(-1), y, rank, out.shape[-1]))
        elif y.size == out.size:                  # compared element by element, as the loss does
            self.parts.append((out, y.reshape(out.shape), None, None))

    @property
    def classes(self) -> int | None:
        """A classifier's output width (the number of classes)."""
        return self.parts[0][3] if self.parts else None

    def _joined(self):
        out = np.concatenate([p[0] for p in self.parts])
        y = np.concatenate([p[1] for p in self.parts])
        rank = np.concatenate([p[2] for p in self.parts]) if self.parts[0][2] is not None else None
        return out, y, rank

    def result(self) -> dict:
        if not self.parts or not self.wanted:
            return {}
        out, y, rank = self._joined()
        kind, m = self.task.kind, {}
        if kind == "classification":
            m = label_metrics(out, y, self.wanted, predicted=True)
            mask = y >= 0
            if "f1" in self.wanted and mask.any():
                from sklearn.metrics import f1_score
                m["f1"] = float(f1_score(y[mask], out[mask], labels=np.arange(self.classes), average="macro",
                                         zero_division=0))
            for k in self.ks:
                if mask.any():
                    m[f"top{k}"] = float((rank[mask] < k).mean())
        elif kind == "binary":
            if "accuracy" in self.wanted:
                m["accuracy"] = float(((out > 0) == (y > 0.5)).mean())
            if "auc" in self.wanted:
                m["auc"] = auc(out, y)
        elif kind == "regression":
            m = {k: v for k, v in regression_metrics(out, y).items() if k in self.wanted}
        return m

    def report(self, class_names=None) -> dict:
        """The full report of a split: for a classifier per-class precision, recall, F1 and
        support, macro and weighted F1, and the confusion matrix (rows: true classes, columns:
        predicted); for a binary model AUC and the 2x2 confusion matrix; for a regression MSE,
        MAE, RMSE and R². Empty when the split holds no targets."""
        if not self.parts:
            return {}
        from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
        out, y, _ = self._joined()
        kind = self.task.kind
        if kind == "classification":
            mask = y >= 0
            pred, true = out[mask], y[mask]
            labels = np.arange(self.classes)
            p, r, f, n = precision_recall_fscore_support(true, pred, labels=labels, zero_division=0)
            names = list(class_names) if class_names is not None and len(class_names) == self.classes \
                else [str(c) for c in labels]
            return {"classes": names, "precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(),
                    "support": n.tolist(), "macro_f1": float(f.mean()),
                    "weighted_f1": float((f * n).sum() / max(n.sum(), 1)),
                    "confusion": confusion_matrix(true, pred, labels=labels).tolist()}
        if kind == "binary":
            t = (y > 0.5).ravel()
            return {"auc": auc(out, y), "accuracy": float(((out > 0).ravel() == t).mean()),
                    "confusion": confusion_matrix(t, (out > 0).ravel(), labels=[False, True]).tolist()}
        if kind == "regression":
            return regression_metrics(out, y)
        return {}


def auc(logits: np.ndarray, y: np.ndarray) -> float | None:
    """ROC AUC of the logits against targets > 0.5, per element; None when one class is absent."""
    from sklearn.metrics import roc_auc_score
    t = (y > 0.5).ravel()
    if t.all() or not t.any():
        return None
    return float(roc_auc_score(t, logits.ravel().astype(np.float64)))


def regression_metrics(out: np.ndarray, y: np.ndarray) -> dict:
    """MSE, MAE, RMSE and R² (scikit-learn's, averaged uniformly over the outputs of each example)."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
    o = out.reshape(len(out), -1).astype(np.float64)
    t = y.reshape(len(y), -1).astype(np.float64)
    mse = float(mean_squared_error(t, o))
    return {"mse": mse, "mae": float(mean_absolute_error(t, o)), "rmse": float(np.sqrt(mse)),
            "r2": float(r2_score(t, o)) if len(t) > 1 else None}


def label_metrics(out: np.ndarray, y: np.ndarray, wanted, predicted: bool = False) -> dict:
    """Accuracy against integer labels; negative labels (padding) are skipped. For sequence
    labels [N, T] also the exact-match rate: every labelled position of a sequence right."""
    pred = out if predicted else out.argmax(-1)
    mask = y >= 0
    m = {}
    if "accuracy" in wanted and mask.any():
        m["accuracy"] = float((pred[mask] == y[mask]).mean())
    if y.ndim == 1 and "exact" in wanted and mask.any():      # one label per example: its accuracy
        m["exact"] = float((pred[mask] == y[mask]).mean())
    if y.ndim >= 2 and ("exact" in wanted or "accuracy" in wanted):
        right = (pred == y) | ~mask
        m["exact"] = float(right.reshape(len(y), -1).all(axis=1).mean())
    return m


def text(metrics: dict, prefix: str = "") -> str:
    """`acc 0.9812  mae 0.1234`: every metric but the loss, for progress lines."""
    short = {"accuracy": "acc"}
    return "".join(f"  {prefix}{short.get(k, k)} {v:.4f}" for k, v in metrics.items()
                   if known(k) and k != "loss" and v is not None)


def report_text(report: dict, limit: int = 20) -> str:
    """The test split's full report as a table (classes beyond `limit` only in --json)."""
    if "classes" in report:
        names = report["classes"]
        if len(names) > limit:
            return f"per-class report: {len(names)} classes (in --json); macro F1 {report['macro_f1']:.4f}\n"
        w = max(8, max(len(n) for n in names) + 2)
        lines = [f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
        for i, n in enumerate(names):
            lines.append(f"{n:<{w}}{report['precision'][i]:>10.4f}{report['recall'][i]:>10.4f}"
                         f"{report['f1'][i]:>10.4f}{report['support'][i]:>9}")
        lines.append(f"{'macro':<{w}}{'':>20}{report['macro_f1']:>10.4f}{sum(report['support']):>9}")
        cw = max(4, max(len(str(v)) for row in report["confusion"] for v in row) + 1, max(len(n) for n in names) + 1)
        lines.append("confusion matrix (rows: true, columns: predicted):")
        lines.append(" " * w + "".join(f"{n:>{cw}}" for n in names))
        for n, row in zip(names, report["confusion"]):
            lines.append(f"{n:<{w}}" + "".join(f"{v:>{cw}}" for v in row))
        return "\n".join(lines) + "\n"
    if "confusion" in report:         # binary
        (tn, fp), (fn, tp) = report["confusion"]
        a = "n/a" if report["auc"] is None else f"{report['auc']:.4f}"
        return f"AUC {a}; confusion: true negatives {tn}, false positives {fp}, false negatives {fn}, true positives {tp}\n"
    if report:
        return "test report: " + "  ".join(f"{k} {v:.4f}" for k, v in report.items() if v is not None) + "\n"
    return ""
