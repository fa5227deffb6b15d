"""Turning user text into model inputs and model outputs into text, for `dlc predict`."""
from __future__ import annotations

import numpy as np

from dsl.diagnostics import DlcError

from .data import EOS, IGNORE, PAD


def encode_inputs(ds, texts: list[str]) -> tuple[dict, list[str]]:
    """A batch from space-separated tokens (the data source's input vocabulary); fields the
    user does not give (decoder inputs, labels) are filled with padding."""
    vocab = ds.info.get("input_vocab")
    if vocab is None or "x" not in ds.train or ds.train["x"].dtype.kind not in "iu":
        raise DlcError("--input works for models whose input `x` is a token sequence; use --index to pick "
                       "held-out examples")
    length = ds.train["x"].shape[1]
    rows = []
    for text in texts:
        toks = text.split()
        unknown = [t for t in toks if t not in vocab or t.startswith("<")]
        if unknown:
            raise DlcError(f"unknown token {unknown[0]!r} in --input; tokens: {' '.join(v for v in vocab if not v.startswith('<'))}")
        if not toks or len(toks) > length:
            raise DlcError(f"--input takes 1 to {length} tokens, got {len(toks)}")
        ids = [vocab.index(t) for t in toks]
        if ds.info.get("pad") == "left" or len(ids) < length and ds.info.get("pad") is None:
            ids = [PAD] * (length - len(ids)) + ids
        rows.append(ids)
    batch = {"x": np.array(rows, np.int32)}
    for k, v in ds.train.items():
        if k != "x":
            fill = IGNORE if k == "y" else PAD
            batch[k] = np.full((len(rows),) + v.shape[1:], fill, v.dtype)
    return batch, texts


def decode_rows(ds, ids: np.ndarray, which: str = "vocab") -> list[str]:
    """Token ids -> text (sequences stop at the end token; padding is dropped)."""
    vocab = ds.info.get(which)
    out = []
    for row in np.asarray(ids):
        if row.ndim == 0:
            out.append(str(vocab[int(row)]) if vocab else str(int(row)))
            continue
        toks = []
        for t in row:
            t = int(t)
            if t == EOS and vocab and vocab[EOS] == "</s>":
                break
            if t < 0 or (vocab and vocab[t].startswith("<")):
                continue
            toks.append(vocab[t] if vocab else str(t))
        sep = "" if vocab and all(len(v) == 1 for v in toks) and ds.info.get("join") == "" else " "
        out.append(sep.join(toks))
    return out


def predictions(ds, task, res: dict, target: bool = False) -> list[str]:
    """Each example's prediction as text, by what the model is trained to do (`task`, from
    runtime/metrics.py): decoded tokens when the model returns them, a class for a classifier,
    0/1 for a binary one (logit > 0), and the values themselves otherwise (a regression, an
    autoencoder). With `target`, `res["output"]` holds the targets, shown the same way."""
    out = res["output"]
    if not target and res.get("output2") is not None:
        return decode_rows(ds, res["output2"])
    if task.kind == "classification":
        return decode_rows(ds, out if target else out.argmax(-1))
    if task.kind == "binary":
        return [values_text(r) for r in ((out > 0.5) if target else (out > 0)).astype(np.int32)]
    return [values_text(r) for r in out]


def values_text(row, limit: int = 6) -> str:
    """1.234, or [0.12, -0.5, ...] (64 values)."""
    row = np.asarray(row)
    if row.size == 1:
        return f"{row.reshape(())[()]:.4g}"
    flat = row.reshape(-1)
    shown = ", ".join(f"{v:.4g}" for v in flat[:limit])
    return f"[{shown}{', ...' if flat.size > limit else ''}]" + (f" ({flat.size} values)" if flat.size > limit else "")
