"""Lowering a train block: its settings, its bindings and its training phases.

A train block's statements run in order in one frame: settings (`batch = 64`), bindings
(`fake = G(z)`, `logits, tokens = m(x)`) and `phase NAME { ... }` blocks, whose own settings
and bindings live in a child frame. Everything lowers into one graph, so every call of a model
uses the same parameters; each phase's loss becomes an output (`loss:NAME`), and
`Program.step_graph` cuts one phase's training step out of the graph. A block without phases
is the one-phase case: its `loss`, `params` and `optimizer` are that phase's.
"""
from __future__ import annotations

import dataclasses
import fnmatch

from dsl import ast as A
from dsl.diagnostics import DlcError, Loc

from .lower import Frame, Lowerer, Phase, Program, Tensor, _suggest
from .program import TaskInfo
from .optim import OPTIMIZERS, OptimizerSpec
from .shapes import FLOATS

TRAIN_SETTINGS = ("loss", "optimizer", "params", "batch", "epochs", "seed", "metrics", "patience", "monitor")
PHASE_SETTINGS = ("loss", "params", "optimizer", "steps", "every")


def lower_train_block(lw: Lowerer, train: A.TrainDef, fields: dict[str, tuple[str, tuple]]) -> Program:
    """Lower `train` with the lowerer `lw` (its definitions, graph and parameter tables).
    `fields` maps each data field to (dtype, per-example shape)."""
    if train.model not in lw.models:
        raise DlcError(f"unknown model `{train.model}`", train.model_loc or train.loc,
                       _suggest(train.model, lw.models) + [f"models: {', '.join(lw.models)}" if lw.models
                                                           else "this file declares no `model`"])
    lw.g.name = train.model
    frame = Frame({}, {}, "", "train", None)
    data = {}
    for fname, (dtype, tail) in fields.items():
        dt = lw.float_dtype if dtype in FLOATS else dtype
        n = lw.g.input(fname, ("B",) + tuple(tail), dt, "data", loc=train.data.loc)
        data[fname] = n
        frame.vars[fname] = Tensor(n)
    prog = Program(lw.g, lw.params, data, lw.states, model=train.model)
    lw.current_model = train.model
    bound: dict[str, Loc] = {}
    declared: list[tuple[A.Phase, dict, dict, dict]] = []
    for st in train.body:
        if isinstance(st, A.Phase):
            if st.name in {p.name for p, *_ in declared}:
                raise DlcError(f"phase `{st.name}` is declared twice", st.loc)
            inner = Frame(dict(frame.vars), {}, "", "train", None, counters=frame.counters)
            settings, locs = {}, {}
            outer_updates, lw.g.updates = lw.g.updates, {}
            try:
                _train_stmts(lw, st.body, inner, settings, locs, PHASE_SETTINGS, bound, "phase")
            finally:
                updates, lw.g.updates = lw.g.updates, outer_updates
            declared.append((st, settings, locs, updates))
        else:
            _train_stmts(lw, (st,), frame, prog.settings, prog.setting_locs, TRAIN_SETTINGS, bound, "train block")
    _check_bindings(train, bound)
    for k in ("loss", "params"):
        if declared and k in prog.settings:
            raise DlcError(f"with phases, each phase sets its own `{k}`", prog.setting_locs[k])
    if not declared:       # the block is its one phase
        if "loss" not in prog.settings:
            raise DlcError(f"train block for `{train.model}` sets no `loss`", train.loc)
        own = [k for k in ("loss", "params") if k in prog.settings]
        declared = [(A.Phase(train.loc, "", ()), {k: prog.settings[k] for k in own},
                     {k: prog.setting_locs[k] for k in own}, {})]
    default_opt = prog.settings.get("optimizer") or OptimizerSpec("sgd", 0.01)
    for st, settings, locs, updates in declared:
        if "loss" not in settings:
            raise DlcError(f"phase `{st.name}` sets no `loss`", st.loc)
        names = (_select_params(lw, settings["params"], locs["params"], st.name)
                 if "params" in settings else list(lw.params))
        phase = Phase(st.name, settings["loss"].node, names, settings.get("optimizer", default_opt),
                      settings.get("steps", 1), settings.get("every", 1), st.loc, locs, updates)
        if "params" in settings:
            _check_reached(lw, phase)
        prog.phases.append(phase)
        lw.g.outputs[phase.output] = phase.loss
    if not lw.model_outputs:
        raise DlcError(f"the loss never calls the model `{train.model}`",
                       prog.phases[0].setting_locs["loss"])
    lw._model_outputs()
    prog.task = _task(lw, prog)
    return prog


def _task(lw: Lowerer, prog: Program) -> TaskInfo:
    """The loss that trains the model's output: the first standard-library loss call whose
    prediction is computed from the model's first output (else the first such call), and its
    target. A target that is not a data field itself (`x / 16`, a binding) becomes the program's
    output "target", so that metrics compare with exactly what the loss does."""
    out = lw.model_outputs[0]

    def from_output(n: int) -> bool:
        seen, todo = set(), [n]
        while todo:
            m = todo.pop()
            if m == out:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(lw.g.args(m))
        return False

    calls = [(name, t) for name, p, t, g in lw.loss_calls
             if g is lw.g and isinstance(p, Tensor) and from_output(p.node)]
    calls = calls or [(name, t) for name, _, t, g in lw.loss_calls if g is lw.g]
    if not calls:
        return TaskInfo()
    name, target = calls[0]
    if not isinstance(target, Tensor) or not lw.g.shape(target.node) or lw.g.shape(target.node)[0] != "B":
        return TaskInfo(name)
    field = next((f for f, n in prog.data.items() if n == target.node), None)
    if field is not None:
        return TaskInfo(name, field)
    lw.g.outputs["target"] = target.node
    return TaskInfo(name, computed=True)


def _train_stmts(lw: Lowerer, stmts, frame: Frame, settings: dict, locs: dict, allowed: tuple, bound: dict, where: str):
    """Settings (`name = value` for a name in `allowed`) and bindings of a train block or phase."""
    for st in stmts:
        if isinstance(st, A.MultiAssign):
            lw.run_stmts((st,), frame)          # `logits, tokens = m(x)`
            continue
        if not isinstance(st, A.Assign):
            raise DlcError(f"a {where} holds settings (`name = value`), bindings"
                           + (" and `phase` blocks" if where == "train block" else ""), st.loc)
        if st.name not in allowed:
            if st.name in TRAIN_SETTINGS + PHASE_SETTINGS:
                raise DlcError(f"`{st.name}` is a setting of the "
                               f"{'train block' if where == 'phase' else 'phases'}, not of a {where}", st.loc)
            frame.vars[st.name] = lw.eval(st.value, frame)      # a binding: `fake = G(z)`
            bound[st.name] = st.loc
            continue
        if st.name in settings:
            raise DlcError(f"`{st.name}` is set twice (first at line {locs[st.name].line})", st.loc)
        val = lw._metrics(st.value) if st.name == "metrics" else lw.eval(st.value, frame)
        settings[st.name] = _check_setting(lw, st.name, val, st.value.loc)
        locs[st.name] = st.value.loc
        frame.vars[st.name] = val


def _check_setting(lw: Lowerer, name: str, val, loc: Loc):
    if name == "loss":
        if not isinstance(val, Tensor) or lw.g.shape(val.node) != () or lw.g.dtype(val.node) not in FLOATS:
            raise DlcError(f"the loss must be a float scalar, got {lw._describe(val)}", loc,
                           ["reduce it with mean(...) or sum(...)"])
    elif name == "optimizer" and not isinstance(val, OptimizerSpec):
        raise DlcError("optimizer must be one of " + ", ".join(OPTIMIZERS) + "(...)", loc)
    elif name == "monitor" and not isinstance(val, str):
        raise DlcError(f'`monitor` names a validation metric, e.g. "loss" or "accuracy", got {lw._describe(val)}', loc)
    elif name in ("batch", "epochs", "seed", "steps", "every", "patience"):
        low = 0 if name in ("seed", "patience") else 1
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise DlcError(f"`{name}` must be a {'non-negative' if low == 0 else 'positive'} integer, "
                           f"got {lw._describe(val)}", loc)
        if name == "seed" and val >= 2 ** 32:
            raise DlcError(f"`seed` must be below 2**32 (4294967296), got {val}", loc)
    elif name == "params":
        if isinstance(val, str):
            val = [val]
        if not (isinstance(val, list) and val and all(isinstance(v, str) and v for v in val)):
            raise DlcError('`params` is a list of parameter names, scopes or patterns, e.g. ["D/*"]', loc)
    return val


def _check_bindings(train: A.TrainDef, bound: dict):
    """A name bound in a train block and never used is most likely a misspelt setting."""
    used = set(_names_in(train.body))
    for name, loc in bound.items():
        if name not in used:
            raise DlcError(f"unknown train setting `{name}` (as a name bound here, it is never used)", loc,
                           _suggest(name, TRAIN_SETTINGS + PHASE_SETTINGS)
                           + [f"settings: {', '.join(TRAIN_SETTINGS)}; in a phase: {', '.join(PHASE_SETTINGS)}"])


def _select_params(lw: Lowerer, patterns: list, loc: Loc, phase: str) -> list[str]:
    """The parameters a phase trains: each pattern is a name, a scope (`D` is everything
    under `D/`) or a glob (`D/dense_*/W`)."""
    chosen = set()
    for pat in patterns:
        hits = {n for n in lw.params
                if fnmatch.fnmatchcase(n, pat) or n.startswith(pat.rstrip("/") + "/")}
        if not hits:
            scopes = sorted({n.split("/")[0] for n in lw.params})
            where = f"phase `{phase}`: " if phase else ""          # "": a train block without phases
            raise DlcError(f"{where}`params` pattern \"{pat}\" matches no parameter", loc,
                           _suggest(pat, scopes) + [f"top-level scopes: {', '.join(scopes) or 'none'}"])
        chosen |= hits
    return [n for n in lw.params if n in chosen]


def _check_reached(lw: Lowerer, phase: Phase):
    """Every parameter a phase selects must affect its loss other than through a stop_gradient."""
    seen, todo = set(), [phase.loss]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if lw.g.op(n) != "stop_gradient":
            todo.extend(lw.g.args(n))
    missed = [n for n in phase.params if lw.params[n].node not in seen]
    if missed:
        more = f" and {len(missed) - 3} more" if len(missed) > 3 else ""
        who = f"phase `{phase.name}` trains" if phase.name else "`params` selects"
        raise DlcError(f"{who} {', '.join(missed[:3])}{more}, but {'its' if phase.name else 'the'} loss does not "
                       "depend on them", phase.setting_locs["params"],
                       ["is a stop_gradient in the way, or does the loss not call that model?"])


def _names_in(node):
    """Every name an AST (or tuple of them) reads."""
    if isinstance(node, A.Name):
        yield node.name
    if isinstance(node, A.Node):
        for f in dataclasses.fields(node):
            yield from _names_in(getattr(node, f.name))
    elif isinstance(node, tuple):
        for x in node:
            yield from _names_in(x)
