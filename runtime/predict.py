"""`dlc predict`: a trained checkpoint on held-out examples (`--index`), token sequences
(`--input "3 1 4"`) or feature vectors from a file (`--input-file f.csv|f.npz`, or an image
for a model trained on `images(...)`; encoded and standardized as the training data was); a classifier's class (by name when the data named
them), its probabilities and top-k (`--top K`), a regression's values, the raw outputs
(`--raw`); everything also to `--output preds.csv|npz`.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from dsl.diagnostics import DlcError

from . import outputs
from .data import EOS, IGNORE, IMAGE_SUFFIXES, PAD, read_image
from .streaming import open_npz


def encode_inputs(ds, texts: list[str]) -> tuple[dict, list[str]]:
    """A batch from space-separated tokens (the data source's input vocabulary); fields the
    user does not give (decoder inputs, labels) are filled with padding."""
    vocab = ds.info.get("input_vocab")
    if vocab is None or "x" not in ds.train or ds.train["x"].dtype.kind not in "iu":
        raise DlcError("--input works for models whose input `x` is a token sequence; use --index to pick "
                       "held-out examples")
    length = ds.train["x"].shape[1]
    rows = []
    chars = ds.info.get("join") == "" and all(len(v) == 1 for v in vocab)     # text(...): characters
    for text in texts:
        toks = list(text) if chars else text.split()
        unknown = [t for t in toks if t not in vocab or t.startswith("<")]
        if unknown:
            known = repr("".join(vocab)) if chars else " ".join(v for v in vocab if not v.startswith("<"))
            raise DlcError(f"unknown {'character' if chars else 'token'} {unknown[0]!r} in --input; "
                           f"{'characters' if chars else 'tokens'}: {known}")
        unit = "characters" if chars else "tokens"
        if not toks or len(toks) > length:
            raise DlcError(f"--input takes 1 to {length} {unit}, got {len(toks)}")
        ids = [vocab.index(t) for t in toks]
        pad = ds.info.get("pad")
        if len(ids) < length and (pad == "none" or chars):
            raise DlcError(f"this model reads exactly {length} {unit} (its data has no padding), got {len(toks)} "
                           "in --input" + ("; `dlc sample --prompt TEXT` continues a text of any length" if chars
                                           else ""))
        if pad == "right":
            ids = ids + [PAD] * (length - len(ids))
        else:                                   # "left", or a source that does not say
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
        names = ds.info.get("class_names")
        ids = out if target else out.argmax(-1)
        if names is not None and ids.ndim == 1:
            return [names[int(k)] for k in ids]
        return decode_rows(ds, ids)
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


OUTPUTS = (".csv", ".npz")


def probabilities(task, out: np.ndarray) -> np.ndarray | None:
    """A classifier's softmax (one label per example), a binary model's sigmoid; else None."""
    z = out.astype(np.float64)
    if task.kind == "classification" and out.ndim == 2:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    if task.kind == "binary":
        return 0.5 * (1 + np.tanh(z / 2))           # the logistic function, without overflow
    return None


def class_names(ds, n: int) -> list[str]:
    names = ds.info.get("class_names") or ds.info.get("vocab")
    return list(names) if names is not None and len(names) == n else [str(k) for k in range(n)]


def read_input_file(ds, path: str) -> tuple[dict, list[str]]:
    """Feature vectors, one example per row: a CSV (a header naming the training CSV's feature
    columns is encoded as training was: categories one-hot; else every column a number) or an
    npz array (`x`, or the archive's only array). Standardized with the training split's
    statistics and reshaped to the model's input."""
    p = Path(path)
    if "x" not in ds.train or ds.train["x"].dtype.kind != "f":
        raise DlcError("--input-file gives feature vectors; this model's input `x` is token ids: use --input")
    shape = ds.train["x"].shape[1:]
    width = int(np.prod(shape))
    if not p.is_file():
        raise DlcError(f"--input-file {path}: no such file")
    if p.suffix == ".npz":
        try:
            with open_npz(p) as f:
                names = list(f.files)
                key = "x" if "x" in names else names[0] if len(names) == 1 else None
                if key is None:
                    raise DlcError(f"--input-file {path}: which array? it has {', '.join(names)}; name one `x`")
                x = f[key]
        except DlcError:
            raise
        except Exception as e:
            raise DlcError(f"--input-file {path}: cannot read it as .npz: {e}") from None
        if x.dtype.kind not in "fiu":
            raise DlcError(f"--input-file {path}: array `{key}` must be numeric, got {x.dtype}")
        if x.size == 0:
            raise DlcError(f"--input-file {path}: array `{key}` holds no examples ({list(x.shape)})")
        x = x.reshape(1, -1) if x.ndim == 1 and x.size == width else x.reshape(len(x), -1) if x.ndim else x
    elif p.suffix == ".csv":
        x = _read_csv(ds, p)
    elif p.suffix.lower() in IMAGE_SUFFIXES and "image" in ds.info:     # a model trained on images(...)
        x = read_image(p, *ds.info["image"]).reshape(1, -1)
    else:
        kinds = ".csv or .npz" + (" or an image" if "image" in ds.info else "")
        raise DlcError(f"--input-file {path}: give a {kinds} file")
    if x.ndim != 2 or x.shape[1] != width:
        raise DlcError(f"--input-file {path}: the model takes {width} features per example "
                       f"({'x'.join(map(str, shape))}), the file has {x.shape[1] if x.ndim == 2 else list(x.shape)}")
    if len(x) == 0:
        raise DlcError(f"--input-file {path} holds no examples")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise DlcError(f"--input-file {path} holds NaN or infinite values")
    mu_sd = ds.info.get("scaling", {}).get("x")
    if mu_sd is not None:
        mu, sd = mu_sd
        x = (x - mu.reshape(-1)) / sd.reshape(-1)
    batch = {"x": x.reshape((len(x),) + shape).astype(ds.train["x"].dtype)}
    for k, v in ds.train.items():
        if k != "x":
            batch[k] = np.full((len(x),) + v.shape[1:], IGNORE if k == "y" else PAD, v.dtype)
    return batch, [f"{p.name}:{i + 1}" for i in range(len(x))]


def _read_csv(ds, p: Path) -> np.ndarray:
    from .data import encode_rows
    try:
        rows = [r for r in csv.reader(p.read_text(encoding="utf-8-sig").splitlines()) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DlcError(f"--input-file {p}: cannot read it as CSV: {e}") from None
    if not rows:
        raise DlcError(f"--input-file {p} is empty")
    features = ds.info.get("csv_features")
    head = [c.strip() for c in rows[0]]
    from .data import _is_float
    if features is not None and not all(_is_float(c) for c in head):     # a header: the columns by name
        dup = next((c for c in head if head.count(c) > 1), None)
        if dup is not None:
            raise DlcError(f"--input-file {p}: the column `{dup}` appears twice in its header")
        missing = [name for name, _ in features if name not in head]
        if missing:
            raise DlcError(f"--input-file {p} has no column `{missing[0]}` (its columns: {', '.join(head)}; the "
                           f"model reads {', '.join(n for n, _ in features)}" +
                           ("; give the file a header row with these names)" if any(
                               _is_float(c) for c in head) else ")"))
    if features is not None and all(name in head for name, _ in features):
        # the training CSV's columns by name (the label column, if there, is ignored)
        cols = [head.index(name) for name, _ in features]
        body = [[r[c] if c < len(r) else "" for c in cols] for r in rows[1:]]
        return encode_rows(p.name, [n for n, _ in features], body, features, 2)
    start = 0 if all(_is_float(c) for c in rows[0]) else 1        # a header of other names: skipped
    out = []
    for i, r in enumerate(rows[start:], start=start + 1):
        bad = next((c for c in r if not _is_float(c)), None)
        if bad is not None:
            raise DlcError(f"{p.name}:{i}: `{bad}` is not a number")
        out.append([float(c) for c in r])
    if len({len(r) for r in out}) > 1:
        raise DlcError(f"--input-file {p}: the rows have different numbers of columns")
    return np.array(out, np.float64).reshape(len(out), -1)


def run_batches(s, batch: dict, step: int, size: int = 512) -> dict:
    """The evaluation program over a batch of any size, in pieces: "output", "output2", "target"."""
    n = len(next(iter(batch.values())))
    parts = [s.run_eval({k: np.ascontiguousarray(v[i:i + size]) for k, v in batch.items()}, step=step)
             for i in range(0, n, size)]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in ("output", "output2", "target")
            if parts[0].get(k) is not None}


def check_output(path: str | None) -> None:
    if path is not None:
        outputs.check_output(path, "--output", OUTPUTS, "predictions are written to")


def write_output(path: str, rows: list[dict], res: dict, probs, names) -> None:
    """`.npz`: arrays `output` (raw), `prediction` (text), `probabilities` and `classes` for
    classifiers. `.csv`: a row per example: input, prediction, target, then each class's
    probability (`p_NAME`) or each raw output value (`output_I`)."""
    out = np.asarray(res["output"])
    if Path(path).suffix == ".npz":
        arrays = {"output": out, "prediction": np.array([r["prediction"] for r in rows])}
        if probs is not None:
            arrays["probabilities"] = probs
            if names is not None:
                arrays["classes"] = np.array(names)
        if res.get("output2") is not None:
            arrays["tokens"] = np.asarray(res["output2"])
        np.savez(path, **arrays)
        return
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if names is not None:                           # a classifier: each class's probability
            values, cols = probs, [f"p_{n}" for n in names]
        elif probs is not None:                         # binary: the probability of 1, per output
            values = probs.reshape(len(out), -1)
            cols = ["probability"] if values.shape[1] == 1 else [f"probability_{i}" for i in range(values.shape[1])]
        else:
            values = out.reshape(len(out), -1)
            cols = [f"output_{i}" for i in range(values.shape[1])]
        has_target = any("target" in r for r in rows)
        w.writerow(["input", "prediction"] + (["target"] if has_target else []) + cols)
        for r, v in zip(rows, values):
            w.writerow([r["input"], r["prediction"]] + ([r.get("target", "")] if has_target else [])
                       + [f"{x:.9g}" for x in v])


def run_cli(args) -> int:
    from . import data
    from .session import Options, Session
    if args.temperature < 0:
        raise DlcError("--temperature must be >= 0")
    if sum(map(bool, (args.input, args.input_file, args.index))) > 1:
        raise DlcError("give one of --input, --input-file and --index")
    check_output(args.output)
    s = Session(args.file, Options(dtype=args.dtype, fuse=not args.no_fuse, train=False,
                                   temperature=args.temperature, seed=None))
    s.load(args.load)
    ds = s.dataset
    targets = None
    if args.input:
        batch, shown = encode_inputs(ds, args.input)
        data.check_indices(s.index_reads, batch, "--input")
    elif args.input_file:
        batch, shown = read_input_file(ds, args.input_file)
    else:
        n = len(next(iter(ds.test.values())))
        if n == 0 and not args.index:
            raise DlcError("this model's data has no held-out examples (test = 0) to show; give --input-file "
                           "or --input")
        idx = args.index or list(range(min(5, n)))
        for k in idx:
            if not 0 <= k < n:
                raise DlcError(f"--index {k} is outside the {n} held-out examples")
        batch = {k: np.ascontiguousarray(v[idx]) for k, v in ds.test.items()}
        shown = [f"#{k}: {t}" for k, t in zip(idx, decode_rows(ds, batch["x"], "input_vocab"))] \
            if ds.info.get("input_vocab") else [f"held-out #{k}" for k in idx]
        tgt = s.task.target or "y"
        targets = predictions(ds, s.task, {"output": batch[tgt]}, target=True) \
            if tgt in batch and not s.task.computed else None
    res = run_batches(s, batch, args.seed)
    if targets is None and s.task.computed and not (args.input or args.input_file) and "target" in res:
        targets = predictions(ds, s.task, {"output": res["target"]}, target=True)
    out = res["output"]
    preds = predictions(ds, s.task, res)
    probs = probabilities(s.task, out) if res.get("output2") is None else None
    names = class_names(ds, out.shape[-1]) if probs is not None and s.task.kind == "classification" else None
    if args.top and (names is None or out.ndim != 2):
        raise DlcError("--top K lists the most probable classes of a classifier with one label per example")
    rows = []
    for i, (inp, pred) in enumerate(zip(shown, preds)):
        row = {"input": inp, "prediction": pred}
        if targets is not None:
            row["target"] = targets[i]
        if probs is not None and s.task.kind == "binary":
            row["probability"] = probs[i].tolist() if probs[i].ndim else float(probs[i])
        elif probs is not None and out.ndim == 2:
            order = np.argsort(-probs[i], kind="stable")[:args.top or 1]
            row["top"] = [[names[k], float(probs[i, k])] for k in order]
        if args.raw:
            row["output"] = out[i].tolist()
        rows.append(row)
    if args.output:
        write_output(args.output, rows, res, probs, names)
    if args.json:
        print(json.dumps({"predictions": rows, "temperature": args.temperature}))
        return 0
    for r in rows:
        line = f"{r['input']:<24} -> {r['prediction']}"
        if "target" in r:
            line += f"    (expected {r['target']})"
        if args.top:
            line += "    top " + ", ".join(f"{n} {p:.3f}" for n, p in r["top"])
        elif "top" in r:
            line += f"    p {r['top'][0][1]:.3f}"
        elif "probability" in r and np.ndim(r["probability"]) == 0:
            line += f"    p {r['probability']:.3f}"
        if args.raw:
            line += "    raw " + values_text(np.asarray(r["output"]))
        print(line)
    if args.output:
        print(f"dlc: wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    return 0
