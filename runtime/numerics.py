"""Numerical faults: name the first op and `.dl` line that made a NaN or an infinity, and tell
a diverging run (a rising loss, a huge update) from a model that computes NaN by itself.

The session keeps a copy of the parameters and state from before each step while watching
(the first WATCH_STEPS steps, or every step with `--check-numerics`). When a step goes wrong,
that step is replayed, unfused, with every op's NumPy reference (`compiler.ops.evaluate`),
and the first node whose inputs are finite but whose output is not is the culprit.
"""
from __future__ import annotations

import numpy as np

from compiler.driver import DTYPES, OPS, evaluate, optimize_phase
from dsl.diagnostics import DlcError

WATCH_STEPS = 50          # steps watched by default: where a model's own NaNs show up
DIVERGED = 1e6            # a loss this many times its first value (and above 1) has diverged
HUGE_UPDATE = 1e4         # one step moving a parameter this many times its largest value


def _finite(v) -> bool:
    return not (isinstance(v, np.ndarray) and v.dtype.kind == "f") or bool(np.isfinite(v).all())


def first_nonfinite(session, phase: int, params: dict, state: dict, batch: dict, scalars: dict):
    """Replay one training step with the NumPy references on the unfused graph; return
    (node, graph) of the first op whose finite inputs gave a non-finite output, or None."""
    prog, ph = session.program, session.phases[phase]
    g = optimize_phase(prog, ph, fuse=False, stop_after="optimizer")
    feeds = {}
    for n in g.inputs:
        name, kind = g[n]["name"], g.attrs(n)["kind"]
        src = {"data": batch, "param": params, "state": state}.get(kind, scalars)
        v = src[name]
        feeds[n] = np.asarray(v) if kind != "scalar" else np.asarray(v, dtype=DTYPES[g.dtype(n)])
    with np.errstate(all="ignore"):
        vals = evaluate(g, feeds)
    for n in g.topo():
        if n in feeds or n not in vals:
            continue
        if not _finite(vals[n]) and all(_finite(vals[a]) for a in g.args(n)):
            if not g.args(n) and not np.isnan(vals[n]).any():
                continue                # an infinity written as such: a mask's -inf (where(mask, s, -inf))
            return n, g, vals[n]
    return None


def _where(g, n) -> tuple[str, object]:
    d = g[n]
    op = OPS[d["op"]].user_name
    role = {"grad": "the backward pass (its gradient)", "update": "the optimizer's update"}.get(
        d.get("role"), "the forward pass")
    return f"`{op}` in {role}", d.get("loc")


def explain_nonfinite(session, phase: int, loss: float, step: int, epoch: int, snapshot, batch, scalars,
                      history: list[float]) -> DlcError:
    """The error for a non-finite loss at `step`."""
    ph = session.phases[phase]
    which = f" of phase `{ph.name}`" if ph.name else ""
    opt_loc = ph.setting_locs.get("optimizer") or session.program.setting_locs.get("optimizer")
    rising = len(history) >= 2 and max(history[-3:]) > 10 * max(min(history), 1e-12)
    culprit = None
    if snapshot is not None:
        params, state = snapshot
        culprit = first_nonfinite(session, phase, params, state, batch, scalars)
    notes = []
    if culprit is not None:
        what, loc = _where(culprit[1], culprit[0])
        notes.append(f"the first NaN or infinity came from {what}" + (f" at {loc}" if loc else ""))
    if rising or (culprit is None and step > 1):
        if history:
            notes.append(f"the loss went from {min(history):.4g} to {history[-1]:.4g} before")
        return DlcError(f"training diverged: the loss{which} became {loss} at epoch {epoch}, step {step}; "
                        "try a smaller learning rate", opt_loc, notes)
    if culprit is not None:
        what, loc = _where(culprit[1], culprit[0])
        kind = "NaN" if np.isnan(culprit[2]).any() else "an infinity"
        then = (f"the loss{which} became {loss}" if not np.isfinite(loss) else
                f"the loss{which} was still {loss:.4g}, the updated parameters were not finite")
        return DlcError(f"the model computes {kind}: {what} made it from finite inputs at step {step}",
                        loc or opt_loc, [f"{then}; this is the model's arithmetic, not the learning rate"])
    return DlcError(f"the loss{which} became {loss} at epoch {epoch}, step {step}", opt_loc, notes)


def check_loss(session, phase: int, loss: float, step: int, history: list[float]) -> None:
    """A finite loss far above where it started is divergence, not training."""
    if len(history) > 1 and loss > DIVERGED * max(history[0], 1.0):
        ph = session.phases[phase]
        which = f" of phase `{ph.name}`" if ph.name else ""
        raise DlcError(f"training diverged: the loss{which} rose from {history[0]:.4g} to {loss:.4g} "
                       f"by step {step}; try a smaller learning rate",
                       ph.setting_locs.get("optimizer") or session.program.setting_locs.get("optimizer"))


def check_update(session, phase: int, before: dict, step: int) -> None:
    """One step moving a parameter by HUGE_UPDATE times its own scale is a learning rate far
    too large (Adam's steps are about lr, whatever the gradient)."""
    for name, old in before.items():
        new = session.params[name]
        scale = max(float(np.abs(old).max(initial=0.0)), 1e-3)
        with np.errstate(all="ignore"):
            moved = float(np.abs(new - old).max(initial=0.0))
        if np.isfinite(moved) and moved > HUGE_UPDATE * scale:
            ph = session.phases[phase]
            raise DlcError(f"training diverged: step {step} moved parameter `{name}` by {moved:.3g}, "
                           f"{moved / scale:.3g} times its largest value; try a smaller learning rate",
                           ph.setting_locs.get("optimizer") or session.program.setting_locs.get("optimizer"),
                           [f"the learning rate is {ph.optimizer.lr:g}"] if hasattr(ph.optimizer, "lr") else [])
