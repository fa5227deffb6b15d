"""Data larger than memory: arrays read from disk a batch at a time.

An uncompressed `.npz` member or an IDX file is memory-mapped (`np.memmap`: the operating
system pages in what is read and may drop it again), and a split of it is a `Rows`: the
row indices of the split, and the standardization to apply, over the mapped array. Indexing
a `Rows` with the rows of a batch reads those rows alone, so training, evaluation and
`dlc predict` never hold the whole array. The statistics of the training rows (and the
checks for NaN) are computed chunk by chunk.
"""
from __future__ import annotations

import zipfile

import numpy as np

CHUNK_BYTES = 2 ** 20            # float64 bytes of the rows read at once by the passes over a whole split


def open_npz(path, mmap_mode=None):
    """`np.load` of an .npz archive, never unpickling. A file that is not a zip archive
    is a ValueError saying so (np.load would try it as .npy, then as a pickle, and complain
    that pickles are not allowed)."""
    if not zipfile.is_zipfile(path):
        raise ValueError("it is not an .npz file (np.savez writes a zip archive of .npy arrays)")
    return np.load(path, allow_pickle=False, mmap_mode=mmap_mode)


def npz_member(path, name: str) -> np.memmap | None:
    """Member `name` of an .npz archive as a read-only memmap, or None when it cannot be
    mapped (compressed, or an object array: read it the ordinary way)."""
    with zipfile.ZipFile(path) as z:
        try:
            info = z.getinfo(name + ".npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with z.open(info) as f:                 # the .npy header: shape, dtype, order
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            header = f.tell()
    if dtype.hasobject or fortran:
        return None
    with open(path, "rb") as raw:               # the data follow the zip entry's local header
        raw.seek(info.header_offset + 26)
        n_name, n_extra = np.frombuffer(raw.read(4), "<u2")
    start = info.header_offset + 30 + int(n_name) + int(n_extra) + header
    if not shape or 0 in shape:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape)


def chunks(n: int, row_bytes: int):
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


class Rows:
    """Rows `index` of an on-disk array `base`, standardized with (`mean`, `std`) when given and
    cast to `dtype`, read when indexed: `rows[batch_indices]`, `rows[a:b]` give ndarrays."""

    def __init__(self, base: np.ndarray, index: np.ndarray, dtype, mean=None, std=None, shape=None):
        self.base, self.index = base, np.asarray(index, np.int64)
        self.dtype = np.dtype(dtype)
        self.mean, self.std = mean, std
        self.row_shape = tuple(shape) if shape is not None else base.shape[1:]

    @property
    def shape(self) -> tuple:
        return (len(self.index),) + self.row_shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key) -> np.ndarray:
        rows = self.index[key]
        if np.ndim(rows) == 0:
            return self[np.array([rows])][0]
        order = np.argsort(rows, kind="stable")       # read the file forwards, then restore the order
        block = np.empty((len(rows),) + self.base.shape[1:], self.base.dtype)
        block[order] = self.base[rows[order]]
        x = block.astype(np.float64) if self.mean is not None else block
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.astype(self.dtype, copy=False).reshape((len(rows),) + self.row_shape)

    def take(self, index) -> "Rows":
        """A sub-split (rows of these rows), lazily."""
        return Rows(self.base, self.index[index], self.dtype, self.mean, self.std, self.row_shape)

    def astype(self, dtype, copy: bool = True) -> "Rows":
        return Rows(self.base, self.index, dtype, self.mean, self.std, self.row_shape)

    def reshape(self, shape) -> "Rows":
        return Rows(self.base, self.index, self.dtype, self.mean, self.std, tuple(shape[1:]))

    def scaled(self, mean, std) -> "Rows":
        return Rows(self.base, self.index, np.float32, mean, std, self.row_shape)

    def blocks(self):
        """The rows in chunks of a few megabytes, each an ndarray."""
        row_bytes = int(np.prod(self.row_shape)) * 8
        for sl in chunks(len(self), row_bytes):
            yield self[sl]

    def all_finite(self) -> bool:
        return all(np.isfinite(b).all() for b in self.blocks())

    def min(self):
        return min(b.min() for b in self.blocks())

    def max(self):
        return max(b.max() for b in self.blocks())

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and deviation, in float64, one pass (shifted sums: no cancellation)."""
        shift = np.asarray(self[:1], np.float64)[0]
        s = np.zeros(self.row_shape)
        s2 = np.zeros(self.row_shape)
        for b in self.blocks():
            d = b.astype(np.float64) - shift
            s += d.sum(0)
            s2 += (d * d).sum(0)
        n = len(self)
        m = s / n
        return shift + m, np.sqrt(np.maximum(s2 / n - m * m, 0.0))

    def __array__(self, dtype=None, copy=None):
        """The whole split as an ndarray (for tests and small data; training never asks)."""
        out = self[:]
        return out.astype(dtype) if dtype is not None else out
