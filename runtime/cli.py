"""The `dlc` command: run, check and inspect `.dl` programs.

A user's mistake prints one located message and exits with status 2; anything else is a bug
in dlc: "internal error, please report" and status 3. `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from compiler.driver import PASS_NAMES
from dsl.diagnostics import DlcError
from runtime import distributed

STAGES = ["ast", "summary", "lowered", *PASS_NAMES, "source"]    # `dlc ir --stage`: the passes' names
ALIASES = {"grad": "autodiff", "backward": "autodiff", "train": "optimizer", "opt": "dce", "optimized": "dce",
           "fused": "fusion", "kernels": "fusion", "numba": "source", "code": "source"}


NO_GRAPHVIZ = "dlc: Graphviz's `dot` is not installed: the page shows the listing only"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"dlc: error: {message}", file=sys.stderr)
        sys.exit(2)


def _number(kind, allow_zero=False, below=None):
    def conv(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
        if v < 0 or (v == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'non-negative' if allow_zero else 'positive'}, got {s}")
        if below is not None and v >= below:
            raise argparse.ArgumentTypeError(f"must be below {below:,}, got {s}")
        return v
    return conv


def _positive(kind):
    return _number(kind)


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dlc", description="dlc: a declarative deep-learning compiler (.dl -> Numba kernels)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def common(sp):
        sp.add_argument("file", help="a .dl file")
        sp.add_argument("--dtype", choices=["f32", "f64"], default="f32", help="float precision (default f32)")
        sp.add_argument("--no-fuse", action="store_true", help="one kernel per op (for debugging)")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")

    r = sub.add_parser("run", help="compile, train and evaluate a model")
    common(r)
    r.add_argument("--epochs", type=_number(int, allow_zero=True), help="override the file's epochs (0: evaluate only)")
    r.add_argument("--batch", type=_positive(int), help="override the file's batch size")
    r.add_argument("--lr", type=_positive(float), help="override the optimizer's learning rate")
    r.add_argument("--seed", type=_number(int, allow_zero=True, below=2 ** 32), help="seed for the split, initialization and shuffling")
    r.add_argument("--save", metavar="PATH", help="save parameters and optimizer state (.safetensors or .npz)")
    r.add_argument("--load", "--resume", dest="load", metavar="PATH",
                   help="start from a checkpoint: parameters, optimizer state, step, epoch and data order "
                        "(a resumed run continues exactly as if never stopped)")
    r.add_argument("--check-numerics", action="store_true",
                   help="check every step (not only the first 50) for NaN, infinities and divergence, "
                        "naming the op and line that made them")
    r.add_argument("--json", action="store_true", help="print the final report as JSON on the last line")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.add_argument("--threads", type=_positive(int), help="use at most N cores (default: all; dlc decides how "
                   "its programs use them, runtime/threads.py)")
    from compiler.driver import SCHEDULES
    r.add_argument("--schedule", choices=list(SCHEDULES), help="every phase's learning-rate schedule")
    r.add_argument("--warmup", type=_number(float, allow_zero=True), metavar="EPOCHS",
                   help="linear learning-rate warm-up over this many epochs")
    r.add_argument("--clip-norm", type=_number(float, allow_zero=True), metavar="X",
                   help="clip the gradients' global L2 norm to X (0: off)")
    r.add_argument("--patience", type=_number(int, allow_zero=True), metavar="N",
                   help="early stopping: stop after N epochs without a better validation metric (needs `val = ...`)")
    r.add_argument("--monitor", metavar="METRIC", help="the validation metric early stopping and --save-best watch "
                   "(default: the loss)")
    r.add_argument("--save-best", metavar="PATH", help="checkpoint the best epoch by the monitored validation metric; "
                   "the test report is that epoch's")
    r.add_argument("--log", metavar="PATH", help="write one JSON line per epoch (run.jsonl)")
    r.add_argument("--plot", metavar="PNG", help="draw the train and validation curves (matplotlib)")
    r.add_argument("--target", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where to run: cpu (default), cuda (numba.cuda), auto (cuda when a GPU is available)")
    r.add_argument("--clip-value", type=_number(float, allow_zero=True), metavar="X",
                   help="clip each gradient to [-X, X] (0: off)")

    pr = sub.add_parser("predict", help="run a trained model on inputs and print its decoded output")
    common(pr)
    pr.add_argument("--load", metavar="PATH", required=True, help="the checkpoint to run (from `dlc run --save`)")
    pr.add_argument("--input", action="append", default=[], metavar="TEXT",
                    help='an input sequence as space-separated tokens, e.g. "3 1 4 1 5" (repeatable)')
    pr.add_argument("--index", action="append", type=int, default=[], metavar="K",
                    help="a held-out example by index (repeatable; default: the first 5)")
    pr.add_argument("--temperature", type=_number(float, allow_zero=True), default=0.0,
                    help="decoders sample from softmax(logits / T) instead of taking the argmax (default 0: greedy)")
    pr.add_argument("--seed", type=_number(int, allow_zero=True, below=2 ** 32), default=0, help="seed for sampling")
    pr.add_argument("--json", action="store_true", help="print the predictions as one JSON object")
    pr.add_argument("--input-file", metavar="PATH", help="feature vectors, one example per row (.csv or .npz), "
                    "encoded and standardized as the training data was")
    pr.add_argument("--output", metavar="PATH", help="also write the predictions (.csv or .npz)")
    pr.add_argument("--top", type=_positive(int), metavar="K", help="a classifier's K most probable classes")
    pr.add_argument("--raw", action="store_true", help="also show the model's raw outputs (logits, values)")

    sa = sub.add_parser("sample", help="run the file's sampling program (`generate`) on a trained checkpoint")
    common(sa)
    sa.add_argument("--load", metavar="PATH", required=True, help="the checkpoint (from `dlc run --save`)")
    sa.add_argument("-n", "--tokens", dest="n", type=_positive(int),
                    help="how many samples (default 16), or new characters of text (300)")
    sa.add_argument("--seed", type=_number(int, allow_zero=True, below=2 ** 32), default=0, help="seed of the random draws")
    sa.add_argument("--out", metavar="PNG", help="write image samples as a grid (default samples.png)")
    sa.add_argument("--npz", metavar="PATH", help="also save the raw samples (array `samples`)")
    sa.add_argument("--program", help="which `generate` block (default: the first)")
    sa.add_argument("--prompt", metavar="TEXT", help="text programs: the text to continue (default a newline)")
    sa.add_argument("--temperature", type=_number(float, allow_zero=True),
                    help="the program's `temperature` option: 0 greedy, T > 0 samples softmax(logits / T)")
    sa.add_argument("--top-k", type=_number(int, allow_zero=True), help="the program's `top_k` option: "
                    "draw among the K most likely tokens only (0: all)")
    sa.add_argument("--attention", metavar="PNG", help="text programs: draw each layer's and head's attention "
                    "on the prompt and the text")
    sa.add_argument("--json", action="store_true", help="text programs: print the text, tokens/s and settings as JSON")

    ex = sub.add_parser("export", help="write the evaluation program with its weights as an ONNX model")
    common(ex)
    ex.add_argument("--load", metavar="PATH", help="the checkpoint (default: the seeded initial weights)")
    ex.add_argument("-o", "--output", metavar="ONNX", required=True, help="the .onnx file to write")

    im = sub.add_parser("import", help="turn an ONNX model into a .dl file and a checkpoint")
    im.add_argument("file", help="an .onnx file")
    im.add_argument("-o", "--output", metavar="DL", required=True,
                    help="the .dl file to write (its weights go beside it, in NAME.safetensors)")
    im.add_argument("--train", metavar="DL", help="copy this file's `train` block into the result, "
                    "so `dlc run` and `dlc predict` work on it")
    im.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")

    c = sub.add_parser("check", help="parse and type/shape-check a file")
    common(c)

    i = sub.add_parser("ir", help="print the IR at a stage")
    common(i)
    i.add_argument("--stage", default="lowered", help=f"one of: {', '.join(STAGES)}, or all (with --format html -o DIR; aliases: "
                   + ", ".join(f"{k}={v}" for k, v in ALIASES.items()) + ")")
    i.add_argument("--program", default="train",
                   help="train: the training step (default), eval: the evaluation program, or the name of a "
                        "`generate` block (a sampling program)")
    i.add_argument("--phase", help="which phase's training step (default: the first)")
    i.add_argument("--format", choices=["text", "dot", "svg", "png", "html"], default="text",
                   help="dot: Graphviz text; svg, png: rendered by Graphviz's `dot`; html: one self-contained page")
    i.add_argument("--target", choices=["cpu", "cuda", "auto"], default="cpu", help="the kernels of --stage source")
    i.add_argument("-o", "--output", help="write to a file instead of standard output")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except DlcError as e:
        if args.debug:
            raise
        if distributed.launched():      # one message, and no rank left waiting for the others
            return distributed.fail(2, e.render())
        print(e.render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if args.debug:
            raise
        hint = {"sample": "a smaller -n", "predict": "fewer inputs"}.get(getattr(args, "cmd", None), "a smaller --batch")
        print(f"error: out of memory ({hint} or model may fit)", file=sys.stderr)
        return 2
    except Exception as e:          # a bug in dlc, never the user's: the one other exit
        if args.debug:
            raise
        msg = f"dlc: internal error, please report: {type(e).__name__}: {e}\n  (run with --debug for the traceback)"
        if distributed.launched():
            return distributed.fail(3, msg)
        print(msg, file=sys.stderr)
        return 3


def _dispatch(args) -> int:
    from runtime.session import Options
    if not args.file.endswith(".dl") and not Path(args.file).exists():
        raise DlcError(f"no such file: {args.file}")
    if args.cmd in ("export", "import"):
        from runtime import onnx_io
        return onnx_io.run_cli(args)
    if args.cmd == "run":
        return _run(args, Options(dtype=args.dtype, fuse=not args.no_fuse, epochs=args.epochs,
                                  batch=args.batch, lr=args.lr, seed=args.seed, threads=args.threads,
                                  schedule=args.schedule, warmup=args.warmup, clip_norm=args.clip_norm,
                                  clip_value=args.clip_value, patience=args.patience, monitor=args.monitor,
                                  save_best=args.save_best, log_path=args.log,
                                  check_numerics=args.check_numerics, target=args.target, eval_beside=True))
    if args.cmd == "check":
        return _check(args)
    if args.cmd == "predict":
        return _predict(args)
    if args.cmd == "sample":
        from runtime.sample import run_cli
        return run_cli(args)
    return _ir(args)


def _predict(args) -> int:
    from runtime.predict import run_cli
    return run_cli(args)


def _run(args, options) -> int:
    from runtime import checkpoint
    from runtime.session import Session
    lead = distributed.env_rank() == 0      # under mpiexec, rank 0 reports and writes files
    if lead:                        # the files it writes: before compiling and training, not after
        from runtime.outputs import PLOT_FORMATS, check_output
        if args.save:
            checkpoint.check_target(args.save)
        if args.save_best:
            checkpoint.check_target(args.save_best, "--save-best")
        if args.log:
            check_output(args.log, "--log")
        if args.plot:
            check_output(args.plot, "--plot", PLOT_FORMATS, "the curves are drawn to", fold_case=True)
    s = Session(args.file, options)
    progress = not args.quiet and lead
    if progress:
        hit = "reused cached kernels" if s.cache_hit else "compiled"
        if s.eval_compiling():
            hit = "compiled the training step" + ("" if len(s.phases) == 1 else "s")
        print(f"dlc: {s.program.model}: {_plural(len(s.params), 'parameter tensor')} "
              f"({_plural(sum(p.size for p in s.params.values()), 'value')}), {_plural(s.kernels, 'kernel')} in "
              f"{'the step' if len(s.phases) == 1 else f'the steps of {len(s.phases)} phases'}; "
              f"{hit} in {s.compile_seconds:.2f}s" +
              ("; the evaluation program compiles beside training" if s.eval_compiling() else ""), file=sys.stderr)
    if args.load:
        s.load(args.load)
        for note in s.load_notes if lead else ():
            print(f"dlc: note: {note}", file=sys.stderr)
    report = s.fit(progress=progress)
    if args.plot and lead and not report["history"]:
        print(f"dlc: --plot {args.plot}: no epoch ran, nothing to plot", file=sys.stderr)
    elif args.plot and lead:
        from runtime.history import plot
        plot(report["history"], args.plot, f"{Path(args.file).name}: {s.program.model}")
        if progress:
            print(f"dlc: plotted {args.plot}", file=sys.stderr)
    if args.save:
        s.save(args.save)
        if progress:
            print(f"dlc: saved {args.save}", file=sys.stderr)
    if not lead:
        return 0
    if args.json:
        print(json.dumps(report))
    else:
        from runtime.metrics import report_text
        sys.stdout.write(report_text(report["test_report"]))       # the test split's details, then its line
        t = report["test"]
        line = "test: " + "  ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in t.items()) \
            if t else "test: no held-out examples"
        step = f", {report['step_ms']} ms/step" if report["step_ms"] is not None else ""
        print(line + f"  (train {report['train_seconds']:.1f}s, compile {report['compile_seconds']:.1f}s{step})")
    return 0


def _load_for_inspection(args, training: bool = True):
    from compiler.driver import Lowerer, index_reads
    from dsl.parser import parse_file
    from runtime import data
    module = parse_file(args.file)
    lw = Lowerer(module, args.dtype, training=training)
    if lw.trains:
        train = lw.trains[0]
        ds = data.load(train.data, Path(args.file).parent, 0)
        prog = lw.lower_train(train, ds.fields())
        reads = index_reads(prog.graph)
        for split in (ds.train, ds.test):
            data.check_indices(reads, split, data.describe(train.data), train.data.loc)
        return module, lw, prog
    if not lw.models:
        raise DlcError("this file defines no model", module.loc)
    return module, lw, lw.lower_model(next(iter(lw.models)))


def _check(args) -> int:
    from runtime import resources
    from runtime.sample import check_generators
    module, lw, prog = _load_for_inspection(args)
    settings, locs = getattr(prog, "settings", {}), getattr(prog, "setting_locs", {})
    resources.check_program(prog, int(settings.get("batch", 32)),
                            locs.get("batch") or (lw.trains[0].loc if lw.trains else None), training=bool(lw.trains))
    if lw.trains:           # and the evaluation program, whose branches (greedy decoders) differ
        _load_for_inspection(args, training=False)
    generators = check_generators(module, args.dtype)     # sampling programs: checked before "ok"
    n = sum(_size(info.shape) for info in prog.params.values())
    print(f"{args.file}: ok — model `{prog.model}`, {_plural(len(prog.params), 'parameter tensor')} "
          f"({_plural(n, 'value')})")
    sys.stdout.write(summary(lw, prog))
    for ph in prog.phases if prog.phases and prog.phases[0].name else ():
        sched = f"{ph.steps} step{'s' * (ph.steps != 1)}" + (f" every {ph.every} rounds" if ph.every > 1 else "")
        print(f"phase {ph.name}: {len(ph.params)} parameter tensors, {ph.optimizer}, {sched}")
    for line in generators:
        print(line)
    return 0


def summary(lw, prog) -> str:
    """A Keras-style table: each layer the model calls, its output shape and parameter count."""
    rows = [("layer", "output shape", "params")]
    for scope, fn, shape, nparams, nstate in lw.layers:
        name = scope if scope == fn else f"{scope.split('/')[-1]} ({fn})"
        rows.append((name, "[" + ", ".join(map(str, shape)) + "]",
                     f"{nparams:,}" + (f" (+{nstate:,} state)" if nstate else "")))
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(len(r[1]) for r in rows) + 2
    out = [f"{r[0]:<{w0}}{r[1]:<{w1}}{r[2]:>10}" for r in rows]
    out.insert(1, "-" * len(out[0]))
    total = sum(_size(i.shape) for i in prog.params.values())
    state = sum(_size(i.shape) for i in prog.states.values())
    out.append("-" * len(out[0]))
    out.append(f"total parameters: {total:,}" + (f"  (state: {state:,} values)" if state else ""))
    out.append("parameters:")
    for name, info in prog.params.items():
        out.append(f"  {name:<32} {info.dtype}[{', '.join(map(str, info.shape))}]  init={info.init}")
    return "\n".join(out) + "\n"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def _size(shape):
    return math.prod(shape)


def _phase(prog, name):
    if name is None:
        return prog.phases[0]
    for ph in prog.phases:
        if ph.name == name:
            return ph
    names = ", ".join(ph.name for ph in prog.phases if ph.name)
    raise DlcError(f"--phase {name}: no such phase; " + (f"phases: {names}" if names else "this train block has no phases"))


def _ir_pages(args) -> int:
    """`--stage all --format html -o DIR`: one self-contained page per stage, linked in order."""
    import copy
    if args.format != "html" or not args.output:
        raise DlcError("--stage all writes one HTML page per stage: give --format html -o DIR")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise DlcError(f"-o {args.output}: not a directory")
    out.mkdir(parents=True, exist_ok=True)
    import shutil
    if not shutil.which("dot"):
        print(NO_GRAPHVIZ.replace("the page shows", "the pages show"), file=sys.stderr)
    stages = ["lowered"] + [st for st in PASS_NAMES if args.program == "train" or st not in ("autodiff", "optimizer")]
    for st in stages:
        one = copy.copy(args)
        one.stage, one.output, one.pages = st, str(out / f"{st}.html"), stages
        _ir(one)
    print(f"dlc: wrote {len(stages)} pages to {out}/ ({', '.join(f'{st}.html' for st in stages)})", file=sys.stderr)
    return 0


def _ir(args) -> int:
    from compiler.driver import build, optimize_eval, optimize_phase, printer
    if args.stage == "all":
        return _ir_pages(args)
    stage = ALIASES.get(args.stage, args.stage)
    if stage not in STAGES:
        raise DlcError(f"unknown stage `{args.stage}`; stages: {', '.join(STAGES)}")
    if args.output:
        from runtime.outputs import check_output
        check_output(args.output, "-o")
    if args.program in ("train", "eval"):
        module, lw, prog = _load_for_inspection(args, training=args.program == "train")
    else:                                   # a sampling program
        from compiler.driver import Lowerer
        from dsl.parser import parse_file
        module = parse_file(args.file)
        lw = Lowerer(module, args.dtype, training=False)
        if args.program not in lw.generators:
            raise DlcError(f"--program {args.program}: not train, eval or a `generate` block of this file"
                           + (f" (its generate blocks: {', '.join(lw.generators)})" if lw.generators else ""))
        if args.phase is not None:
            raise DlcError("--phase picks a training step; a `generate` program has none")
        prog = lw.lower_generate(args.program)
    if args.phase is not None:      # a misspelt phase is an error at every stage, not only where a step is shown
        if not lw.trains:
            raise DlcError(f"--phase {args.phase}: no such phase; this file has no train block")
        _phase(prog, args.phase)
    if stage == "ast":
        text = module.dump() + "\n"
    elif stage == "summary":
        text = summary(lw, prog)
    else:
        g = prog.graph
        kind = "train" if (args.program == "train" and lw.trains) else "eval"
        if stage != "lowered":
            if kind == "eval" and stage in ("autodiff", "optimizer"):
                what = "the evaluation program" if args.program in ("train", "eval") else f"`{args.program}`"
                raise DlcError(f"{what} has no `{stage}` stage")
            stop = None if stage == "source" else stage
            g = (optimize_phase(prog, _phase(prog, args.phase), not args.no_fuse, stop) if kind == "train"
                 else optimize_eval(g, not args.no_fuse, stop))
        if stage == "source":
            text = build(g, args.target).source
        elif args.format == "dot":
            text = printer.to_dot(g, stage)
        elif args.format in printer.FORMATS:
            if args.format == "png" and not args.output:
                raise DlcError("--format png writes an image: give -o graph.png")
            picture = printer.render(printer.to_dot(g, stage), args.format)
            if args.output:
                Path(args.output).write_bytes(picture)
                return 0
            text = picture.decode()
        elif args.format == "html":
            import shutil
            svg = printer.render(printer.to_dot(g, stage), "svg").decode() if shutil.which("dot") else None
            if svg is None and not getattr(args, "pages", None):      # --stage all says it once
                print(NO_GRAPHVIZ, file=sys.stderr)
            text = printer.to_html(g, stage, svg, getattr(args, "pages", None))
        else:
            batch = prog.settings.get("batch", 32) if lw.trains else 32
            text = printer.to_text(g, stage, prog.params, {"B": batch})
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
