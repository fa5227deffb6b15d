"""What a run keeps of its epochs: the per-epoch history (`--json`, `--log run.jsonl`), early
stopping on a monitored validation metric, and the curves (`--plot curves.png`).

Each history entry is `{"epoch": 3, "lr": {...}, "train": {...}, "val": {...}, "seconds": ...}`;
metric names are those of `runtime/metrics.py` (`loss`, `accuracy`, ...; `loss:PHASE` with phases).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# Metrics that improve downwards; every other one (accuracy, exact, f1, topK, auc, r2) improves upwards.
_LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse")


def lower_is_better(metric: str) -> bool:
    return metric.split(":")[0] in _LOWER_IS_BETTER


@dataclass
class EarlyStopping:
    """Watch `monitor` (a validation metric: `loss`, `accuracy`, `loss:PHASE`) each epoch; stop
    after `patience` epochs without improving by more than `min_delta` (patience 0: never stop,
    only track the best epoch)."""
    monitor: str = "loss"
    patience: int = 0
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int | None = None
    waited: int = 0

    def update(self, epoch: int, val: dict) -> bool:
        """Record an epoch's validation metrics; True when this epoch is the best so far."""
        value = val.get(self.monitor)
        if value is None or not math.isfinite(value):
            self.waited += 1
            return False
        sign = -1.0 if lower_is_better(self.monitor) else 1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_epoch, self.waited = value, epoch, 0
            return True
        self.waited += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.waited >= self.patience


@dataclass
class History:
    """The epochs of a run, optionally written as they end to a JSON-lines file."""
    log_path: Path | None = None
    epochs: list = field(default_factory=list)
    append: bool = False            # a resumed run adds its epochs to the log

    def __post_init__(self):
        if self.log_path is not None:
            self.log_path = Path(self.log_path)
            if not self.append or not self.log_path.exists():
                self.log_path.write_text("")

    def add(self, entry: dict) -> None:
        self.epochs.append(entry)
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


def plot(history: list[dict], path, title: str = "") -> None:
    """One panel per metric (losses first), train and validation curves against the epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for e in history:
        for split in ("train", "val"):
            names += [k for k in e.get(split, {}) if k not in names]
    names.sort(key=lambda k: (not k.startswith("loss"), k))
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for split, style in (("train", "-o"), ("val", "-s")):
            pts = [(e["epoch"], e[split][name]) for e in history if name in e.get(split, {})]
            if pts:
                ax.plot(*zip(*pts), style, markersize=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
