"""Metrics follow the loss: what a run reports depends on what the model is trained to do.

| loss              | task           | metrics (default first)                                   |
|-------------------|----------------|-----------------------------------------------------------|
| `cross_entropy`   | classification | `accuracy` (argmax vs labels; padding skipped), `exact`    |
| `bce_with_logits` | binary         | `accuracy` (logit > 0 vs target > 0.5, per element)        |
| `mse`             | regression     | `mse`, `mae` (against the loss's target)                   |
| anything else     | —              | `loss` only (an autoencoder has no accuracy)               |

The task is read from the train block: the first standard-library loss its loss expression
calls (looking inside the user's own `def`s), and the data field that loss compares the
model's output with (its target, `y` or `x` or ...).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from dsl import ast as A
from dsl.diagnostics import DlcError, Loc

# loss -> (task, metrics it offers, default metrics)
LOSSES = {
    "cross_entropy": ("classification", ("accuracy", "exact", "loss"), ("accuracy", "loss")),
    "bce_with_logits": ("binary", ("accuracy", "loss"), ("accuracy", "loss")),
    "mse": ("regression", ("mse", "mae", "loss"), ("loss", "mse", "mae")),
}
NAMES = ("accuracy", "exact", "loss", "mse", "mae")


@dataclass(frozen=True)
class Task:
    loss: str | None           # the standard-library loss, or None (a loss written by hand)
    target: str | None         # the data field the loss compares the model's output with

    @property
    def kind(self) -> str | None:
        return LOSSES[self.loss][0] if self.loss else None

    @property
    def available(self) -> tuple:
        return LOSSES[self.loss][1] if self.loss else ("loss",)

    @property
    def defaults(self) -> list:
        return list(LOSSES[self.loss][2]) if self.loss else ["loss"]


def _children(node):
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, tuple):            # keyword arguments: (name, value)
                yield from (y for y in x if isinstance(y, A.Node))
            elif isinstance(x, A.Node):
                yield x


def _find_loss(node, funcs: dict, seen: set):
    """The first call of a standard-library loss in `node`, looking into user `def`s."""
    if isinstance(node, A.Call):
        if node.func in LOSSES and node.func not in funcs:
            return node
        fn = funcs.get(node.func)
        if fn is not None and node.func not in seen:
            seen.add(node.func)
            for st in fn.body:
                hit = _find_loss(st, funcs, seen)
                if hit is not None:
                    return hit
    for child in _children(node):
        hit = _find_loss(child, funcs, seen)
        if hit is not None:
            return hit
    return None


def _field(node, fields) -> str | None:
    """The data field an expression reads (`y`, or `y` in reshape(y, [-1, 1]))."""
    if isinstance(node, A.Name) and node.name in fields:
        return node.name
    for child in _children(node):
        hit = _field(child, fields)
        if hit is not None:
            return hit
    return None


def task_of(train: A.TrainDef, user_funcs: dict, fields) -> Task:
    """The task of a train block: its loss and that loss's target field. `user_funcs` are the
    file's own `def`s (a user `def` named like a loss shadows it)."""
    call = None
    for st in train.body:
        if isinstance(st, A.Assign) and st.name != "loss":
            continue
        call = _find_loss(st, user_funcs, set())
        if call is not None:
            break
    if call is None:
        return Task(None, None)
    args = list(call.args) + [v for _, v in call.kwargs]
    return Task(call.func, _field(args[1], fields) if len(args) > 1 else None)


def check(task: Task, wanted, loc: Loc | None) -> None:
    """The metrics a train block asks for must be ones its loss has."""
    for m in wanted:
        if m not in task.available:
            trained = f"trained with `{task.loss}`" if task.loss else "whose loss is not a standard-library loss"
            raise DlcError(f"`{m}` is not a metric of a model {trained}", loc,
                           [f"its metrics: {', '.join(task.available)}"])


class Accumulator:
    """Metrics over a split, fed batch by batch: `add(output, batch)`, then `result()`."""

    def __init__(self, task: Task, wanted):
        self.task, self.wanted = task, [m for m in wanted if m != "loss"]
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, out: np.ndarray, batch: dict) -> None:
        y = batch.get(self.task.target) if self.task.target else None
        if y is None or not self.wanted:
            return
        if self.task.kind == "classification":
            if out.ndim == y.ndim + 1:
                self.parts.append((out.argmax(-1), y))
        elif y.size == out.size:                  # compared element by element, as the loss does
            self.parts.append((out, y.reshape(out.shape)))

    def result(self) -> dict:
        if not self.parts:
            return {}
        out = np.concatenate([p for p, _ in self.parts])
        y = np.concatenate([t for _, t in self.parts])
        kind, m = self.task.kind, {}
        if kind == "classification":
            m = label_metrics(out, y, self.wanted, predicted=True)
        elif kind == "binary" and "accuracy" in self.wanted:
            m["accuracy"] = float(((out > 0) == (y > 0.5)).mean())
        elif kind == "regression":
            err = out.astype(np.float64) - y
            if "mse" in self.wanted:
                m["mse"] = float(np.mean(err ** 2))
            if "mae" in self.wanted:
                m["mae"] = float(np.mean(np.abs(err)))
        return m


def label_metrics(out: np.ndarray, y: np.ndarray, wanted, predicted: bool = False) -> dict:
    """Accuracy against integer labels; negative labels (padding) are skipped. For sequence
    labels [N, T] also the exact-match rate: every labelled position of a sequence right."""
    pred = out if predicted else out.argmax(-1)
    mask = y >= 0
    m = {}
    if "accuracy" in wanted and mask.any():
        m["accuracy"] = float((pred[mask] == y[mask]).mean())
    if y.ndim >= 2 and ("exact" in wanted or "accuracy" in wanted):
        right = (pred == y) | ~mask
        m["exact"] = float(right.reshape(len(y), -1).all(axis=1).mean())
    return m


def text(metrics: dict, prefix: str = "") -> str:
    """`acc 0.9812  mae 0.1234`: every metric but the loss, for progress lines."""
    short = {"accuracy": "acc"}
    return "".join(f"  {prefix}{short.get(k, k)} {v:.4f}" for k, v in metrics.items() if k in NAMES and k != "loss")
