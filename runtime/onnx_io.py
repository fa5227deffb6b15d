"""`dlc export` and `dlc import`: a `.dl` model with its weights to and from ONNX.

    export_file("examples/mlp.dl", "mlp.safetensors", "mlp.onnx")
    import_file("mlp.onnx", "mlp_imported.dl")       # + mlp_imported.safetensors

Export writes the evaluation program (dropout off, batch norm on running statistics) of the
file's model: its outputs (`output`, and `output2` where a model returns two), not the loss.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from compiler.driver import DTYPES, Lowerer, optimize_eval
from dsl.diagnostics import DlcError
from dsl.parser import parse_file

from . import checkpoint, data
from .initializers import initialize

OUTPUTS = ("output", "output2")


def eval_program(path: str | Path, dtype: str = "f32"):
    """The evaluation program of the file's model, its outputs only, after the autodiff-free
    passes (simplify, cse, dce): (program, graph)."""
    path = Path(path)
    module = parse_file(path)
    lw = Lowerer(module, dtype, training=False)
    if lw.trains:
        train = lw.trains[0]
        ds = data.load(train.data, path.parent, 0, dtype)
        prog = lw.lower_train(train, ds.fields())
    elif lw.models:
        prog = lw.lower_model(next(iter(lw.models)))
    else:
        raise DlcError("this file defines no model", module.loc)
    g = prog.graph.copy()
    g.outputs = {k: v for k, v in g.outputs.items() if k in OUTPUTS}
    g.updates = {}
    return prog, optimize_eval(g, fuse=False, stop_after="dce")


def weights_of(prog, load: str | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Parameters and model state: from a checkpoint (every one there, with the model's shape),
    or without one the seeded initial values `dlc run` starts from."""
    infos = {**prog.params, **prog.states}
    if load is None:
        rng = np.random.default_rng(seed)
        return {k: initialize(i.init, i.shape, DTYPES[i.dtype], rng, i.loc) for k, i in infos.items()}
    params, state, _ = checkpoint.load(load)
    saved = {**params, **{k: v for k, v in state.items() if k in prog.states}}
    for k in sorted(set(infos) - set(saved)):
        raise DlcError(f"{load}: checkpoint lacks `{k}`")
    for k in sorted(set(params) - set(prog.params)):
        raise DlcError(f"{load}: checkpoint has parameter `{k}`, which this model does not")
    for k, i in infos.items():
        checkpoint.check_tensor(load, "tensor", k, saved[k], np.zeros(i.shape, DTYPES[i.dtype]))
    return saved


def export_file(path: str | Path, load: str | None, out: str | Path, dtype: str = "f32"):
    """Write the ONNX model; returns it (checked by `onnx.checker`)."""
    from compiler.driver import require_onnx, to_onnx
    require_onnx()
    import onnx
    prog, g = eval_program(path, dtype)
    model = to_onnx(g, weights_of(prog, load), name=prog.model)
    try:
        onnx.save(model, str(out))
    except OSError as e:
        raise DlcError(f"cannot write {out}: {e.strerror or e}") from None
    return model


def run_cli(args) -> int:
    """`dlc export` and `dlc import`."""
    import sys
    if args.cmd == "export":
        model = export_file(args.file, args.load, args.output, args.dtype)
        noise = [i.name for i in model.graph.input if i.name.startswith("noise_")]
        print(f"dlc: wrote {args.output}: {len(model.graph.node)} ONNX nodes, inputs "
              + ", ".join(i.name for i in model.graph.input) + "; outputs "
              + ", ".join(o.name for o in model.graph.output), file=sys.stderr)
        if noise:
            print(f"dlc: the model's random draws are inputs ({', '.join(noise)}): feed them noise",
                  file=sys.stderr)
        return 0
    dl, ck = import_file(args.file, args.output, args.train)
    print(f"dlc: wrote {dl} and {ck}", file=sys.stderr)
    return 0


def import_file(src: str | Path, out: str | Path, train: str | None = None) -> tuple[Path, Path]:
    """Write OUT.dl (the model, named after the file) and OUT.safetensors (its weights)."""
    from compiler.driver import from_onnx, require_onnx
    require_onnx()
    import onnx
    out = Path(out)
    if out.suffix != ".dl":
        raise DlcError(f"-o {out}: the result is a .dl file")
    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise DlcError(f"cannot read {src} as an ONNX model: {e}") from None
    name = re.sub(r"\W", "_", out.stem)
    name = name if name[:1].isalpha() else f"m_{name}"
    imp = from_onnx(model, name)
    text = imp.source
    if train is not None:
        text += "\n" + train_block(train, name)
    ck = out.with_suffix(".safetensors")
    # no optimizer state: `dlc run --load` starts the optimizer afresh (fine-tuning)
    checkpoint.save(ck, imp.params, imp.state, {"model": name, "imported_from": str(src), "step": 0, "epoch": 0,
                                                "phases": {"": {"optimizer": "none", "step": 0}}})
    out.write_text(text)
    return out, ck


def train_block(path: str | Path, model: str) -> str:
    """The first `train` block of another file, its model renamed: data, loss and settings for
    an imported model (which must take the same inputs)."""
    lw = Lowerer(parse_file(path), "f32")
    if not lw.trains:
        raise DlcError(f"--train {path}: the file has no `train` block")
    t = lw.trains[0]
    lines = Path(path).read_text().splitlines()[t.loc.line - 1:t.loc.end_line]
    return re.sub(rf"\b{re.escape(t.model)}\b", model, "\n".join(lines)) + "\n"
