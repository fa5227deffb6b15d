"""Data sources a `train` block can name: `digits(...)`, `npz("file.npz", ...)`, `csv("file.csv", ...)`.

Every source yields named fields (`x`, `y` by default), is split into train and test sets with
a seeded, stratified split (classification labels) and, unless `scale = false`, standardizes
float features with statistics of the training set only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsl import ast as A
from dsl.diagnostics import DlcError, Loc

from .resources import memory_limit, require
from .streaming import Rows, npz_member, open_npz


@dataclass
class Dataset:
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)
    val: dict[str, np.ndarray] = field(default_factory=dict)    # `val = 0.1`: reported each epoch

    def fields(self) -> dict[str, tuple[str, tuple]]:
        """Each field's dtype kind and per-example shape, for the compiler."""
        out = {}
        for k, v in self.train.items():
            out[k] = ("f32" if v.dtype.kind == "f" else "i32", tuple(v.shape[1:]))
        return out


def literal(e: A.Node):
    """The value of a literal expression in a data-source call (numbers, strings, lists)."""
    if isinstance(e, (A.Number, A.String, A.Bool)):
        return e.value
    if isinstance(e, A.Neg) and isinstance(e.operand, A.Number):
        return -e.operand.value
    if isinstance(e, A.List):
        return [literal(x) for x in e.items]
    raise DlcError("data-source options must be literal numbers, strings or lists", e.loc)


SOURCES = {}
REQUIRED = object()


def source(name, order, **defaults):
    """Register a data source: `order` lists its options in positional order; `defaults` maps
    each option to its default (REQUIRED: must be given). `test`, `val` and `scale` are every source's."""
    defaults = {**defaults, "test": 0.2, "val": 0.0, "scale": defaults.get("scale", True)}
    assert set(order) | {"val"} == set(defaults), name       # `val` is keyword-only

    def deco(fn):
        SOURCES[name] = (fn, tuple(order), defaults)
        return fn
    return deco


def _bind(call: A.Call, order, defaults) -> dict:
    """The source's options from positional and keyword arguments, checked like a builtin's."""
    if len(call.args) > len(order):
        raise DlcError(f"`{call.func}` takes at most {len(order)} positional argument{'s' * (len(order) != 1)} "
                       f"({', '.join(order)}), got {len(call.args)}", call.args[len(order)].loc)
    opts = {k: literal(v) for k, v in zip(order, call.args)}
    for k, v in call.kwargs:
        if k not in defaults:
            raise DlcError(f"`{call.func}` has no option `{k}`", v.loc, [f"options: {', '.join(order)}"])
        if k in opts:
            raise DlcError(f"`{call.func}`: option `{k}` given twice", v.loc)
        opts[k] = literal(v)
    for k, d in defaults.items():
        if k not in opts:
            if d is REQUIRED:
                raise DlcError(f"`{call.func}` is missing `{k}`", call.loc, [f"options: {', '.join(order)}"])
            opts[k] = d
    return opts


def load(call: A.Node, base_dir: Path, seed: int, float_dtype: str = "f32") -> Dataset:
    """The data source `call` names, split and standardized; float fields in `float_dtype`."""
    if not isinstance(call, A.Call):
        raise DlcError("`on` takes a data source such as digits(test = 0.2)", call.loc)
    if call.func not in SOURCES:
        raise DlcError(f"unknown data source `{call.func}`", call.func_loc, [f"sources: {', '.join(SOURCES)}"])
    fn, order, defaults = SOURCES[call.func]
    opts = _bind(call, order, defaults)
    test = opts["test"]
    if isinstance(test, bool) or not isinstance(test, (int, float)) or not 0 <= test < 1:
        raise DlcError(f"`test` is the held-out fraction, between 0 and 1, got {test!r}", call.loc)
    val = opts["val"]
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 <= val < 1 - test:
        raise DlcError(f"`val` is the fraction held out for validation, between 0 and 1 - test = {1 - test:g}, "
                       f"got {val!r}", call.loc)
    if not isinstance(opts["scale"], bool):
        raise DlcError(f"`scale` is true or false, got {opts['scale']!r}", call.loc)
    extra = {k: v for k, v in opts.items() if k not in ("test", "val", "scale")}
    if getattr(fn, "seeded", False):
        extra["seed"] = seed
    arrays = fn(call, base_dir, **extra)
    info = arrays.pop("__info__", None)
    ds = _split(arrays, test, seed, opts["scale"], call.loc, info, val)
    ftype = np.float64 if float_dtype == "f64" else np.float32
    for split in (ds.train, ds.val, ds.test):
        for k, v in split.items():
            if v.dtype.kind == "f":
                split[k] = v.astype(ftype, copy=False)
    return ds


def check_indices(reads, arrays: dict[str, np.ndarray], origin: str, origin_loc: Loc | None = None) -> None:
    """Every integer field read as an index (`compiler.bounds.index_reads`) holds values in
    range: an embedding's ids below its rows, labels below the loss's classes."""
    for r in reads:
        v = arrays.get(r.input)
        if v is None or v.size == 0:
            continue
        lo, hi = int(v.min()), int(v.max())
        bad = hi if hi >= r.limit else lo if lo < 0 and not r.negative_ok else None
        if bad is None:
            continue
        kind = "label" if r.negative_ok else "id"
        valid = f"{kind}s 0 to {r.limit - 1}" + (", negative labels are padding" if r.negative_ok else "")
        notes = [f"`{r.input}` holds {lo} to {hi}"]
        if origin_loc is not None:
            notes.append(f"the data source is at {origin_loc}")
        raise DlcError(f"`{r.input}` from {origin} holds the {kind} {bad}, but {r.what} ({valid})", r.loc, notes)


def describe(call: A.Call) -> str:
    """How a data source call reads in messages: `tagging(2000, 12, 20)`, `npz("d.npz", x = "a")`."""
    def show(v):
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list):
            return "[" + ", ".join(map(show, v)) + "]"
        return str(v).lower() if isinstance(v, bool) else str(v)
    args = [show(literal(a)) for a in call.args] + [f"{k} = {show(literal(v))}" for k, v in call.kwargs]
    return f"`{call.func}({', '.join(args)})`"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def _split(arrays: dict[str, np.ndarray], test: float, seed: int, scale, loc: Loc, info=None,
           val: float = 0.0) -> Dataset:
    from sklearn.model_selection import train_test_split
    n = len(next(iter(arrays.values())))
    if n == 0:
        raise DlcError("the data source holds no examples", loc)
    n_test = math.ceil(test * n)
    if n - n_test < 1:
        raise DlcError(f"holding out test = {test} of {_plural(n, 'example')} leaves none to train on", loc)
    for k, v in arrays.items():
        if len(v) != n:
            raise DlcError(f"data fields disagree in length: {k} has {len(v)} rows, expected {n}", loc)
        if v.dtype.kind == "f" and not (v.all_finite() if isinstance(v, Rows) else np.isfinite(v).all()):
            raise DlcError(f"data field `{k}` holds NaN or infinite values", loc)
    idx = np.arange(n)
    labels = arrays.get("y")
    strat = labels if (labels is not None and labels.ndim == 1 and labels.dtype.kind in "iu" and test > 0
                       and len(np.unique(labels)) < n // 2) else None
    if test > 0:
        try:
            tr, te = train_test_split(idx, test_size=test, random_state=seed, stratify=strat,
                                      shuffle=(info or {}).get("shuffle", True))
        except ValueError:
            tr, te = train_test_split(idx, test_size=test, random_state=seed)
    else:
        tr, te = idx, idx[:0]
    va = tr[:0]
    if val > 0:                 # from the training part, stratified the same way, before scaling
        part = val / (1 - test)
        try:
            tr, va = train_test_split(tr, test_size=part, random_state=seed,
                                      stratify=strat[tr] if strat is not None else None)
        except ValueError:
            tr, va = train_test_split(tr, test_size=part, random_state=seed)
    def rows(v, index):         # a streamed field stays on disk: its split is row indices
        return v.take(index) if isinstance(v, Rows) else v[index]
    train = {k: rows(v, tr) for k, v in arrays.items()}
    testd = {k: rows(v, te) for k, v in arrays.items()}
    vald = {k: rows(v, va) for k, v in arrays.items()}
    scaling = {}                # field -> (mean, deviation): `dlc predict --input-file` scales the same way
    if scale:
        for k, v in train.items():
            if v.dtype.kind == "f" and k != "y" and isinstance(v, Rows):
                mu, sd = v.mean_std()
                sd[sd == 0] = 1.0
                scaling[k] = (mu, sd)
                train[k], testd[k], vald[k] = (d[k].scaled(mu, sd) for d in (train, testd, vald))
            elif v.dtype.kind == "f" and k != "y":
                mu = v.mean(axis=0)
                sd = v.std(axis=0)
                sd[sd == 0] = 1.0
                scaling[k] = (mu, sd)
                train[k] = ((v - mu) / sd).astype(np.float32)
                testd[k] = ((testd[k] - mu) / sd).astype(np.float32)
                vald[k] = ((vald[k] - mu) / sd).astype(np.float32)
    info = {**(info or {}), "train_size": len(tr), "test_size": len(te), "val_size": len(va), "scaling": scaling}
    if labels is not None and labels.dtype.kind in "iu":
        info["classes"] = int(labels.max()) + 1
    return Dataset(train, testd, info, vald)


INT32_MAX = 2 ** 31 - 1


def _labels(v: np.ndarray, name: str, loc) -> np.ndarray:
    if v.size == 0:
        return v.astype(np.int32 if v.dtype.kind in "iu" else np.float32)
    if v.dtype.kind == "f":
        if not np.all(np.isfinite(v)) or not np.all(np.mod(v, 1) == 0):
            return v.astype(np.float32)
        if np.abs(v).max() > INT32_MAX:
            raise DlcError(f"labels `{name}` hold {v.max():.0f}; class indices are 32-bit (at most {INT32_MAX:,})", loc)
        v = v.astype(np.int64)
    if v.dtype.kind in "iu":
        if v.min() < 0:
            raise DlcError(f"labels `{name}` must be non-negative class indices, found {v.min()}", loc)
        if v.max() > INT32_MAX:
            raise DlcError(f"labels `{name}` hold {v.max()}; class indices are 32-bit (at most {INT32_MAX:,})", loc)
        return v.astype(np.int32)
    raise DlcError(f"field `{name}` must be numeric, got dtype {v.dtype}", loc)


def _reshape(x: np.ndarray, shape, loc):
    if shape is None:
        return x
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise DlcError("`shape` must be a list of integers, e.g. shape = [1, 8, 8]", loc)
    if isinstance(x, Rows) and math.prod(shape) != math.prod(x.row_shape):
        raise DlcError(f"cannot reshape examples of {x.row_shape} to {tuple(shape)}", loc)
    try:
        return x.reshape((len(x),) + tuple(shape))
    except ValueError:
        raise DlcError(f"cannot reshape examples of {x.shape[1:]} to {tuple(shape)}", loc) from None


@source("digits", ("test", "scale", "shape", "resize"), shape=None, resize=None)
def _digits(call, base_dir, shape=None, resize=None):
    """The 1797 8x8 handwritten digits that scikit-learn ships (no download). `resize = 28`
    upsamples each image to 28x28 (bilinear, scipy.ndimage.zoom) before `shape` applies."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = d.data.astype(np.float32)
    if resize is not None:
        if not isinstance(resize, int) or isinstance(resize, bool) or not 8 <= resize <= 256:
            raise DlcError(f"`digits`: `resize` is the new image side, an integer from 8 to 256, got {resize!r}",
                           call.loc)
        from scipy.ndimage import zoom
        x = zoom(x.reshape(-1, 8, 8), (1, resize / 8, resize / 8), order=1, grid_mode=True, mode="nearest")
        x = x.reshape(len(x), -1).astype(np.float32)
    return {"x": _reshape(x, shape, call.loc), "y": d.target.astype(np.int32)}


def _resolve(call, base_dir, path):
    if not isinstance(path, str):
        raise DlcError(f"`{call.func}` takes a file path string first", call.args[0].loc if call.args else call.loc)
    if not path:
        raise DlcError(f"`{call.func}`: the file path is empty", call.args[0].loc if call.args else call.loc)
    p = Path(path)
    if not p.is_absolute():
        p = base_dir / p
    where = call.args[0].loc if call.args else call.loc
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as e:            # a name too long, a loop of links
        raise DlcError(f"cannot open data file {path}: {e.strerror or e}", where) from None
    if is_dir:
        raise DlcError(f"the data file {p} is a directory", where)
    if not exists:
        raise DlcError(f"data file not found: {p}", where)
    return p


@source("npz", ("path", "x", "y", "shape", "test", "scale", "stream"), path=REQUIRED, x="x", y="y", shape=None,
        stream="auto")
def _npz(call, base_dir, path, x="x", y="y", shape=None, stream="auto"):
    """Arrays of an archive. `stream = true` reads `x` from disk a batch at a time (it must be
    stored uncompressed, as np.savez does); `"auto"` streams when `x` would fill more than a
    quarter of the memory available."""
    p = _resolve(call, base_dir, path)
    if not isinstance(x, str) or not isinstance(y, str):
        raise DlcError("`npz`: `x` and `y` name arrays in the archive (strings)", call.loc)
    _check_stream(call, stream)
    try:
        with open_npz(p, mmap_mode="r") as f:
            files = set(f.files)
            for key in (x, y):
                if key not in files:
                    raise DlcError(f"{p.name} has no array `{key}` (it has: {', '.join(sorted(files))})", call.loc)
            mapped = npz_member(p, x) if stream is not False else None
            if stream is True and mapped is None:
                raise DlcError(f"`npz`: cannot stream `{x}` from {p.name}: it is stored compressed, in Fortran "
                               "order or as objects (streaming maps a C-ordered array in place)", call.loc,
                               ["save it with np.savez(..., x = np.ascontiguousarray(x)), or set stream = false"])
            if mapped is not None and (stream is True or _too_big(mapped)):
                xs = mapped
            else:
                xs = f[x]
            ys = f[y]
    except DlcError:
        raise
    except Exception as e:  # zip errors, pickled objects, truncated files
        raise DlcError(f"cannot read {p.name} as .npz: {e}", call.loc) from None
    if xs.dtype.kind not in "fiu":
        raise DlcError(f"array `{x}` in {p.name} must be numeric, got {xs.dtype}", call.loc)
    if xs.ndim < 2:
        raise DlcError(f"array `{x}` in {p.name} must hold one row per example, [N, features...], "
                       f"got shape {list(xs.shape)}", call.loc,
                       ["a single feature per example is x.reshape(-1, 1)"] if xs.ndim == 1 else [])
    if ys.ndim < 1:
        raise DlcError(f"array `{y}` in {p.name} must hold one label (or row) per example, got a scalar", call.loc)
    xs = Rows(xs, np.arange(len(xs)), np.float32) if isinstance(xs, np.memmap) else xs.astype(np.float32)
    return {"x": _reshape(xs, shape, call.loc), "y": _labels(ys, y, call.loc)}


def _check_stream(call, stream):
    if stream not in (True, False, "auto"):
        raise DlcError(f"`{call.func}`: `stream` is true, false or \"auto\", got {stream!r}", call.loc)


def _too_big(a: np.ndarray) -> bool:
    """Whether an array, as float32, would take more than a quarter of the memory available."""
    return a.size * 4 > memory_limit() / 4


@source("csv", ("path", "label", "header", "shape", "test", "scale", "onehot"), path=REQUIRED, label=-1, header=True,
        shape=None, onehot=None)
def _csv(call, base_dir, path, label=-1, header=True, shape=None, onehot=None):
    """One example per row. A label column of text (`setosa`, `versicolor`, ...) is encoded as
    class ids in sorted order (the names kept for `dlc predict` and the checkpoint); feature
    columns are numbers, or text one-hot encoded when listed in `onehot = ["colour", ...]`."""
    import csv as _csv_mod
    p = _resolve(call, base_dir, path)
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DlcError(f"`csv`: `label` is a column name or index, got {label!r}", call.loc)
    if not isinstance(header, bool):
        raise DlcError(f"`csv`: `header` is true or false, got {header!r}", call.loc)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DlcError(f"cannot read {p.name}: {e.strerror or e}", call.loc) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DlcError(f"{p.name}:{line}: not UTF-8 text "
                       f"(byte 0x{raw[e.start]:02x})", call.loc, ["save the file as UTF-8"]) from None
    try:
        rows = list(_csv_mod.reader(text.splitlines()))
    except _csv_mod.Error as e:
        raise DlcError(f"{p.name}: not a CSV file: {e}", call.loc) from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise DlcError(f"{p.name} is empty", call.loc)
    if header and len(rows) == 1:
        raise DlcError(f"{p.name} has a header line but no rows of data", call.loc)
    if len(rows[0]) < 2:
        raise DlcError(f"{p.name} has one column; it needs the features and a label", call.loc)
    names = [c.strip() for c in rows[0]] if header else [str(i) for i in range(len(rows[0]))]
    body = rows[1:] if header else rows
    if header and all(_is_float(c) for c in names):
        raise DlcError(f"{p.name}: its first line, read as the header, is all numbers ({', '.join(names[:4])}"
                       f"{', ...' if len(names) > 4 else ''})", call.loc,
                       ["a file without a header: csv(..., header = false)"])
    dup = next((c for c in names if names.count(c) > 1), None) if header else None
    if dup is not None:
        raise DlcError(f"{p.name}: the column `{dup}` appears twice in its header", call.loc)
    li = _column(p, names, label, "label", call.loc)
    hot = onehot if isinstance(onehot, list) else [] if onehot is None else None
    if hot is None or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in hot):
        raise DlcError(f"`csv`: `onehot` is a list of column names or indices, got {onehot!r}", call.loc)
    hot = {_column(p, names, c, "onehot", call.loc) for c in hot}
    if li in hot:
        raise DlcError(f"`csv`: the label column `{names[li]}` cannot be one-hot encoded too", call.loc,
                       ["a text label is encoded as class ids by itself"])
    first = 2 if header else 1
    for i, r in enumerate(body, start=first):
        if len(r) != len(names):
            raise DlcError(f"{p.name}:{i}: expected {len(names)} columns, found {len(r)}", call.loc)
    cols = [[r[c].strip() for r in body] for c in range(len(names))]
    features = []               # (column name, categories or None): how `dlc predict` encodes a row the same way
    for c, values in enumerate(cols):
        if c == li:
            continue
        if c in hot:
            blank = next((i for i, v in enumerate(values) if not v), None)
            if blank is not None:
                raise DlcError(f"{p.name}:{blank + first}: the one-hot column `{names[c]}` is empty", call.loc)
            features.append((names[c], sorted(set(values))))
        elif not any(map(_is_float, values)):
            shown = ", ".join(f"`{v}`" for v in sorted(set(values))[:3])
            raise DlcError(f"{p.name}: column `{names[c]}` holds text ({shown}, ...), not numbers", call.loc,
                           [f"to one-hot encode it: csv(\"{path}\", ..., onehot = [\"{names[c]}\"])"])
        else:
            features.append((names[c], None))
    header_row = [n for c, n in enumerate(names) if c != li]
    xs = encode_rows(p.name, header_row, [[v for c, v in enumerate(r) if c != li] for r in body], features,
                     first, call.loc)
    out = {"x": _reshape(xs, shape, call.loc)}
    labels = cols[li]
    if not any(map(_is_float, labels)):              # class names: encoded in sorted order
        blank = next((i for i, v in enumerate(labels) if not v), None)
        if blank is not None:
            raise DlcError(f"{p.name}:{blank + first}: the label `{names[li]}` is empty", call.loc)
        classes = sorted(set(labels))
        out["y"] = np.searchsorted(np.array(classes), np.array(labels)).astype(np.int32)
        out["__info__"] = {"class_names": classes}
    else:
        ys = []
        for i, v in enumerate(labels, start=first):
            if not _is_float(v):
                raise DlcError(f"{p.name}:{i}: `{v}` is not a number", call.loc)
            ys.append(float(v))
        out["y"] = _labels(np.array(ys), names[li], call.loc)
    out.setdefault("__info__", {})["csv_features"] = features
    return out


def _column(p, names, which, option, loc) -> int:
    """The index of a column given by name or (negative) index."""
    if isinstance(which, str):
        if which not in names:
            raise DlcError(f"{p.name} has no column `{which}` (columns: {', '.join(names)})", loc)
        return names.index(which)
    if -len(names) <= which < len(names):
        return which % len(names)
    raise DlcError(f"{p.name} has {len(names)} columns; there is no column {which}", loc)


def encode_rows(source: str, names: list, rows: list, features: list, first_line: int, loc=None) -> np.ndarray:
    """CSV feature rows (strings) as float32 vectors: number columns parsed, categorical ones
    one-hot over their known categories (`features`: (name, categories or None) per column, in
    the order of `names`). A value that is not a number, or a category not seen in training,
    is an error naming its line."""
    out = np.zeros((len(rows), sum(len(cats) if cats else 1 for _, cats in features)), np.float32)
    for i, r in enumerate(rows):
        j = 0
        for (name, cats), v in zip(features, r):
            v = v.strip()
            if cats is None:
                try:
                    out[i, j] = float(v)
                except ValueError:
                    raise DlcError(f"{source}:{i + first_line}: `{v}` is not a number", loc) from None
                j += 1
            else:
                if v not in cats:
                    raise DlcError(f"{source}:{i + first_line}: column `{name}` holds `{v}`, not a category seen in "
                                   f"training ({', '.join(cats)})", loc)
                out[i, j + cats.index(v)] = 1.0
                j += len(cats)
    return out


IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(p: Path, loc, stream=False) -> np.ndarray:
    """An IDX file (MNIST's format, gzipped or not): magic 0 0 TYPE NDIM, NDIM big-endian
    int32 sizes, then the data, big-endian. Memory-mapped when not compressed and `stream`."""
    import gzip
    try:
        gz = p.read_bytes()[:2] == b"\x1f\x8b"
        with (gzip.open(p, "rb") if gz else open(p, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in IDX_TYPES or head[3] == 0:
                raise DlcError(f"{p.name} is not an IDX file (it starts with {head.hex()}; an IDX file starts "
                               f"with 0000, a type byte 08-0e and the number of dimensions)", loc)
            dims = tuple(int(d) for d in np.frombuffer(f.read(4 * head[3]), ">i4"))
            if len(dims) != head[3]:
                raise DlcError(f"{p.name}: the IDX header is cut short", loc)
            dtype = np.dtype(IDX_TYPES[head[2]])
            need = math.prod(dims) * dtype.itemsize
            if not gz and (stream is True or stream == "auto" and need * 4 // dtype.itemsize > memory_limit() / 4):
                if p.stat().st_size < 4 + 4 * len(dims) + need:
                    raise DlcError(f"{p.name}: the header promises {dims} values, the file is shorter", loc)
                return np.memmap(p, dtype=dtype, mode="r", offset=4 + 4 * len(dims), shape=dims)
            require(need, f"reading {p.name}", loc)
            raw = f.read(need)
    except OSError as e:
        raise DlcError(f"cannot read {p.name}: {e.strerror or e}", loc) from None
    if len(raw) < need:
        raise DlcError(f"{p.name}: the header promises {dims} values, the file is shorter", loc)
    return np.frombuffer(raw, dtype).reshape(dims).astype(dtype.newbyteorder("="))


@source("idx", ("images", "labels", "shape", "test", "scale", "stream"), images=REQUIRED, labels=REQUIRED,
        shape=None, stream="auto")
def _idx(call, base_dir, images, labels, shape=None, stream="auto"):
    """A pair of IDX files as MNIST ships them: `idx("train-images-idx3-ubyte",
    "train-labels-idx1-ubyte")` (also `.gz`). Images are [N, rows, cols] of float32 (`shape =
    [1, 28, 28]` for a CNN); the labels' type is kept as class ids. `stream` as for `npz`."""
    _check_stream(call, stream)
    img_p = _resolve(call, base_dir, images)
    lab_p = _resolve(call, base_dir, labels) if isinstance(labels, str) and labels else None
    if lab_p is None:
        raise DlcError("`idx` takes the labels file's path second", call.loc)
    xs = read_idx(img_p, call.loc, stream)
    ys = read_idx(lab_p, call.loc)
    if xs.ndim < 2:
        raise DlcError(f"{img_p.name} holds {xs.ndim}-D data; the images file is [N, rows, cols]", call.loc)
    if ys.ndim != 1:
        raise DlcError(f"{lab_p.name} holds {list(ys.shape)} values; the labels file is one label per image "
                       "(were the two files given the other way round?)", call.loc)
    if len(xs) != len(ys):
        raise DlcError(f"{img_p.name} holds {len(xs):,} images but {lab_p.name} {len(ys):,} labels", call.loc)
    xs = Rows(xs, np.arange(len(xs)), np.float32) if isinstance(xs, np.memmap) else xs.astype(np.float32)
    return {"x": _reshape(xs, shape, call.loc), "y": _labels(ys, labels, call.loc)}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@source("images", ("path", "size", "channels", "test", "scale"), path=REQUIRED, size=REQUIRED, channels=1)
def _images(call, base_dir, path, size, channels=1):
    """A folder of image files, one subfolder per class (`dir/cat/1.png`, `dir/dog/7.jpg`):
    each image read with Pillow, converted to grey (`channels = 1`) or RGB (3), resized to
    size x size (bilinear) and scaled to [0, 1]: x is [N, channels, size, size], y the index
    of its subfolder in sorted order (the names kept for `dlc predict` and the checkpoint)."""
    if not isinstance(path, str) or not path:
        raise DlcError("`images` takes a folder path first", call.loc)
    root = Path(path) if Path(path).is_absolute() else base_dir / path
    where = call.args[0].loc if call.args else call.loc
    if not root.is_dir():
        raise DlcError(f"image folder not found: {root}" if not root.exists() else f"{root} is not a folder", where)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1024:
        raise DlcError(f"`images`: `size` is the side images are resized to, 1 to 1024, got {size!r}", call.loc)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DlcError(f"`images`: `channels` is 1 (grey) or 3 (RGB), got {channels!r}", call.loc)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(f, k) for k, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(classes) < 2:
        raise DlcError(f"{root} needs a subfolder per class (at least 2), found "
                       f"{', '.join(classes) or 'none'}", where, ["dir/cat/1.png, dir/dog/2.png, ..."])
    if not files:
        raise DlcError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the subfolders of {root}", where)
    empty = [c for k, c in enumerate(classes) if not any(j == k for _, j in files)]
    if empty:
        raise DlcError(f"the class folder `{empty[0]}` of {root} holds no images", where,
                       ["a class without examples would count in the metrics with support 0; remove the folder"])
    require(len(files) * channels * size * size * 4 * 3, f"`images` with {len(files):,} images of {size}x{size}",
            call.loc)
    x = np.empty((len(files), channels, size, size), np.float32)
    for i, (f, _) in enumerate(files):
        x[i] = read_image(f, size, channels, call.loc, f.relative_to(root))
    y = np.array([k for _, k in files], np.int32)
    return {"x": x, "y": y, "__info__": {"class_names": classes, "image": (size, channels)}}


def read_image(f: Path, size: int, channels: int, loc=None, shown=None) -> np.ndarray:
    """An image file as [channels, size, size] in [0, 1]: grey or RGB, resized bilinearly."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(f) as im:
            if im.mode.startswith("I") or im.mode == "F":   # 16- or 32-bit grey: convert("L") clips at 255
                full = {"F": 1.0, "I": 65535.0}.get(im.mode, 65535.0)
                g = Image.fromarray(np.asarray(im, np.float32) / full, "F").resize((size, size), Image.Resampling.BILINEAR)
                a = np.clip(np.asarray(g, np.float32), 0.0, 1.0)
                if channels == 3:
                    a = np.repeat(a[..., None], 3, axis=2)
            else:
                im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
                a = np.asarray(im, np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise DlcError(f"cannot read the image {shown or f}: {e}", loc) from None
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ---- generated sequence tasks (seeded) ----------------------------------------------------------
# Token conventions for the generated tasks: 0 pads inputs, 1 begins a decoder input (BOS),
# 2 ends an output (EOS); labels of padded output positions are -1 and are ignored by the loss
# and the metrics.
PAD, BOS, EOS, IGNORE = 0, 1, 2, -1


def _positive_int(call, name, v, low=1):
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise DlcError(f"`{call.func}`: `{name}` must be an integer >= {low}, got {v!r}", call.loc)
    return v


def _require_ids(call, name, v):
    """Token ids are 32-bit."""
    if v >= INT32_MAX:
        raise DlcError(f"`{call.func}`: `{name}` must be below {INT32_MAX:,} (token ids are 32-bit), got {v:,}",
                       call.loc)


def seeded(fn):
    fn.seeded = True
    return fn


@source("tagging", ("n", "length", "vocab", "test", "scale"), scale=False, n=4000, length=12, vocab=10)
@seeded
def _tagging(call, base_dir, n=4000, length=12, vocab=10, seed=0):
    """Many-to-many: tag each token 1 if the same token already occurred earlier in the
    sequence, else 0. The right tag depends on everything read so far."""
    n, length, vocab = (_positive_int(call, k, v) for k, v in (("n", n), ("length", length), ("vocab", vocab)))
    _require_ids(call, "vocab", vocab)
    # int64 tokens while generating, the int32 copies, and the tokens' names
    require(n * length * (8 + 4 + 4) + vocab * 64, f"`{call.func}` with n = {n:,}, length = {length:,}, "
            f"vocab = {vocab:,}", call.loc)
    rng = np.random.default_rng(seed + 101)
    x = rng.integers(1, vocab + 1, size=(n, length))
    y = np.zeros((n, length), np.int32)
    for t in range(1, length):
        y[:, t] = (x[:, :t] == x[:, t:t + 1]).any(axis=1)
    tokens = ["<pad>"] + [str(i) for i in range(1, vocab + 1)]
    return {"x": x.astype(np.int32), "y": y,
            "__info__": {"input_vocab": tokens, "vocab": ["new", "seen"], "pad": "none"}}


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LETTERS = sorted(set("".join(DIGIT_NAMES)))
WORD_VOCAB = ["<pad>", "<s>", "</s>"] + LETTERS


@source("digit_names", ("test", "scale"))
def _digit_names(call, base_dir):
    """One-to-many: an 8x8 digit image (x) and its English name spelled letter by letter:
    y holds the letters then EOS (padding -1), y_in the decoder's input: BOS then the letters."""
    from sklearn.datasets import load_digits
    d = load_digits()
    length = max(len(w) for w in DIGIT_NAMES) + 1
    y = np.full((len(d.target), length), IGNORE, np.int32)
    y_in = np.full((len(d.target), length), PAD, np.int32)
    for i, k in enumerate(d.target):
        ids = [WORD_VOCAB.index(ch) for ch in DIGIT_NAMES[k]] + [EOS]
        y[i, :len(ids)] = ids
        y_in[i, :len(ids)] = [BOS] + ids[:-1]
    return {"x": d.data.astype(np.float32), "y": y, "y_in": y_in, "__info__": {"vocab": WORD_VOCAB, "join": ""}}


SEQ_VOCAB = ["<pad>", "<s>", "</s>"] + [str(i) for i in range(10)]


MAX_LOOPED = 2_000_000      # about 20 s of generating


@source("reverse", ("n", "min_len", "max_len", "test", "scale"), scale=False, n=8000, min_len=5, max_len=8)
@seeded
def _reverse(call, base_dir, n=8000, min_len=5, max_len=8, seed=0):
    """Sequence to sequence: a string of 5-8 digits in (x, left-padded with 0), the same digits
    reversed out (y: digits then EOS, padding -1; y_in: BOS then the digits)."""
    n = _positive_int(call, "n", n)
    lo, hi = _positive_int(call, "min_len", min_len), _positive_int(call, "max_len", max_len)
    if lo > hi:
        raise DlcError(f"`reverse`: min_len {lo} is larger than max_len {hi}", call.loc)
    if n > MAX_LOOPED:          # made one example at a time: bounded by time as well as memory
        raise DlcError(f"`{call.func}`: `n` must be at most {MAX_LOOPED:,} (examples are generated one by one), "
                       f"got {n:,}", call.loc)
    require(n * (3 * hi + 2) * 4, f"`{call.func}` with n = {n:,}, max_len = {hi:,}", call.loc)
    rng = np.random.default_rng(seed + 202)
    x = np.full((n, hi), PAD, np.int32)
    y = np.full((n, hi + 1), IGNORE, np.int32)
    y_in = np.full((n, hi + 1), PAD, np.int32)
    for i in range(n):
        k = int(rng.integers(lo, hi + 1))
        digits = rng.integers(0, 10, size=k) + 3
        x[i, hi - k:] = digits
        out = list(digits[::-1]) + [EOS]
        y[i, :k + 1] = out
        y_in[i, :k + 1] = [BOS] + out[:-1]
    return {"x": x, "y": y, "y_in": y_in, "__info__": {"input_vocab": SEQ_VOCAB, "vocab": SEQ_VOCAB, "pad": "left"}}


ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
NUMBER_WORDS = ONES + TENS[2:] + ["hundred", "thousand"]


def number_words(k: int) -> list[str]:
    """English words for 0 <= k <= 9999: 3042 -> three thousand forty two."""
    if k == 0:
        return ["zero"]
    words = []
    if k >= 1000:
        words += [ONES[k // 1000], "thousand"]
    if k % 1000 >= 100:
        words += [ONES[k % 1000 // 100], "hundred"]
    k %= 100
    if k >= 20:
        words += [TENS[k // 10]] + ([ONES[k % 10]] if k % 10 else [])
    elif k:
        words.append(ONES[k])
    return words


@source("number_words", ("test", "scale"), scale=False)
def _number_words(call, base_dir):
    """Sequence to sequence: every number 0..9999 once, as English words (x: word ids,
    right-padded with -1, the padding convention) and as digits (y: digits then EOS, padding
    -1; y_in: BOS then the digits). Held-out numbers are never seen in training."""
    n = 10000
    words = [number_words(k) for k in range(n)]
    x = np.full((n, max(map(len, words))), IGNORE, np.int32)
    y = np.full((n, 5), IGNORE, np.int32)
    y_in = np.full((n, 5), PAD, np.int32)
    for k, ws in enumerate(words):
        x[k, :len(ws)] = [NUMBER_WORDS.index(w) for w in ws]
        out = [SEQ_VOCAB.index(c) for c in str(k)] + [EOS]
        y[k, :len(out)] = out
        y_in[k, :len(out)] = [BOS] + out[:-1]
    return {"x": x, "y": y, "y_in": y_in,
            "__info__": {"input_vocab": NUMBER_WORDS, "vocab": SEQ_VOCAB, "join": "", "pad": "right"}}


def pydoc_text() -> str:
    """Python's own documentation, offline on every machine: the topics of `pydoc_data.topics`
    joined in sorted key order (464,970 characters and 103 distinct with Python 3.11.7; the
    count varies a little between Python versions)."""
    from pydoc_data.topics import topics
    return "".join(topics[k] for k in sorted(topics))


@source("text", ("path", "context", "test", "scale"), scale=False, path=None, context=64)
def _text(call, base_dir, path=None, context=64):
    """A character language model's data: the text (a UTF-8 file, default Python's
    documentation) cut into consecutive windows of `context` characters, x = the window and
    y = the same window shifted one character on (the next character at each position). The
    split is not shuffled: the held-out part is the end of the text."""
    context = _positive_int(call, "context", context, 2)
    if path is None:
        text = pydoc_text()
    else:
        file = _resolve(call, base_dir, path)
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DlcError(f"`text`: {file} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})",
                           call.loc, ["convert it, e.g. iconv -f latin1 -t utf-8"]) from None
    chars = sorted(set(text))
    ids = np.searchsorted(np.array([ord(c) for c in chars]), [ord(c) for c in text]).astype(np.int32)
    n = (len(ids) - 1) // context
    if n < 2:
        raise DlcError(f"`text`: {len(ids)} characters make fewer than 2 windows of {context} + 1", call.loc)
    x = ids[:n * context].reshape(n, context)
    y = ids[1:n * context + 1].reshape(n, context)
    return {"x": x, "y": y, "__info__": {"input_vocab": chars, "vocab": chars, "join": "", "shuffle": False}}
