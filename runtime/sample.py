"""`dlc sample`: run a file's sampling program (`generate NAME(n) { ... }`) with the parameters
of a trained checkpoint, and write the samples: a PNG grid for images, text for tokens.

The program is compiled once, in evaluation mode, like the model's evaluation program; the
number of samples is a run-time size and the seed a run-time scalar, so `-n` and `--seed`
never recompile. A diffusion model's T denoising steps are one compiled `scan`.

A program with a `prompt` input (a character language model: `generate text(n, prompt: i32[1, P],
temperature: float = 0, top_k: int = 0)`) continues a prompt: each call draws n characters after
the P of the window it is given, and `generate_text` slides the window (the model's context)
along the text, half a context at a time, so any number of characters comes out of a few calls.
The draws are indexed by the character's position in the text (the seed of each call is the
seed plus the characters drawn before it), so the text does not depend on how it is cut into calls.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dsl.diagnostics import DlcError
from dsl.parser import parse_file

from . import checkpoint, outputs


class Sampler:
    """A compiled sampling program: `Sampler(path)(n, seed)` after `load(checkpoint)`."""

    def __init__(self, path, program: str | None = None, dtype: str = "f32", fuse: bool = True,
                 options: dict | None = None):
        from compiler.driver import Lowerer, build, optimize_eval
        self.path = Path(path)
        module = parse_file(self.path)
        lw = Lowerer(module, dtype, training=False)
        if not lw.generators:
            raise DlcError(f"{self.path.name} declares no sampling program; add one such as "
                           "`generate samples(n) { return G(normal([n, 16])) }`", module.loc)
        self.name = program or next(iter(lw.generators))
        self.lowerer = lw
        prog = lw.lower_generate(self.name, options)
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
            from compiler.driver import DTYPES
            want = np.dtype(DTYPES[dtype])
            # an f32 checkpoint samples exactly in f64; f64 into f32 would round silently
            if tuple(v.shape) != tuple(shape) or not (v.dtype == want or np.can_cast(v.dtype, want, "safe")):
                raise DlcError(f"checkpoint {kind} `{name}` is {v.dtype}{list(v.shape)}, the program's is "
                               f"{want}{list(shape)}", None,
                               [f"a checkpoint trained with --dtype {'f64' if v.dtype == np.float64 else 'f32'} "
                                f"samples with the same --dtype"] if v.dtype != want and v.dtype.kind == "f" else [])
            self.values[name] = np.ascontiguousarray(v, want)

    @property
    def input_names(self) -> list[str]:
        """The program's own inputs besides the sample count (such as `prompt`)."""
        from compiler.driver import SAMPLE_COUNT as COUNT
        return [name for name, kind, _, _ in self.ex.inputs if kind == "data" and name != COUNT]

    def __call__(self, n: int, seed: int = 0, **inputs) -> np.ndarray:
        from compiler.driver import SAMPLE_COUNT as COUNT
        from compiler.driver import DTYPES
        args = []
        for name, kind, shape, dtype in self.ex.inputs:
            if kind == "scalar":                    # the seed of the random stream
                args.append(DTYPES[dtype](seed))
            elif kind == "data" and name == COUNT:  # its length is the number of samples
                args.append(np.zeros(n, DTYPES[dtype]))
            elif kind == "data":                    # an input of the program, such as a prompt
                if name not in inputs:
                    raise DlcError(f"the sampling program `{self.name}` needs its input `{name}`")
                v = np.ascontiguousarray(inputs[name], DTYPES[dtype])
                if v.ndim != len(shape) or any(isinstance(d, int) and d != k for d, k in zip(shape, v.shape)):
                    raise DlcError(f"input `{name}` of `{self.name}` is {list(shape)}, got {list(v.shape)}")
                args.append(v)
            else:
                args.append(self.values[name])
        return np.asarray(dict(zip(self.ex.outputs, self.ex(*args)))["output"])


def generate_text(sampler: Sampler, prompt: list[int], n: int, context: int, seed: int = 0) -> list[int]:
    """n tokens after `prompt` from a program with a `prompt` input, which continues a window of
    at most `context` tokens (and numbers positions from the window's start). The window is the
    prompt's last `context // 2` tokens when the prompt fills the context, and slides by half a
    context whenever the text fills it; the next call then reads that half again first. (Call
    a text program through this: the window and the characters of one call must fit the
    context, whose positions the program's tables hold.)"""
    if context < 2:
        raise DlcError(f"a text program needs a context of at least 2 tokens, not {context}")
    if not prompt:
        raise DlcError("the prompt is empty; give at least one character (--prompt)")
    ids, keep = list(prompt), max(1, context // 2)
    start = 0 if len(ids) < context else len(ids) - keep
    drawn = 0
    while drawn < n:
        if len(ids) - start >= context:
            start = len(ids) - keep
        window = ids[start:]
        m = min(context - len(window), n - drawn)
        ids += [int(t) for t in sampler(m, seed + drawn, prompt=np.array([window]))]
        drawn += m
    return ids[len(prompt):]


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
    from .predict import decode_rows
    return decode_rows(_training_data(path)[0], ids)


def _training_data(path: Path):
    from compiler.driver import Lowerer
    from . import data
    lw = Lowerer(parse_file(path), "f32")
    return (data.load(lw.trains[0].data, path.parent, 0) if lw.trains else data.Dataset({}, {}, {})), lw


def attention_maps(path, checkpoint_path, ids: list[int], dtype: str = "f32", fuse: bool = True):
    """The attention weights of the trained model on a text: [(label, weights [heads, L, L])] per
    layer, L = len(ids) (at most the model's context). Every softmax of rank 4 in the model's
    evaluation program -- [N, heads, T, S] -- is an attention layer; its label is the `.dl`
    line that made it."""
    from compiler.driver import Lowerer, build, optimize_eval
    path = Path(path)
    module = parse_file(path)
    lw = Lowerer(module, dtype, training=False)
    if not lw.trains:
        raise DlcError(f"{path.name} has no train block naming the model whose attention to draw", module.loc)
    model = lw.trains[0].model
    prog = lw.lower_model(model)
    g = prog.graph
    layers = [n for n in g.topo() if g.op(n) == "softmax" and len(g.shape(n)) == 4]
    if not layers:
        raise DlcError(f"model `{model}` has no attention (no softmax over [N, heads, T, S])")
    for i, n in enumerate(layers):
        g.outputs[f"attention{i}"] = n
    labels = [f"layer {i + 1}" + (f" ({Path(g[n]['loc'].file).name}:{g[n]['loc'].line})" if g[n].get("loc") else "")
              for i, n in enumerate(layers)]
    ex = build(optimize_eval(g, fuse))
    params, state, _ = checkpoint.load(checkpoint_path)
    data = [shape for _, kind, shape, _ in ex.inputs if kind == "data"]
    if len(data) != 1 or len(data[0]) != 2:
        raise DlcError(f"--attention draws a model of one token sequence [B, T]; `{model}` reads {len(data)} inputs")
    context = data[0][-1]
    if not isinstance(context, int):
        raise DlcError(f"model `{model}` reads sequences of a symbolic length; --attention needs a fixed context")
    window = list(ids)[-context:]
    from compiler.driver import DTYPES
    args = []
    for name, kind, shape, dt in ex.inputs:
        if kind == "data":
            args.append(np.array([window + [0] * (context - len(window))], DTYPES[dt]))
        elif kind == "scalar":
            args.append(DTYPES[dt](0))
        else:
            v = params.get(name) if kind == "param" else state.get(name)
            if v is None:
                raise DlcError(f"checkpoint {checkpoint_path} lacks `{name}`, which model `{model}` uses")
            args.append(np.ascontiguousarray(v, DTYPES[dt]))
    out = dict(zip(ex.outputs, ex(*args)))
    maps = [np.asarray(out[f"attention{i}"])[0] for i in range(len(layers))]
    n = len(window)
    if n < context and any(np.triu(w[..., :n, :], 1).any() for w in maps):
        raise DlcError(f"model `{model}` attends to later positions, so the padding after a text of {n} < {context} "
                       "characters would change its attention; give a longer text")
    # causal attention: the padding after the text changes none of the text's rows
    return [(label, w[:, :n, :n]) for label, w in zip(labels, maps)], window


def draw_attention(maps, tokens: list[str], path) -> None:
    """One heatmap per layer (rows) and head (columns): query positions down, keys across."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = len(maps), max(w.shape[0] for _, w in maps)
    n = len(tokens)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    shown = [repr(t)[1:-1] for t in tokens]
    for r, (label, w) in enumerate(maps):
        for h in range(cols):
            ax = axes[r][h]
            ax.imshow(w[h], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"{label} head {h + 1}", fontsize=8)
            step = max(1, n // 32)
            ax.set_xticks(range(0, n, step), shown[::step], fontsize=5, rotation=90)
            ax.set_yticks(range(0, n, step), shown[::step], fontsize=5)
    fig.suptitle("attention weights (rows: queries, columns: keys)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _text_cli(s: Sampler, args) -> int:
    """Continue a prompt with a character model and print the text (or one JSON object)."""
    import json
    import sys
    import time
    ds, _ = _training_data(s.path)
    vocab = ds.info.get("input_vocab")
    if vocab is None or "x" not in ds.train:
        raise DlcError(f"`{s.name}` takes a prompt, but {s.path.name} trains on no token vocabulary to read it with")
    prompt = "\n" if args.prompt is None else args.prompt
    unknown = sorted({c for c in prompt if c not in vocab})
    if unknown:
        raise DlcError(f"the prompt has characters the model never saw: {''.join(unknown)!r}")
    context = ds.train["x"].shape[1]
    n = args.n or 300
    ids = [vocab.index(c) for c in prompt]
    s(1, args.seed, prompt=np.array([ids[-1:]]))          # compile (or load) the kernels first
    t0 = time.perf_counter()
    new = generate_text(s, ids, n, context, args.seed)
    seconds = time.perf_counter() - t0
    text = "".join(vocab[t] for t in new)
    if args.attention:
        maps, window = attention_maps(s.path, args.load, ids + new, args.dtype, not args.no_fuse)
        draw_attention(maps, [vocab[t] for t in window], args.attention)
        print(f"dlc: attention of {len(maps)} layers on the last {len(window)} characters -> {args.attention}",
              file=sys.stderr)
    if args.npz:
        np.savez(args.npz, samples=np.array(new, np.int32))
    if args.json:
        print(json.dumps({"program": s.name, "prompt": prompt, "text": text, "tokens": n, "seed": args.seed,
                          "temperature": args.temperature or 0.0, "top_k": args.top_k or 0,
                          "seconds": round(seconds, 4), "tokens_per_s": round(n / seconds, 1)}))
    else:
        print(prompt + text)
    return 0


def run_cli(args) -> int:
    """`dlc sample FILE --load CK [-n N] [--seed S] [--out grid.png] [--npz samples.npz]`;
    for a text program `[--prompt TEXT] [--temperature T] [--top-k K] [--attention PNG] [--json]`."""
    import sys
    check_outputs(args)
    options = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k)) if v is not None}
    s = Sampler(args.file, args.program, args.dtype, fuse=not args.no_fuse, options=options)
    s.load(args.load)
    if "prompt" in s.input_names:
        if args.out is not None:
            raise DlcError(f"--out draws image samples; `{s.name}` writes text (printed; --npz keeps its token ids)")
        return _text_cli(s, args)
    if args.json:
        raise DlcError(f"--json is for text programs; `{s.name}` draws images (--out PNG, --npz for the arrays)")
    if args.prompt is not None or args.attention:
        raise DlcError(f"--prompt and --attention are for text programs; `{s.name}` takes no prompt")
    if s.input_names:
        raise DlcError(f"`{s.name}` has inputs `dlc sample` cannot give: {', '.join(s.input_names)}")
    args.n = args.n or 16
    x = s(args.n, args.seed)
    if args.npz:
        np.savez(args.npz, samples=x)
    if x.dtype.kind in "iu":
        for line in as_text(s.path, x):
            print(line)
        return 0
    out = args.out or "samples.png"
    try:
        images = as_images(x)
    except DlcError as e:                   # point at the program that returned them
        fn = s.lowerer.generators[s.name]
        e.loc = next((st.values[0].loc for st in fn.body if type(st).__name__ == "Return"), fn.loc)
        raise
    write_grid(images, out)
    print(f"dlc: {args.n} samples of `{s.name}` {list(x.shape[1:])} -> {out}", file=sys.stderr)
    return 0


def check_outputs(args) -> None:
    """The files `dlc sample` writes, checked before the program compiles."""
    if args.out is not None:
        outputs.check_output(args.out, "--out", outputs.IMAGE_FORMATS, "image samples are drawn to", fold_case=True)
    if args.attention is not None:
        outputs.check_output(args.attention, "--attention", outputs.PLOT_FORMATS, "attention is drawn to",
                             fold_case=True)
    if args.npz is not None:
        outputs.check_output(args.npz, "--npz", (".npz",), "raw samples are written to")


def check_generators(module, dtype: str = "f32") -> list[str]:
    """Lower each sampling program of a file (for `dlc check`): one line per program, its result type."""
    from compiler.driver import Lowerer
    from compiler.driver import fmt_type
    lines = []
    for name in Lowerer(module, dtype, training=False).generators:
        lw = Lowerer(module, dtype, training=False)
        g = lw.lower_generate(name).graph
        out = g.outputs["output"]
        lines.append(f"generate {name}: {fmt_type(g.dtype(out), g.shape(out))}")
    return lines
