"""Training phases, stop_gradient, several return values, and parameter sharing.

The phase tests drive `Session` step by step on the digits in float64 and replay the same
steps in NumPy: each phase's loss, its gradient (only its own parameters move), its optimizer
(its own state and its own step count) and the schedule (which phase runs at each step).
"""
from pathlib import Path

import numpy as np
import pytest

from compiler.api import compile_function, lower_function
from compiler.lower import Phase
from compiler.optim import OptimizerSpec
from runtime.cli import main
from runtime.session import Options, Session, schedule

ROOT = Path(__file__).resolve().parent.parent

# ---- the schedule ------------------------------------------------------------------------------


def _phases(*specs):
    return [Phase(f"p{i}", 0, [], OptimizerSpec("sgd"), steps, every) for i, (steps, every) in enumerate(specs)]


@pytest.mark.parametrize("specs, period", [
    ([(1, 1)], [0]),
    ([(1, 1), (1, 1)], [0, 1]),                              # alternate 1:1
    ([(5, 1), (1, 1)], [0, 0, 0, 0, 0, 1]),                  # k:1, as for a WGAN critic
    ([(1, 1), (1, 3)], [0, 1, 0, 0]),                        # the second every 3rd round
    ([(2, 2), (1, 3)], [0, 0, 1, 0, 0, 1, 0, 0]),            # rounds 0..5: 0 0 1 | - | 0 0 | 1 | 0 0 | -
])
def test_schedule_period(specs, period):
    assert schedule(_phases(*specs)) == period


# ---- two phases, replayed in NumPy ------------------------------------------------------------

ALTERNATING = """
model M(x: f32[B, 64]) -> f32[B, 10] {
    param U: [64, 4] = normal(std = 0.1)
    param V: [4, 10] = normal(std = 0.1)
    return (x @ U) @ V
}

train M on digits(test = 0.2) {
    t = onehot(y, 10)
    phase u {
        loss      = mean((M(x) - t) ** 2)
        params    = ["M/U"]
        optimizer = sgd(lr = 0.5, momentum = 0.9)
        steps     = 2
    }
    phase v {
        loss      = mean((M(x) - t) ** 2)
        params    = ["M/V"]
        optimizer = adam(lr = 0.01, beta1 = 0.8)
    }
    batch = 16
}
"""


def _session(dl_file, src, dtype="f64", **opts):
    return Session(dl_file(src), Options(dtype=dtype, **opts))


def _batches(s, n, size=16):
    x, y = s.dataset.train["x"].astype(s.opt.dtype.replace("f", "float")), s.dataset.train["y"]
    return [{"x": np.ascontiguousarray(x[i * size:(i + 1) * size]),
             "y": np.ascontiguousarray(y[i * size:(i + 1) * size])} for i in range(n)]


class _Reference:
    """The two phases in NumPy: SGD with momentum on U, Adam (torch semantics) on V."""

    def __init__(self, U, V):
        self.U, self.V = U.copy(), V.copy()
        self.buf = np.zeros_like(U)
        self.m, self.v, self.t = np.zeros_like(V), np.zeros_like(V), 0

    def step(self, phase, x, y):
        T = np.eye(10)[y]
        H = x @ self.U
        R = H @ self.V - T
        loss = np.mean(R ** 2)
        dP = 2 * R / R.size
        if phase == "u":
            gU = x.T @ (dP @ self.V.T)
            self.buf = 0.9 * self.buf + gU
            self.U = self.U - 0.5 * self.buf
        else:
            gV = H.T @ dP
            self.t += 1
            self.m = 0.8 * self.m + 0.2 * gV
            self.v = 0.999 * self.v + 0.001 * gV * gV
            mh, vh = self.m / (1 - 0.8 ** self.t), self.v / (1 - 0.999 ** self.t)
            self.V = self.V - 0.01 * mh / (np.sqrt(vh) + 1e-8)
        return loss


def test_each_phase_trains_its_own_parameters_with_its_own_optimizer(dl_file):
    s = _session(dl_file, ALTERNATING)
    assert [ph.name for ph in s.phases] == ["u", "v"]
    assert [ph.params for ph in s.phases] == [["M/U"], ["M/V"]]
    # each phase's step updates only its parameters and its own optimizer state
    for ph, ex in zip(s.phases, s.train_exes):
        written = {ex.graph[n]["name"] for n in ex.graph.updates}
        own = {"u": {"M/U", "u:sgd.momentum/M/U"}, "v": {"M/V", "v:adam.m/M/V", "v:adam.v/M/V"}}[ph.name]
        assert written == own
    assert set(s.state) == {"u:sgd.momentum/M/U", "v:adam.m/M/V", "v:adam.v/M/V"}

    ref = _Reference(s.params["M/U"], s.params["M/V"])
    ran = []
    for b in _batches(s, 9):
        phase = s.phases[s.next_phase].name
        ran.append(phase)
        before = {k: v.copy() for k, v in s.params.items()}
        loss, out = s.train_step(b)
        expected = ref.step(phase, b["x"], b["y"])
        np.testing.assert_allclose(loss, expected, rtol=1e-12)
        other = "M/V" if phase == "u" else "M/U"
        np.testing.assert_array_equal(s.params[other], before[other])      # untouched
        np.testing.assert_allclose(s.params["M/U"], ref.U, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(s.params["M/V"], ref.V, rtol=1e-10, atol=1e-14)
    assert ran == ["u", "u", "v"] * 3                       # the schedule: u twice, then v
    assert s.phase_steps == {"u": 6, "v": 3} and s.step_count == 9
    np.testing.assert_allclose(s.state["v:adam.m/M/V"], ref.m, rtol=1e-10, atol=1e-14)


def test_phase_checkpoint_round_trip(dl_file, tmp_path):
    a = _session(dl_file, ALTERNATING)
    batches = _batches(a, 7)
    for b in batches[:4]:
        a.train_step(b)
    ck = tmp_path / "ck.safetensors"
    a.save(ck)
    b_ = _session(dl_file, ALTERNATING)
    b_.load(ck)
    assert b_.phase_steps == a.phase_steps and b_.step_count == 4 and b_.next_phase == a.next_phase
    for k in a.state:
        np.testing.assert_array_equal(b_.state[k], a.state[k])
    for b in batches[4:]:                 # both continue identically (bias corrections included)
        la, _ = a.train_step(b)
        lb, _ = b_.train_step(b)
        assert la == lb
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b_.params[k])


def test_fit_reports_each_phase_loss(dl_file):
    s = _session(dl_file, ALTERNATING, dtype="f32", epochs=1)
    lines = []
    rep = s.fit(progress=True, log=lines.append)
    assert set(rep["train"]) >= {"loss:u", "loss:v"} and set(rep["test"]) >= {"loss:u", "loss:v"}
    assert "loss:u" in lines[0] and "test_" not in lines[0]      # the test split waits for the end
    n = len(s.dataset.train["x"])
    steps = -(-n // 16)
    assert rep["phase_steps"] == {"u": steps - steps // 3, "v": steps // 3}
    # each phase's loss is the mean over its own steps: on the held-out split both phases
    # have the same loss expression, so their test losses agree
    assert rep["test"]["loss:u"] == pytest.approx(rep["test"]["loss:v"], rel=1e-6)


def test_one_phase_block_keeps_its_names(dl_file):
    """A train block without phases is the one-phase case: loss `loss`, state `adam.m/...`."""
    s = _session(dl_file, """
model M(x: f32[B, 64]) -> f32[B, 10] { return dense(x, 10) }
train M on digits() {
    loss = cross_entropy(M(x), y)
    optimizer = adam(lr = 1e-3)
    params = ["M/dense_1/W"]
}
""")
    assert len(s.phases) == 1 and s.phases[0].name == "" and s.phases[0].output == "loss"
    assert set(s.state) == {"adam.m/M/dense_1/W", "adam.v/M/dense_1/W"}
    b = _batches(s, 1)[0]
    bias = s.params["M/dense_1/b"].copy()
    s.train_step(b)
    np.testing.assert_array_equal(s.params["M/dense_1/b"], bias)          # frozen: not in `params`


# ---- stop_gradient -------------------------------------------------------------------------------

STOP = """
model f(x: f64[3, 4]) {
    c = stop_gradient(x)
    return sum(x * c * c + tanh(x) * stop_gradient(exp(x)))
}
"""


def test_stop_gradient_forward_is_identity_and_gradient_treats_it_as_constant():
    x = np.random.default_rng(0).normal(size=(3, 4))
    fwd = compile_function(STOP)(x=x)["output"]
    np.testing.assert_allclose(fwd, np.sum(x ** 3 + np.tanh(x) * np.exp(x)), rtol=1e-12)
    got = compile_function(STOP, grad=["x"])(x=x)["grad:x"]

    def frozen(z):      # the same function with the stopped values held at x
        return np.sum(z * x * x + np.tanh(z) * np.exp(x))
    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = 1e-6
        fd[i] = (frozen(x + e) - frozen(x - e)) / 2e-6
    np.testing.assert_allclose(got, fd, rtol=1e-7, atol=1e-9)
    assert not np.allclose(got, 3 * x ** 2 + (1 - np.tanh(x) ** 2) * np.exp(x) + np.tanh(x) * np.exp(x))


def test_stop_gradient_fuses_into_elementwise_kernels():
    f = compile_function(STOP, grad=["x"])
    assert any(f.graph.op(n) == "stop_gradient" for grp in f.graph.groups for n in grp.nodes)
    assert all(grp.pattern != "opaque" for grp in f.graph.groups
               if any(f.graph.op(n) == "stop_gradient" for n in grp.nodes))


# ---- several return values ----------------------------------------------------------------------

MULTI = """
def two(x) {
    return tanh(x), x * x
}

def pair(x: [N, I]) {
    a, b = two(dense(x, 3))
    return a, b, a * b
}

model m(x: f64[2, 5]) {
    a, b, c = pair(x)
    return sum(a * c) + sum(b), a, b
}
"""


def test_several_return_values_compose_and_differentiate():
    p = {"m/pair_1/dense_1/W": np.random.default_rng(1).normal(size=(5, 3)),
         "m/pair_1/dense_1/b": np.random.default_rng(2).normal(size=3)}
    x = np.random.default_rng(3).normal(size=(2, 5))

    def ref(W):
        h = x @ W + p["m/pair_1/dense_1/b"]
        a, b = np.tanh(h), h * h
        return np.sum(a * a * b) + np.sum(b), a, b
    out = compile_function(MULTI)(x=x, **p)
    total, a, b = ref(p["m/pair_1/dense_1/W"])
    np.testing.assert_allclose(out["output"], total, rtol=1e-12)
    np.testing.assert_allclose(out["output2"], a, rtol=1e-12)
    np.testing.assert_allclose(out["output3"], b, rtol=1e-12)
    g = compile_function(MULTI, grad=["m/pair_1/dense_1/W"])(x=x, **p)["grad:m/pair_1/dense_1/W"]
    W = p["m/pair_1/dense_1/W"]
    fd = np.zeros_like(W)
    for i in np.ndindex(W.shape):
        e = np.zeros_like(W)
        e[i] = 1e-6
        fd[i] = (ref(W + e)[0] - ref(W - e)[0]) / 2e-6
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_unpacking_a_model_in_a_train_block(dl_file):
    s = _session(dl_file, """
model M(x: f32[B, 64]) -> f32[B, 10] {
    h = dense(x, 10)
    return h, argmax(h)
}
train M on digits() {
    logits, pred = M(x)
    loss = cross_entropy(logits, y)
}
""", dtype="f32")
    res = s.run_eval(_batches(s, 1)[0])
    np.testing.assert_array_equal(res["output2"], res["output"].argmax(-1))


# ---- parameter sharing ---------------------------------------------------------------------------

def test_a_model_called_twice_shares_its_parameters():
    src = """
model enc(x: f64[2, 3]) -> f64[2, 4] {
    return tanh(dense(relu(dense(x, 5)), 4))
}
model top(x: f64[2, 3]) {
    return sum(enc(x) * enc(x * 2))
}
"""
    _, prog = lower_function(src, "top")
    assert sorted(prog.params) == ["enc/dense_1/W", "enc/dense_1/b", "enc/dense_2/W", "enc/dense_2/b"]
    r = np.random.default_rng(4)
    p = {k: r.normal(size=v.shape) for k, v in prog.params.items()}
    x = r.normal(size=(2, 3))

    def enc(z, q):
        return np.tanh(np.maximum(z @ q["enc/dense_1/W"] + q["enc/dense_1/b"], 0) @ q["enc/dense_2/W"]
                       + q["enc/dense_2/b"])
    out = compile_function(src, "top", grad=True)(x=x, **p)
    np.testing.assert_allclose(out["loss"], np.sum(enc(x, p) * enc(2 * x, p)), rtol=1e-12)
    W = p["enc/dense_2/W"]
    fd = np.zeros_like(W)
    for i in np.ndindex(W.shape):
        e = np.zeros_like(W)
        e[i] = 1e-6
        hi, lo = {**p, "enc/dense_2/W": W + e}, {**p, "enc/dense_2/W": W - e}
        fd[i] = (np.sum(enc(x, hi) * enc(2 * x, hi)) - np.sum(enc(x, lo) * enc(2 * x, lo))) / 2e-6
    np.testing.assert_allclose(out["grad:enc/dense_2/W"], fd, rtol=1e-6, atol=1e-9)


BLOCK = """
def block(x: [N, I]) {
    return dense(relu(dense(x, 8)), 8)
}
model m(x: f64[2, 8]) {
    return sum(block(block(x NAME) NAME))
}
"""


def test_name_ties_a_user_def_and_everything_inside_it():
    _, tied = lower_function(BLOCK.replace(" NAME", ', name = "shared"'))
    assert sorted(tied.params) == ["m/shared/dense_1/W", "m/shared/dense_1/b", "m/shared/dense_2/W",
                                   "m/shared/dense_2/b"]
    _, apart = lower_function(BLOCK.replace(" NAME", ""))
    assert sorted(apart.params) == sorted(f"m/block_{i}/dense_{j}/{w}" for i in (1, 2) for j in (1, 2)
                                          for w in "Wb")


# ---- mistakes --------------------------------------------------------------------------------

HEAD = """
model G(z: f32[B, 64]) -> f32[B, 64] { return dense(z, 64) }
model D(x: f32[B, 64]) -> f32[B, 1] { return dense(x, 1) }
"""


@pytest.mark.parametrize("body, line, words", [
    ("train G on digits() { loss = mean(G(x)) }\ntrain D on digits() { loss = mean(D(x)) }\n", 5,
     "a second `train` block (the first, for `G`, is at model.dl:4)"),
    ("train G on digits() {\n phase d { loss = mean(D(G(x))); params = [\"E\"] }\n}\n", 5,
     "`params` pattern \"E\" matches no parameter"),
    ("train G on digits() {\n phase d { loss = mean(D(stop_gradient(G(x)))); params = [\"G\"] }\n}\n", 5,
     "phase `d` trains G/dense_1/W, G/dense_1/b, but its loss does not depend on them"),
    ("train G on digits() {\n phase d { loss = mean(G(x)); batch = 3 }\n}\n", 5,
     "`batch` is a setting of the train block, not of a phase"),
    ("train G on digits() {\n steps = 2\n loss = mean(G(x))\n}\n", 5,
     "`steps` is a setting of the phases, not of a train block"),
    ("train G on digits() {\n loss = mean(G(x))\n phase d { loss = mean(D(x)) }\n}\n", 5,
     "with phases, each phase sets its own `loss`"),
    ("train G on digits() {\n phase d { loss = mean(G(x)) }\n phase d { loss = mean(G(x)) }\n}\n", 6,
     "phase `d` is declared twice"),
    ("train G on digits() {\n phase d { params = [\"G\"] }\n}\n", 5, "phase `d` sets no `loss`"),
    ("train G on digits() {\n loss = mean(G(x))\n optimiser = adam()\n}\n", 6,
     "unknown train setting `optimiser`"),
    ("train G on digits() {\n a, b = G(x)\n loss = mean(a)\n}\n", 5, "2 names on the left but 1 value"),
    ("train G on digits() {\n phase d { loss = mean(G(x)); steps = 0 }\n}\n", 5,
     "`steps` must be a positive integer"),
    ("def f(x) {\n phase d { loss = 1 }\n return x\n}\ntrain G on digits() { loss = mean(G(f(x))) }\n", 5,
     "`phase` blocks belong in a train block"),
])
def test_phase_mistakes_are_located(capsys, dl_file, body, line, words):
    p = dl_file(HEAD + body)
    code = main(["check", str(p)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"{p}:{line}:"), err
    assert words in err, err


@pytest.mark.parametrize("body, words", [
    ('train G on digits() {\n loss = mean(D(G(x)))\n params = ["E"]\n}\n', "`params` pattern \"E\" matches no parameter"),
    ('train G on digits() {\n loss = mean(D(stop_gradient(G(x))))\n params = ["G"]\n}\n',
     "`params` selects G/dense_1/W, G/dense_1/b, but the loss does not depend on them"),
])
def test_params_mistakes_without_phases_name_no_empty_phase(capsys, dl_file, body, words):
    """A train block without phases is one unnamed phase: its errors said "phase ``: ..."."""
    p = dl_file(HEAD + body)
    assert main(["check", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{p}:6:11: error: {words}\n"), err
    assert "phase" not in err.splitlines()[0], err


def test_a_tuple_used_as_one_value_says_to_unpack(capsys, dl_file):
    p = dl_file("""
model M(x: f32[B, 64]) -> f32[B, 10] {
    h = dense(x, 10)
    return h, h * 2
}
train M on digits() { loss = cross_entropy(M(x), y) }
""")
    assert main(["check", str(p)]) == 2
    assert "got 2 values (unpack them" in capsys.readouterr().err


# ---- the example -----------------------------------------------------------------------------------

def _mmd(a, b, s=8.0):
    k = lambda x, y: np.exp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) / (2 * s * s))  # noqa: E731
    return k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()


@pytest.mark.slow
def test_gan_example_learns_the_digits():
    """The two-phase GAN: generated images move toward the real ones (kernel MMD), and a
    classifier trained on real digits reads them as confident digits of many classes."""
    from sklearn.linear_model import LogisticRegression
    s = Session(ROOT / "examples" / "gan.dl", Options(threads=1))
    test, train = s.dataset.test, s.dataset.train
    mu, sd = train["x"].mean(0), np.maximum(train["x"].std(0), 1e-6)     # G makes pixels in [0, 1]
    std = lambda v: (v - mu) / sd  # noqa: E731

    def generated():
        return std(16 * s.run_eval(test, step=7)["output"])
    before = _mmd(generated(), std(test["x"]))
    rep = s.fit(progress=False)
    steps = s.settings["epochs"] * -(-len(train["x"]) // s.settings["batch"])      # alternating 1:1
    assert rep["steps"] == steps and s.phase_steps == {"disc": (steps + 1) // 2, "gen": steps // 2}
    after = _mmd(generated(), std(test["x"]))
    assert after < 0.6 * before, (before, after)
    clf = LogisticRegression(max_iter=2000).fit(std(train["x"]), train["y"])
    p = clf.predict_proba(generated())
    assert p.max(1).mean() > 0.7
    assert (np.bincount(p.argmax(1), minlength=10) / len(p) >= 0.03).sum() >= 8


def test_ir_shows_one_phase_step(capsys, dl_file):
    p = dl_file(ALTERNATING)
    assert main(["ir", str(p), "--stage", "optimizer", "--phase", "v"]) == 0
    out = capsys.readouterr().out
    assert "v:adam.m/M/V" in out and "sgd.momentum" not in out
    assert "d loss / d M/V" in out and "d loss / d M/U" not in out
    assert main(["ir", str(p), "--stage", "grad", "--phase", "w"]) == 2
    assert "no such phase; phases: u, v" in capsys.readouterr().err


@pytest.mark.parametrize("args", [[], ["--stage", "ast"], ["--stage", "summary"], ["--program", "eval"],
                                  ["--stage", "fused", "--program", "eval"]])
def test_ir_checks_the_phase_name_at_every_stage(capsys, dl_file, args):
    """`--phase w` was silently ignored unless the stage showed a phase's step."""
    p = dl_file(ALTERNATING)
    assert main(["ir", str(p), *args, "--phase", "w"]) == 2
    assert capsys.readouterr().err == "error: --phase w: no such phase; phases: u, v\n"


def test_ir_phase_of_a_file_without_phases(capsys, dl_file):
    p = dl_file(HEAD + "train G on digits() {\n loss = mean(G(x))\n}\n")
    assert main(["ir", str(p), "--phase", "w"]) == 2
    assert capsys.readouterr().err == "error: --phase w: no such phase; this train block has no phases\n"
    p = dl_file(HEAD, "no_train.dl")
    assert main(["ir", str(p), "--phase", "w"]) == 2
    assert capsys.readouterr().err == "error: --phase w: no such phase; this file has no train block\n"


def test_state_updates_belong_to_the_phase_that_makes_them(dl_file):
    """Running statistics change in the steps of the phase whose loss calls the layer (and
    a layer called by two phases updates them in each: once per step, not an error)."""
    s = _session(dl_file, """
model M(x: f32[B, 64]) -> f32[B, 10] { return dense(batch_norm(x), 10) }
model N(x: f32[B, 64]) -> f32[B, 10] { return dense(x, 10) }
train M on digits() {
    phase a { loss = cross_entropy(M(x), y); params = ["M"] }
    phase b { loss = mse(N(x), M(x)); params = ["N"] }
    phase c { loss = mean(N(x) ** 2); params = ["N"] }
}
""")
    key = "M/batch_norm_1/running_mean"
    seen = []
    for b in _batches(s, 3):
        before = s.state[key].copy()
        s.train_step(b)
        seen.append(not np.array_equal(s.state[key], before))
        if seen[-1]:
            np.testing.assert_allclose(s.state[key], 0.9 * before + 0.1 * b["x"].mean(0), rtol=1e-12)
    assert seen == [True, True, False]


def test_two_phases_training_one_parameter_keep_separate_states(dl_file):
    s = _session(dl_file, """
model M(x: f32[B, 64]) -> f32[B, 10] { return dense(x, 10) }
train M on digits() {
    optimizer = adam(lr = 0.01)                        # the phases' default
    phase a { loss = cross_entropy(M(x), y); params = ["M/dense_1/W"] }
    phase b { loss = mean(M(x) ** 2); params = "M/dense_1/W"; optimizer = adam(lr = 0.001, beta1 = 0.5) }
}
""")
    assert [ph.optimizer for ph in s.phases] == [OptimizerSpec("adam", 0.01), OptimizerSpec("adam", 0.001, beta1=0.5)]
    assert set(s.state) == {"a:adam.m/M/dense_1/W", "a:adam.v/M/dense_1/W", "b:adam.m/M/dense_1/W",
                            "b:adam.v/M/dense_1/W"}
    b1, b2 = _batches(s, 2)
    s.train_step(b1)
    assert np.any(s.state["a:adam.m/M/dense_1/W"]) and not np.any(s.state["b:adam.m/M/dense_1/W"])
    m_a = s.state["a:adam.m/M/dense_1/W"].copy()
    W = s.params["M/dense_1/W"].copy()
    s.train_step(b2)
    np.testing.assert_array_equal(s.state["a:adam.m/M/dense_1/W"], m_a)
    # phase b's first step: its own bias correction (t = 1), so the step is lr * sign(g)
    step = W - s.params["M/dense_1/W"]
    nz = np.abs(s.state["b:adam.m/M/dense_1/W"]) > 1e-4      # away from eps
    np.testing.assert_allclose(np.abs(step[nz]), 0.001, rtol=1e-3)
