"""The training workflow of issue 12: learning-rate schedules, gradient clipping, and the
errors a user gets for the new layers and settings.

Schedules are checked against closed forms written here in NumPy and, when PyTorch is
installed, against torch.optim.lr_scheduler step by step. Clipping is checked by replaying a
compiled SGD step in NumPy.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from compiler.api import compile_function, compile_train_step
from compiler.optim import OptimizerSpec, SchedulePlan, ScheduleSpec, step_scalars
from runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent
PLAN = SchedulePlan(steps_per_epoch=10, total_steps=60)


def lrs(spec: OptimizerSpec, plan: SchedulePlan = PLAN) -> np.ndarray:
    return np.array([step_scalars(spec, t, plan)["lr"] for t in range(1, plan.total_steps + 1)])


# ---- schedules: closed forms -------------------------------------------------------------------
def test_no_schedule_is_the_constant_lr():
    assert np.all(lrs(OptimizerSpec("adam", 0.01)) == 0.01)


@pytest.mark.parametrize("options, expected", [
    (("step_decay", dict(every=2, gamma=0.5)), lambda t: 0.5 ** (t // 20)),
    (("exponential", dict(gamma=0.8)), lambda t: 0.8 ** (t // 10)),
    (("cosine", dict(final=0.1)), lambda t: 0.1 + 0.9 * (1 + np.cos(np.pi * t / 60)) / 2),
    (("cosine", dict(warmup=1)),
     lambda t: np.where(t < 10, (t + 1) / 10, (1 + np.cos(np.pi * (t - 10) / 50)) / 2)),
    (("constant", dict(warmup=0.5)), lambda t: np.minimum((t + 1) / 5, 1.0)),
])
def test_schedule_closed_forms(options, expected):
    name, opts = options
    got = lrs(OptimizerSpec("sgd", 0.2, schedule=ScheduleSpec.make(name, **opts)))
    np.testing.assert_allclose(got, 0.2 * expected(np.arange(60)), rtol=1e-12)


def test_one_cycle_rises_to_lr_then_falls_far_below():
    got = lrs(OptimizerSpec("sgd", 0.2, schedule=ScheduleSpec.make("one_cycle")))
    peak = int(np.argmax(got))
    assert peak == round(0.3 * 60) - 1 and got[peak] == pytest.approx(0.2)
    assert got[0] == pytest.approx(0.2 / 25) and got[-1] == pytest.approx(0.2 / 25 / 1e4)
    assert np.all(np.diff(got[:peak + 1]) > 0) and np.all(np.diff(got[peak:]) < 0)


# ---- schedules: against torch.optim.lr_scheduler -------------------------------------------------
def _torch_lrs(make, steps=60, warmup=0):
    torch = pytest.importorskip("torch")
    from torch.optim import lr_scheduler as S
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    main_ = make(S, opt)
    if warmup:
        main_ = S.SequentialLR(opt, [S.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup - 1), main_],
                               milestones=[warmup])
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        main_.step()
    return np.array(out)


def _per_epoch(make):
    """A scheduler torch users step once per epoch, stepped here once per batch of 10."""
    def per_batch(S, opt):
        inner = make(S, opt)

        class Every10:
            t = 0

            def step(self):
                self.t += 1
                if self.t % 10 == 0:
                    inner.step()
        return Every10()
    return per_batch


@pytest.mark.parametrize("name, opts, make, warmup", [
    ("step_decay", dict(every=2, gamma=0.5), _per_epoch(lambda S, o: S.StepLR(o, step_size=2, gamma=0.5)), 0),
    ("exponential", dict(gamma=0.8), _per_epoch(lambda S, o: S.ExponentialLR(o, gamma=0.8)), 0),
    ("cosine", dict(final=0.1), lambda S, o: S.CosineAnnealingLR(o, T_max=60, eta_min=0.02), 0),
    ("cosine", dict(warmup=1), lambda S, o: S.CosineAnnealingLR(o, T_max=50), 10),
    ("one_cycle", dict(), lambda S, o: S.OneCycleLR(o, max_lr=0.2, total_steps=60, cycle_momentum=False), 0),
])
def test_schedules_match_torch(name, opts, make, warmup):
    got = lrs(OptimizerSpec("sgd", 0.2, schedule=ScheduleSpec.make(name, **opts)))
    np.testing.assert_allclose(got, _torch_lrs(make, warmup=warmup), rtol=1e-9, atol=1e-15)


# ---- clipping, in the compiled step ----------------------------------------------------------------
CLIP_MODEL = """
model net(x: f64[B, 4], t: f64[B, 3]) -> f64[] {
    param W: [4, 3] = zeros
    param b: [3] = zeros
    return sum((x @ W + b - t) ** 2)
}
"""


@pytest.mark.parametrize("clip", [dict(clip_norm=0.5), dict(clip_value=0.3), dict(clip_norm=1e6),
                                  dict(clip_value=0.3, clip_norm=0.2)])
def test_clipping_replayed_in_numpy(clip):
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    W, b = rng.normal(size=(4, 3)), rng.normal(size=3)
    step = compile_train_step(CLIP_MODEL, OptimizerSpec("sgd", 0.1, **clip))
    step.params = {"net/W": W.copy(), "net/b": b.copy()}
    step(x=x, t=t)
    r = x @ W + b - t                                      # the gradients, by hand
    grads = [2 * x.T @ r, 2 * r.sum(axis=0)]
    if "clip_value" in clip:
        grads = [np.clip(gr, -clip["clip_value"], clip["clip_value"]) for gr in grads]
    if "clip_norm" in clip:
        norm = math.sqrt(sum(float((gr ** 2).sum()) for gr in grads))
        grads = [gr * min(1.0, clip["clip_norm"] / (norm + 1e-6)) for gr in grads]
    np.testing.assert_allclose(step.params["net/W"], W - 0.1 * grads[0], rtol=1e-12)
    np.testing.assert_allclose(step.params["net/b"], b - 0.1 * grads[1], rtol=1e-12)
    if clip.get("clip_norm") == 0.5:                       # it did clip: the step is lr * 0.5 long
        moved = np.concatenate([(W - step.params["net/W"]).ravel(), b - step.params["net/b"]])
        assert np.linalg.norm(moved) == pytest.approx(0.1 * 0.5, rel=1e-5)


def test_schedule_is_a_run_time_input_not_a_recompile():
    spec = OptimizerSpec("adam", 1e-3, schedule=ScheduleSpec.make("cosine", warmup=1))
    a = compile_train_step(CLIP_MODEL, spec)
    b = compile_train_step(CLIP_MODEL, OptimizerSpec("adam", 1e-3))
    assert a.ex.source == b.ex.source
    assert ("lr", "scalar") in [(name, kind) for name, kind, *_ in a.ex.inputs]


# ---- the .dl surface and its errors ------------------------------------------------------------------
TRAIN = """
model m(x: f32[B, 64]) -> f32[B, 10] {{
    return dense(x, 10)
}}
train m on digits() {{
    loss = cross_entropy(m(x), y)
    optimizer = {opt}
}}
"""


def test_schedule_and_clipping_in_a_train_block(capsys, dl_file):
    p = dl_file(TRAIN.format(opt="adam(lr = 0.01, schedule = cosine(warmup = 1, final = 0.01), clip_norm = 1.0)"))
    assert main(["check", str(p)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("opt, words", [
    ("adam(schedule = cosine(warmpu = 1))", "schedule `cosine` has no option warmpu"),
    ("adam(schedule = cosine(1))", "`cosine` takes keyword options"),
    ("adam(schedule = 3)", "`schedule` is one of constant, step_decay, exponential, cosine, one_cycle(...)"),
    ("adam(schedule = one_cycle(rise = 1.5))", "`rise` is the part of the run spent rising"),
    ("adam(clip_norm = -1)", "`clip_norm` must be a non-negative number"),
])
def test_schedule_errors_are_located(capsys, dl_file, opt, words):
    p = dl_file(TRAIN.format(opt=opt))
    assert main(["check", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:7:" in err and words in err, err


LAYER = """
model m(x: f32[B, 4, 4, 4]) -> f32[B, 10] {{
    h = {body}
    return dense(flatten(h), 10)
}}
train m on digits(shape = [4, 4, 4]) {{
    loss = cross_entropy(m(x), y)
}}
"""


@pytest.mark.parametrize("body, words", [
    ("conv_transpose(x, zeros([3, 2, 2, 2]))", "the input has 4 channels [B, 4, 4, 4] but the kernel expects 3"),
    ("conv2d(x, 4, kernel = [3, 2, 1])", "`pair`: the value must be an integer or a list of 2 integers"),
    ("group_norm(x, 3)", "groups (3) must divide the channels (4)"),      # was a raw reshape error
    ("conv_transpose2d(x, 2, kernel = 3, stride = 2, output_padding = 2)", "output_padding (2) must be smaller"),
    ("max_pool2d(x, kernel = [2, 9])", "larger than the input"),
])
def test_layer_errors_are_located(capsys, dl_file, body, words):
    p = dl_file(LAYER.format(body=body))
    assert main(["check", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:3:" in err and words in err, err


# ---- validation, early stopping, history ---------------------------------------------------------
def test_validation_split_is_disjoint_stratified_and_scaled_on_train_only():
    from dsl.parser import parse
    from runtime import data
    call = parse("train m on digits(test = 0.2, val = 0.1) {\n}\n").items[0].data
    ds = data.load(call, ROOT, seed=0, float_dtype="f64")
    sizes = {k: len(getattr(ds, k)["y"]) for k in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797 and sizes["val"] == pytest.approx(0.1 * 1797, abs=2)
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=1)
    rows = {k: {r.tobytes() for r in getattr(ds, k)["x"]} for k in ("train", "val", "test")}
    assert not rows["train"] & rows["val"] and not rows["val"] & rows["test"]
    share = np.bincount(ds.val["y"], minlength=10) / sizes["val"]
    np.testing.assert_allclose(share, np.bincount(ds.train["y"], minlength=10) / sizes["train"], atol=0.02)
    np.testing.assert_allclose(ds.train["x"].mean(axis=0), 0, atol=1e-6)      # scaled on train alone:
    assert np.abs(ds.val["x"].mean(axis=0)).max() > 1e-3                        # val is not re-centred


@pytest.mark.parametrize("monitor, values, best, stop_at", [
    ("loss", [1.0, 0.8, 0.9, 0.7, 0.75], 4, None),
    ("loss", [1.0, 0.8, 0.9, 0.85, 0.95], 2, 4),
    ("accuracy", [0.5, 0.7, 0.6, 0.65, 0.69], 2, 4),
])
def test_early_stopping(monitor, values, best, stop_at):
    from runtime.history import EarlyStopping
    es, stopped = EarlyStopping(monitor, patience=2), None
    for ep, v in enumerate(values, 1):
        es.update(ep, {monitor: v})
        if es.should_stop and stopped is None:
            stopped = ep
    assert es.best_epoch == best and stopped == stop_at


CNN_VAL = """
model m(x: f32[B, 64]) -> f32[B, 10] {
    return dense(dropout(relu(dense(x, 32)), 0.2), 10)
}
train m on digits(test = 0.2, val = 0.1) {
    loss = cross_entropy(m(x), y)
    optimizer = adam(lr = 0.01, schedule = cosine(warmup = 0.5))
    batch = 64
    epochs = 4
}
"""


def test_fit_reports_validation_each_epoch_and_tests_once(dl_file, tmp_path, monkeypatch):
    from runtime.session import Options, Session
    s = Session(dl_file(CNN_VAL), Options(log_path=str(tmp_path / "run.jsonl"), save_best=str(tmp_path / "best.npz"),
                                          monitor="val_accuracy"))
    seen = []
    evaluate = s.evaluate
    monkeypatch.setattr(s, "evaluate", lambda split, *a: seen.append(len(split["y"]) if split else 0)
                        or evaluate(split, *a))
    lines = []
    rep = s.fit(progress=True, log=lines.append)
    n_val, n_test = len(s.dataset.val["y"]), len(s.dataset.test["y"])
    assert seen == [n_val] * 4 + [n_test]                  # the test split, once, at the end
    assert all("val_loss" in ln and "test_" not in ln for ln in lines)
    logged = [json.loads(ln) for ln in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert logged == rep["history"] and [e["epoch"] for e in logged] == [1, 2, 3, 4]
    spe = -(-len(s.dataset.train["y"]) // 64)
    assert logged[0]["lr"] == pytest.approx(0.01 / round(0.5 * spe))         # warm-up's first step
    accs = [e["val"]["accuracy"] for e in logged]
    assert rep["best_epoch"] == 1 + int(np.argmax(accs)) and rep["best_val_accuracy"] == max(accs)
    # the test report is the best epoch's model, which --save-best wrote
    s2 = Session(dl_file(CNN_VAL), Options(epochs=0))
    s2.load(tmp_path / "best.npz")
    for k in s.params:
        np.testing.assert_array_equal(s2.params[k], s.params[k])
    assert s2.evaluate(s2.dataset.test)["accuracy"] == pytest.approx(rep["test"]["accuracy"])


def test_plot_draws_a_png(tmp_path):
    from runtime.history import plot
    hist = [{"epoch": e, "train": {"loss": 1 / e, "accuracy": 1 - 1 / e}, "val": {"loss": 1.1 / e}}
            for e in range(1, 4)]
    plot(hist, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("data, extra, words", [
    ("digits()", "    patience = 3\n", "early stopping and --save-best watch a validation split"),
    ("digits(val = 0.1)", '    monitor = "f1"\n', "cannot monitor `f1`"),
    ("digits(test = 0.5, val = 0.6)", "", "`val` is the fraction held out for validation"),
])
def test_validation_errors(capsys, dl_file, data, extra, words):
    p = dl_file(TRAIN.format(opt="adam()").replace("digits()", data).replace("    optimizer", extra + "    optimizer"))
    code = main(["run", str(p), "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and f"{p}:" in err, err


@pytest.mark.parametrize("layer, shape", [
    ('lstm(x, 8, returns = "last", bidirectional = true)', ("B", 16)),
    ('gru(x, 8, bidirectional = true)', ("B", 5, 16)),
    ('rnn(x, 8, returns = "last", bidirectional = true)', ("B", 16)),
])
def test_bidirectional_shapes_and_parameters(layer, shape):
    from compiler.api import lower_function
    lw, prog = lower_function(f"model net(x: f64[B, 5, 3]) {{\n    return {layer}\n}}\n")
    assert prog.graph.shape(prog.graph.outputs["output"]) == shape
    scopes = {name.split("/")[2] for name in prog.params}
    assert scopes == {"fwd", "bwd"}, sorted(prog.params)


@pytest.mark.slow
def test_tuned_cnn_example(capsys):
    """examples/cnn_tuned.dl: validation, cosine + warm-up, early stopping, the best epoch tested."""
    assert main(["run", str(ROOT / "examples" / "cnn_tuned.dl"), "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["test"]["accuracy"] >= 0.98, rep["test"]
    assert rep["best_epoch"] <= rep["epochs"] and len(rep["history"]) == rep["epochs"]
    assert min(e["val"]["loss"] for e in rep["history"]) == rep["best_val_loss"]


def test_flags_override_every_phase_schedule_and_clipping(dl_file):
    from runtime.session import Options, Session
    src = TRAIN.format(opt="adam(lr = 0.01, schedule = step_decay(gamma = 0.5, every = 2))")
    s = Session(dl_file(src), Options(warmup=1.0, clip_norm=2.0, epochs=1))
    spec = s.phases[0].optimizer
    assert spec.schedule == ScheduleSpec.make("step_decay", gamma=0.5, every=2, warmup=1.0)   # options kept
    assert spec.clip_norm == 2.0 and spec.clip_value == 0.0
    s2 = Session(dl_file(src), Options(schedule="cosine", epochs=1))
    assert s2.phases[0].optimizer.schedule == ScheduleSpec.make("cosine")                  # another schedule
    s2.fit(progress=False)
    spe = -(-len(s2.dataset.train["y"]) // 32)
    assert s2.lr(s2.phases[0]) == pytest.approx(0.01 * (1 + math.cos(math.pi * spe / spe)) / 2, abs=1e-12)
