"""Run the ONNX backend node tests through `dlc import` -> compile -> run, and write docs/onnx.md.

    python scripts/onnx_conformance.py                 # every case whose ops dlc imports
    python scripts/onnx_conformance.py --ops Relu,Gemm --no-write

The `onnx` wheel ships the cases (`onnx.backend.test.case.node.collect_testcases`): each is a
small model (one node, or an `_expanded` function body) with inputs and expected outputs. A
case runs when dlc's importer has an entry for each of its ops; it passes when every output
matches within the case's tolerances (rtol 1e-3, atol 1e-7 unless it says otherwise). Inputs
that dlc needs at compile time (a Reshape's shape, reduction axes: `STATIC_INPUTS`) are given
to the importer as constants. A refusal by the importer names what lies outside dlc's
semantics; everything else that fails is listed as a failure.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import tempfile
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler.api import compile_function          # noqa: E402
from compiler.onnx_import import IMPORTERS, STATIC_INPUTS, from_onnx   # noqa: E402
from dsl.diagnostics import DlcError               # noqa: E402

FOLDED = {"Constant", "Shape"}      # computed at import time


def cases(op: str | None = None):
    """The suite's node cases (of one op: quicker; the suite collects once per process)."""
    from onnx.backend.test.case.node import collect_testcases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases(op) if c.kind == "node"]


def case_ops(case) -> set[str]:
    return {n.op_type for n in case.model.graph.node}


def suite_op(case) -> str:
    """The op a case tests: its node's, or `NAME (expanded)` for a function body."""
    nodes = case.model.graph.node
    if len(nodes) == 1:
        return nodes[0].op_type
    return "(expanded function bodies)"


def run_case(case) -> tuple[str, str]:
    """("pass" | "refused" | "fail", reason)."""
    model = case.model
    g = model.graph
    inputs, expected = ([numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v) for v in vs]
                        for vs in case.data_sets[0])
    names = [i.name for i in g.input]
    feeds = dict(zip(names, inputs))
    constants = {}
    for n in g.node:
        for pos in STATIC_INPUTS.get(n.op_type, ()):
            if pos < len(n.input) and n.input[pos] in feeds:
                constants[n.input[pos]] = feeds.pop(n.input[pos])
    try:
        imp = from_onnx(model, "m", constants)
    except DlcError as e:                           # Unsupported: outside what dlc imports
        return "refused", e.message
    floats = {np.asarray(v).dtype for v in feeds.values() if np.asarray(v).dtype.kind == "f"}
    dtype = "f64" if np.dtype(np.float64) in floats else "f32"
    try:
        fn = compile_function(imp.source, "m", dtype=dtype, training=False, filename=f"{case.name}.dl")
    except DlcError as e:
        return "fail", "compile: " + _first_line(e)
    except Exception as e:                          # a bug in dlc
        return "fail", f"compile crashed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    args = {imp.inputs[k]: v for k, v in feeds.items()}
    args.update(imp.params)
    args.update(imp.state)
    try:
        res = fn(**args)
    except Exception as e:
        return "fail", f"run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    outs = [res["output" if k == 0 else f"output{k + 1}"] for k in range(len(g.output))]
    for o, got, want in zip(g.output, outs, expected):
        want = np.asarray(want)
        got = np.asarray(got)
        if got.shape != want.shape:
            return "fail", f"output `{o.name}` has shape {list(got.shape)}, expected {list(want.shape)}"
        rtol = getattr(case, "rtol", 1e-3)
        atol = getattr(case, "atol", 1e-7)
        if want.dtype == np.bool_ or want.dtype.kind in "iu":
            ok = np.array_equal(got.astype(want.dtype), want)
        else:
            ok = np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True)
        if not ok:
            err = np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))
            return "fail", f"output `{o.name}` differs (max abs error {err:.3g})"
    return "pass", ""



def run_isolated(chosen: list):
    """Each case's (case, status, reason), run in a forked process that goes on to the next
    case; a case that kills the process (an abort in LLVM) is a failure with the last line
    the process printed, and a new process takes the rest."""
    i = 0
    while i < len(chosen):
        r, w = os.pipe()
        err = tempfile.TemporaryFile(mode="w+")
        pid = os.fork()
        if pid == 0:                                            # the child
            os.close(r)
            os.dup2(err.fileno(), 2)
            with os.fdopen(w, "w") as out:
                for k in range(i, len(chosen)):
                    status, why = run_case(chosen[k])
                    out.write(json.dumps([k, status, why]) + "\n")
                    out.flush()
            os._exit(0)
        os.close(w)
        last = i - 1
        with os.fdopen(r) as inp:
            for line in inp:
                k, status, why = json.loads(line)
                last = k
                yield chosen[k], status, why
        _, code = os.waitpid(pid, 0)
        if last + 1 >= len(chosen):
            break
        err.seek(0)
        lines = [ln for ln in err.read().splitlines() if ln.strip() and "Warning" not in ln]
        how = f"signal {signal.Signals(os.WTERMSIG(code)).name}" if os.WIFSIGNALED(code) else f"exit {code >> 8}"
        yield chosen[last + 1], "fail", f"the process died ({how})" + (f": {lines[-1].strip()}" if lines else "")
        i = last + 2


def _first_line(e: DlcError) -> str:
    """A DlcError's message without the location and source excerpt."""
    return e.message.splitlines()[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", help="only the cases of these ops (comma-separated)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "onnx.md"), help="the report (default docs/onnx.md)")
    ap.add_argument("--no-write", action="store_true", help="print the summary only")
    args = ap.parse_args(argv)
    all_cases = cases()
    suite_ops = sorted({suite_op(c) for c in all_cases} - {"(expanded function bodies)"})
    supported = sorted(op for op in suite_ops if op in IMPORTERS)
    wanted = set(args.ops.split(",")) if args.ops else None
    results = collections.defaultdict(list)         # suite op -> [(case, status, reason)]
    t0 = time.perf_counter()
    chosen = [c for c in all_cases if (not wanted or suite_op(c) in wanted) and case_ops(c) <= set(IMPORTERS) | FOLDED]
    for c, status, why in run_isolated(chosen):
        results[suite_op(c)].append((c.name, status, why))
        print(f"{status:8} {c.name}" + (f": {why}" if why else ""), flush=True)
    seconds = time.perf_counter() - t0
    text = report(all_cases, suite_ops, supported, results, seconds)
    if not args.no_write and not wanted:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    print(text.split("\n## ")[0])
    return 0


def report(all_cases, suite_ops, supported, results, seconds) -> str:
    n_run = sum(len(v) for v in results.values())
    n_pass = sum(1 for v in results.values() for r in v if r[1] == "pass")
    n_refused = sum(1 for v in results.values() for r in v if r[1] == "refused")
    n_fail = n_run - n_pass - n_refused
    single = [c for c in all_cases if suite_op(c) in supported]
    lines = [
        "# dlc against the ONNX conformance suite",
        "",
        f"Generated by `python scripts/onnx_conformance.py` (onnx {onnx.__version__}, "
        f"{time.strftime('%Y-%m-%d')}, {seconds:.0f} s on this machine). Each case is imported "
        "(`dlc import`), compiled to Numba kernels and run; it passes when every output matches the "
        "expected one within the case's tolerances.",
        "",
        f"- The suite has **{len(all_cases)}** node cases over **{len(suite_ops)}** ops; dlc imports "
        f"**{len(supported)}** of those ops ({len(single)} of their one-node cases).",
        f"- Cases run (every op in them imported, `_expanded` function bodies included): **{n_run}**; "
        f"**{n_pass} pass**, {n_refused} are refused by the importer with a reason (outside dlc's "
        f"semantics: an attribute, dtype or mode dlc does not have), {n_fail} fail.",
        "",
        "## By op",
        "",
        "| op | cases | pass | refused | fail |",
        "|---|---|---|---|---|",
    ]
    for op in sorted(results):
        v = results[op]
        cnt = collections.Counter(r[1] for r in v)
        lines.append(f"| {op} | {len(v)} | {cnt['pass']} | {cnt['refused']} | {cnt['fail']} |")
    lines += ["", "## Failures", ""]
    fails = [(op, r) for op in sorted(results) for r in results[op] if r[1] == "fail"]
    lines += [f"- `{r[0]}` ({op}): {r[2]}" for op, r in fails] or ["None."]
    lines += ["", "## Refused by the importer (outside dlc's semantics)", ""]
    lines += [f"- `{r[0]}`: {r[2]}" for op in sorted(results) for r in results[op] if r[1] == "refused"] or ["None."]
    lines += ["", "## Ops of the suite dlc does not import", "",
              ", ".join(op for op in suite_ops if op not in IMPORTERS), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
