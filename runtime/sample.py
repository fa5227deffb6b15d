"""`dlc sample`: run a file's sampling program (`generate NAME(n) { ... }`) with the parameters
of a trained checkpoint, and write the samples: a PNG grid for images, text for tokens.

The program is compiled once, in evaluation mode, like the model's evaluation program; the
number of samples is a run-time size and the seed a run-time scalar, so `-n` and `--seed`
never recompile. A diffusion model's T denoising steps are one compiled `scan`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dsl.diagnostics import DlcError
from dsl.parser import parse_file

from . import checkpoint


class Sampler:
    """A compiled sampling program: `Sampler(path)(n, seed)` after `load(checkpoint)`."""

    def __init__(self, path, program: str | None = None, dtype: str = "f32", fuse: bool = True):
        from compiler.driver import Lowerer, build, optimize_eval
        self.path = Path(path)
        module = parse_file(self.path)
        lw = Lowerer(module, dtype, training=False)
        if not lw.generators:
            raise DlcError(f"{self.path.name} declares no sampling program; add one such as "
                           "`generate samples(n) { return G(normal([n, 16])) }`", module.loc)
        self.name = program or next(iter(lw.generators))
        self.lowerer = lw
        prog = lw.lower_generate(self.name)
        self.ex = build(optimize_eval(prog.graph, fuse))
        self.values: dict[str, np.ndarray] = {}

    def load(self, path) -> None:
        """Take the parameters (and model state, such as running statistics) from a checkpoint."""
        params, state, _ = checkpoint.load(path)
        for name, kind, shape, dtype in self.ex.inputs:
            if kind not in ("param", "state"):
                continue
            v = params.get(name) if kind == "param" else state.get(name)
            if v is None:
                raise DlcError(f"checkpoint {path} lacks {'parameter' if kind == 'param' else 'state'} `{name}`, "
                               f"which the sampling program `{self.name}` uses")
            if tuple(v.shape) != tuple(shape):
                raise DlcError(f"checkpoint {kind} `{name}` is {list(v.shape)}, the program's is {list(shape)}")
            from compiler.shapes import DTYPES
            self.values[name] = np.ascontiguousarray(v, DTYPES[dtype])

    def __call__(self, n: int, seed: int = 0) -> np.ndarray:
        from compiler.shapes import DTYPES
        args = []
        for name, kind, shape, dtype in self.ex.inputs:
            if kind == "scalar":                    # the seed of the random stream
                args.append(DTYPES[dtype](seed))
            elif kind == "data":                    # `count`: its length is the number of samples
                args.append(np.zeros(n, DTYPES[dtype]))
            else:
                args.append(self.values[name])
        return np.asarray(dict(zip(self.ex.outputs, self.ex(*args)))["output"])


def as_images(x: np.ndarray) -> np.ndarray:
    """Samples as images [n, H, W] (gray) or [n, H, W, 3]: [n, H, W], [n, 1 or 3, H, W], or
    [n, D] with D a square."""
    if x.ndim == 2 and math.isqrt(x.shape[1]) ** 2 == x.shape[1]:
        s = math.isqrt(x.shape[1])
        return x.reshape(len(x), s, s)
    if x.ndim == 3:
        return x
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)
    raise DlcError(f"cannot show samples of shape {list(x.shape)} as images; return [n, H, W], [n, 1, H, W] "
                   "or [n, H * W] with pixels in [0, 1]")


def write_grid(images: np.ndarray, path, scale: int = 4, pad: int = 1) -> None:
    """A PNG grid of images with pixels in [0, 1] (clipped), each enlarged `scale` times."""
    from PIL import Image
    n, h, w = images.shape[:3]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad) + images.shape[3:])
    for k, img in enumerate(np.clip(images, 0, 1)):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    pixels = np.kron(grid, np.ones((scale, scale) + (1,) * (grid.ndim - 2)))
    Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(path)


def as_text(path: Path, ids: np.ndarray) -> list[str]:
    """Token samples as text, with the vocabulary of the file's training data if it has one."""
    from compiler.driver import Lowerer
    from . import data
    from .predict import decode_rows
    lw = Lowerer(parse_file(path), "f32")
    ds = data.load(lw.trains[0].data, path.parent, 0) if lw.trains else data.Dataset({}, {}, {})
    return decode_rows(ds, ids)


def run_cli(args) -> int:
    """`dlc sample FILE --load CK [-n N] [--seed S] [--out grid.png] [--npz samples.npz]`."""
    import sys
    s = Sampler(args.file, args.program, args.dtype, fuse=not args.no_fuse)
    s.load(args.load)
    x = s(args.n, args.seed)
    if args.npz:
        np.savez(args.npz, samples=x)
    if x.dtype.kind in "iu":
        for line in as_text(s.path, x):
            print(line)
        return 0
    out = args.out or "samples.png"
    write_grid(as_images(x), out)
    print(f"dlc: {args.n} samples of `{s.name}` {list(x.shape[1:])} -> {out}", file=sys.stderr)
    return 0


def check_generators(module, dtype: str = "f32") -> list[str]:
    """Lower each sampling program of a file (for `dlc check`): one line per program, its result type."""
    from compiler.driver import Lowerer
    from compiler.shapes import fmt_type
    lines = []
    for name in Lowerer(module, dtype, training=False).generators:
        lw = Lowerer(module, dtype, training=False)
        g = lw.lower_generate(name).graph
        out = g.outputs["output"]
        lines.append(f"generate {name}: {fmt_type(g.dtype(out), g.shape(out))}")
    return lines
