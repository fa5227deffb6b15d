"""Checkpoints: parameters, optimizer state and what a resume needs, in safetensors or `.npz`.

    param/NAME    a parameter            state/NAME   model state and optimizer moments
    metadata      {"model", "step", "epoch", "phases": {NAME: {"optimizer", "step"}},
                   "data_order": the shuffling generator's state}

A save writes a temporary file in the target's directory, fsyncs it and renames it over the
target, so a killed save leaves the previous checkpoint whole; it refuses to replace anything
but a regular file. Never pickle: `.npz` files are read with `allow_pickle=False`.
"""
from __future__ import annotations

import glob
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from dsl.diagnostics import DlcError

from .outputs import check_output
from .streaming import open_npz

FORMATS = (".safetensors", ".npz")


def check_target(path: str | Path, flag: str = "--save") -> Path:
    """Refuse, before any training, a path a checkpoint cannot be saved to (renamed over:
    only a regular file is replaced)."""
    return check_output(path, flag, FORMATS, "a checkpoint is", regular=True)


def save(path: str | Path, params: dict, state: dict, meta: dict, flag: str = "--save") -> None:
    p = check_target(path, flag)
    if p.is_symlink():                  # replace what the link points at, keep the link
        p = p.resolve()
    tensors = {f"param/{k}": np.ascontiguousarray(v) for k, v in params.items()}
    tensors.update({f"state/{k}": np.ascontiguousarray(v) for k, v in state.items()})
    if p.suffix == ".npz":
        buf = io.BytesIO()
        tensors["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(buf, **tensors)
        blob = buf.getvalue()
    else:
        from safetensors.numpy import save as to_bytes
        blob = to_bytes(tensors, metadata={"dlc": json.dumps(meta)})
    _remove_stale_temps(p)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise DlcError(f"cannot save checkpoint {path}: {e.strerror or e}") from None
        raise
    try:                                # the rename itself survives a crash once the directory is synced
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


STALE_SECONDS = 600      # a temp file this old is a killed save's, not one in progress


def _remove_stale_temps(p: Path) -> None:
    """A save killed mid-write (kill -9) leaves its temp file; the next save removes it."""
    now = time.time()
    for t in p.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
        try:
            if now - t.stat().st_mtime > STALE_SECONDS:
                t.unlink()
        except OSError:
            pass


def load(path: str | Path) -> tuple[dict, dict, dict]:
    p = Path(path)
    if not p.exists():
        raise DlcError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise DlcError(f"checkpoint {p} is not a regular file")
    try:
        if p.suffix == ".npz":
            with open_npz(p) as f:
                tensors = {k: f[k] for k in f.files}
            raw = tensors.pop("__meta__", None)
            meta_text = bytes(raw).decode() if raw is not None else "{}"
        else:
            from safetensors import safe_open
            tensors = {}
            with safe_open(str(p), framework="numpy") as f:
                meta_text = (f.metadata() or {}).get("dlc", "{}")
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
    except Exception as e:
        raise DlcError(f"cannot read checkpoint {p}: {e}") from None
    try:
        meta = json.loads(meta_text)
    except (ValueError, UnicodeDecodeError) as e:
        raise DlcError(f"{p}: the metadata is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise DlcError(f"{p}: the metadata must be a JSON object, got {type(meta).__name__}")
    for k in tensors:
        if not k.startswith(("param/", "state/")):
            raise DlcError(f"{p}: unexpected tensor `{k}` (a checkpoint holds param/... and state/...)")
    params = {k[6:]: v for k, v in tensors.items() if k.startswith("param/")}
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("state/")}
    return params, state, meta


def meta_int(meta: dict, key: str, path, default=0, where: str = "") -> int:
    """An integer in the metadata, checked: `{path}: metadata `phases.gen.step` must be ...`."""
    v = meta.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise DlcError(f"{path}: metadata `{where}{key}` must be a non-negative integer, got {json.dumps(v)}")
    return v


def check_tensor(path, kind: str, name: str, value: np.ndarray, expected: np.ndarray) -> None:
    """A tensor from a checkpoint has the shape and dtype the model's has."""
    if value.shape != expected.shape or value.dtype != expected.dtype:
        def show(a):
            return f"{a.dtype}[{', '.join(map(str, a.shape))}]"
        raise DlcError(f"{path}: {kind} `{name}` is {show(value)}, the model's is {show(expected)}")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        bad = int((~np.isfinite(value)).sum())
        raise DlcError(f"{path}: {kind} `{name}` holds {bad:,} NaN or infinite value{'s' * (bad != 1)}",
                       notes=["the run that saved it had diverged; start from an earlier checkpoint"])
