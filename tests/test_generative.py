"""Generative models: random draws (normal, uniform, bernoulli), the VAE's pieces
(reparameterization, KL between diagonal Gaussians, BCE on pixels), the timestep embedding,
and fresh noise at each step of a scan.

Random draws are checked against the NumPy replay of the counter-based stream (the same
numbers, fused or not), for their moments, and for reproducibility; the KL against the
closed form and against numerical integration; gradients against finite differences.
"""
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, stats

from compiler.api import compile_function
from compiler.ops_nn import uniform_ref
from compiler.ops_random import normal_ref
from dsl.diagnostics import DlcError

ROOT = Path(__file__).resolve().parent.parent

DRAWS = """
model m(x: f64[B, 4]) -> f64[B, 2000] {
    return normal([B, 2000], mean = 1, std = 2), uniform([B, 2000], low = -1, high = 3),
           bernoulli(0.3, [B, 2000]), normal_like(x), uniform_like(x), bernoulli(sigmoid(x)),
           bernoulli_like(x, 0.5, dtype = "bool")
}
"""


@pytest.fixture(scope="module")
def draws():
    return {fuse: compile_function(DRAWS, dtype="f64", fuse=fuse) for fuse in (True, False)}


def test_draws_are_the_counter_stream_fused_or_not(draws):
    x = np.zeros((5, 4))
    out = draws[True](x=x, rng=123)
    unfused = draws[False](x=x, rng=123)
    for k in out:                                      # (fused kernels may contract a * b + c)
        np.testing.assert_allclose(out[k], unfused[k], rtol=1e-14, atol=1e-14)
    # salts number the call sites in order: normal is 1, uniform 2, bernoulli 3
    np.testing.assert_allclose(out["output"], 1 + 2 * normal_ref(123, 1, 10000).reshape(5, 2000), rtol=1e-12)
    np.testing.assert_allclose(out["output2"], -1 + 4 * uniform_ref(123, 2, 10000).reshape(5, 2000), rtol=1e-12)
    np.testing.assert_array_equal(out["output3"], (uniform_ref(123, 3, 10000) < 0.3).reshape(5, 2000))
    assert out["output7"].dtype == np.bool_


def test_rand_normal_op_reference_and_no_gradient():
    from compiler.ir import Graph
    from compiler.ops import OPS
    g = Graph("t")
    n = g.add("rand_normal", g.input("rng", (), "i64", "scalar"), shape=(4, 5), salt=2, dtype="f64")
    assert OPS["rand_normal"].grad(g, n, g.input("dy", (4, 5), "f64", "data")) == [None]
    u = uniform_ref(9, 2, 40)                    # Box-Muller of the stream's pairs (2i, 2i + 1)
    np.testing.assert_allclose(OPS["rand_normal"].ref(np.array(9), shape=(4, 5), salt=2, dtype="f64"),
                               (np.sqrt(-2 * np.log(1 - u[0::2])) * np.cos(2 * np.pi * u[1::2])).reshape(4, 5))


def test_reproducible_and_fresh_per_seed(draws):
    x = np.zeros((5, 4))
    a, b, c = (draws[True](x=x, rng=s) for s in (7, 7, 8))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["output"], c["output"])
    assert not np.array_equal(a["output"], (a["output2"]))


def test_moments(draws):
    out = draws[True](x=np.zeros((50, 4)), rng=5)
    n = out["output"].ravel()                          # 100,000 draws of N(1, 2^2)
    assert abs(n.mean() - 1) < 4 * 2 / np.sqrt(n.size)
    assert abs(n.std() - 2) < 0.02
    assert stats.kstest((n - 1) / 2, "norm").pvalue > 1e-3
    u = out["output2"].ravel()
    assert u.min() >= -1 and u.max() < 3
    assert stats.kstest(u, "uniform", args=(-1, 4)).pvalue > 1e-3
    assert abs(out["output3"].mean() - 0.3) < 4 * np.sqrt(0.21 / u.size)
    assert set(np.unique(out["output3"])) == {0.0, 1.0}


def test_bernoulli_follows_a_tensor_of_probabilities():
    f = compile_function("model m(p: f64[B, 3]) -> f64[B, 3] { return bernoulli(p) }", dtype="f64")
    p = np.tile([0.1, 0.5, 0.9], (20000, 1))
    np.testing.assert_allclose(f(p=p, rng=3)["output"].mean(axis=0), [0.1, 0.5, 0.9], atol=0.015)


def test_a_scan_draws_fresh_noise_at_each_step():
    src = """
    model m(x: f64[B, 3]) -> f64[B, 6, 3] {
        ys = scan t in range(6), h = x {
            h = 0.5 * h + normal_like(h)
            yield h
        }
        return ys
    }"""
    x = np.arange(6.0).reshape(2, 3)
    for fuse in (True, False):
        out = compile_function(src, dtype="f64", fuse=fuse)(x=x, rng=11)["output"]
        h, ref = x, []
        for t in range(6):                             # the body's seed is the scan's seed + t
            h = 0.5 * h + normal_ref(11 + t, 1, 6).reshape(2, 3)
            ref.append(h)
        np.testing.assert_allclose(out, np.stack(ref, 1), rtol=1e-12, atol=1e-12)


def test_initializers_keep_their_names():
    src = """
    def lin(x: [B, I]) {
        param W: [I, 2] = normal(std = 0.5)
        param b: [2] = uniform(low = 1, high = 2)
        return x @ W + b
    }
    model m(x: f64[B, 3]) -> f64[B, 2] { return lin(x) }"""
    f = compile_function(src, dtype="f64")
    assert str(f.params["m/lin_1/W"].init) == "normal(std=0.5)"
    assert str(f.params["m/lin_1/b"].init) == "uniform(high=2, low=1)"


@pytest.mark.parametrize("src, msg", [
    ("normal([B, 2], dtype = \"i32\")", 'dtype is "float", "f32" or "f64"'),
    ("bernoulli(0.5)", "needs a shape when p is a number"),
    ("bernoulli(1.5, [B, 2])", "a probability in [0, 1]"),
])
def test_located_mistakes(src, msg):
    with pytest.raises(DlcError, match=msg.replace("[", r"\[").replace("(", r"\(")):
        compile_function(f"model m(x: f64[B, 2]) -> f64[B, 2] {{ return {src} }}", dtype="f64")


# ---- the VAE's pieces --------------------------------------------------------------------------

def _kl_closed(m1, lv1, m2, lv2):
    return 0.5 * (lv2 - lv1 + (np.exp(lv1) + (m1 - m2) ** 2) / np.exp(lv2) - 1)


def test_kl_between_diagonal_gaussians_golden():
    f = compile_function("""
    model m(m1: f64[B, D], l1: f64[B, D], m2: f64[B, D], l2: f64[B, D]) -> f64[] {
        return kl_diag_gaussians(m1, l1, m2, l2), kl_standard_normal(m1, l1)
    }""", dtype="f64", grad=["m1", "l1"])
    rng = np.random.default_rng(0)
    m1, l1, m2, l2 = (rng.normal(size=(4, 3)) for _ in range(4))
    out = f(m1=m1, l1=l1, m2=m2, l2=l2)
    np.testing.assert_allclose(out["loss"], _kl_closed(m1, l1, m2, l2).sum(1).mean(), rtol=1e-12)
    np.testing.assert_allclose(out["output2"], _kl_closed(m1, l1, 0, 0).sum(1).mean(), rtol=1e-12)
    # the closed form itself, against the integral of p log(p / q) for one coordinate
    p, q = stats.norm(m1[0, 0], np.exp(l1[0, 0] / 2)), stats.norm(m2[0, 0], np.exp(l2[0, 0] / 2))
    numeric = integrate.quad(lambda z: p.pdf(z) * (p.logpdf(z) - q.logpdf(z)), -30, 30)[0]
    np.testing.assert_allclose(_kl_closed(m1[0, 0], l1[0, 0], m2[0, 0], l2[0, 0]), numeric, rtol=1e-8)
    # gradients: d/dm1 = (m1 - m2) / var2 / B, d/dl1 = 0.5 (var1 / var2 - 1) / B
    np.testing.assert_allclose(out["grad:m1"], (m1 - m2) / np.exp(l2) / 4, rtol=1e-10)
    np.testing.assert_allclose(out["grad:l1"], 0.5 * (np.exp(l1 - l2) - 1) / 4, rtol=1e-10)


def _fd(fn, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (fn(x + d) - fn(x - d)) / (2 * eps)
    return g


def test_reparameterize_and_bce_pixels_gradients():
    f = compile_function("""
    model m(mu: f64[B, 3], lv: f64[B, 3], t: f64[B, 3]) -> f64[] {
        return bce_pixels(reparameterize(mu, lv), t)
    }""", dtype="f64", grad=["mu", "lv"])
    rng = np.random.default_rng(1)
    mu, lv, t = rng.normal(size=(2, 3)), rng.normal(size=(2, 3)), rng.uniform(size=(2, 3))
    eps = normal_ref(9, 1, 6).reshape(2, 3)

    def ref(mu, lv):
        z = mu + np.exp(0.5 * lv) * eps
        return (np.logaddexp(0, z) - t * z).sum() / 2

    out = f(mu=mu, lv=lv, t=t, rng=9)
    np.testing.assert_allclose(out["loss"], ref(mu, lv), rtol=1e-12)
    np.testing.assert_allclose(out["grad:mu"], _fd(lambda v: ref(v, lv), mu), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out["grad:lv"], _fd(lambda v: ref(mu, v), lv), rtol=1e-6, atol=1e-9)


def test_timestep_embedding():
    f = compile_function("model m(t: f64[B]) -> f64[B, 8] { return timestep_embedding(t, 8) }", dtype="f64")
    t = np.array([0.0, 1.0, 17.0, 99.0])
    w = 10000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(f(t=t)["output"], np.concatenate([np.sin(t[:, None] * w), np.cos(t[:, None] * w)], 1),
                               rtol=1e-12, atol=1e-12)


# ---- the GAN's phases ---------------------------------------------------------------------------

def test_gan_phases_update_only_their_own_side():
    """The discriminator step leaves the generator's weights and optimizer state untouched, and
    the generator step the discriminator's."""
    from runtime.session import Options, Session
    s = Session(ROOT / "examples" / "gan.dl", Options(dtype="f64", threads=1))
    x = np.ascontiguousarray(s.dataset.train["x"][:32], np.float64)
    batch = {"x": x, "y": np.ascontiguousarray(s.dataset.train["y"][:32])}
    for phase, own in (("disc", "D/"), ("gen", "G/")):
        assert s.phases[s.next_phase].name == phase
        params = {k: v.copy() for k, v in s.params.items()}
        state = {k: v.copy() for k, v in s.state.items()}
        s.train_step(batch)
        for k, v in s.params.items():
            assert np.array_equal(v, params[k]) != k.startswith(own), k
        for k, v in s.state.items():
            assert np.array_equal(v, state[k]) != k.startswith(f"{phase}:"), k
    assert s.phase_steps == {"disc": 1, "gen": 1}


# ---- sampling programs and `dlc sample` -------------------------------------------------------------

def _silu(v):
    return v / (1 + np.exp(-v))


def test_diffusion_sampler_matches_a_numpy_loop(tmp_path):
    """examples/diffusion.dl's ancestral sampler (one compiled scan over T = 100 steps) against
    the same loop in NumPy, with random weights: the same seed draws the same noise, so the
    samples agree to rounding. The comparison is made before the example's last line maps
    pixels to the 17 levels of the digits (which would hide small errors), and that line is
    checked on its own."""
    from runtime.sample import Sampler
    src = (ROOT / "examples" / "diffusion.dl").read_text()
    quantized = "return reshape(floor((clip(x, -1, 1) + 1) * 8 + 0.5) / 16, [n, 1, 8, 8])"
    assert quantized in src
    (tmp_path / "diffusion.dl").write_text(src.replace(quantized, "return reshape((clip(x, -1, 1) + 1) / 2, [n, 1, 8, 8])"))
    s = Sampler(tmp_path / "diffusion.dl", dtype="f64")
    rng = np.random.default_rng(0)
    W = {}
    for name, kind, shape, dtype in s.ex.inputs:
        if kind == "param":
            W[name] = s.values[name] = rng.normal(0, 0.3 / np.sqrt(shape[0]) if len(shape) == 2 else 0.1, shape)
    n, T, seed = 3, 100, 5
    out = s(n, seed)
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2      # the cosine schedule
    beta = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    abar = np.cumprod(1 - beta)
    w = 10000.0 ** (-np.arange(32) / 32)

    def dense(name, v):
        return v @ W[f"denoiser/{name}/W"] + W[f"denoiser/{name}/b"]

    def eps(x, t):
        a = np.full((n, 1), float(t)) * w
        e = _silu(dense("dense_1", np.concatenate([np.sin(a), np.cos(a)], 1)))
        h = dense("dense_2", x)
        for i in (1, 2, 3):                                # residual blocks, the step added in each
            r = _silu(dense(f"block_{i}/dense_1", _silu(h)) + dense(f"block_{i}/dense_2", e))
            h = h + dense(f"block_{i}/dense_3", r)
        return dense("dense_3", _silu(h))

    prev = np.concatenate([[1.0], abar[:-1]])
    x = normal_ref(seed, 1, n * 64).reshape(n, 64)        # salt 1: x_T, drawn before the scan
    for k in range(T):
        t = T - 1 - k
        x0 = np.clip((x - np.sqrt(1 - abar[t]) * eps(x, t)) / np.sqrt(abar[t]), -1, 1)
        x = (beta[t] * np.sqrt(prev[t]) * x0 + (1 - prev[t]) * np.sqrt(1 - beta[t]) * x) / (1 - abar[t])
        var = beta[t] * (1 - prev[t]) / (1 - abar[t])      # 0 at t = 0
        x = x + np.sqrt(var) * normal_ref(seed + k, 2, n * 64).reshape(n, 64)   # salt 2, seed + k
    np.testing.assert_allclose(out, ((np.clip(x, -1, 1) + 1) / 2).reshape(n, 1, 8, 8), rtol=1e-9, atol=1e-9)
    assert not np.allclose(out, s(n, seed + 1))
    np.testing.assert_array_equal(out, s(n, seed))
    example = Sampler(ROOT / "examples" / "diffusion.dl", dtype="f64")
    example.values.update(W)
    np.testing.assert_array_equal(example(n, seed), np.floor(out * 16 + 0.5) / 16)   # the nearest of 17 levels


TINY_GAN = """
def noise(x: [N, ...], dim: int) { return normal([N, dim]) }
model G(z: f32[B, 4]) -> f32[B, 64] { return sigmoid(dense(z, 64)) }
model D(x: f32[B, 64]) -> f32[B, 1] { return dense(x, 1) }
train G on digits(test = 0.2, scale = false) {
    fake = G(noise(x, 4))
    phase disc { loss = bce_with_logits(D(x / 16), 1) + bce_with_logits(D(stop_gradient(fake)), 0); params = ["D"] }
    phase gen { loss = bce_with_logits(D(fake), 1); params = ["G"] }
    epochs = 1
}
generate samples(n) { return reshape(G(normal([n, 4])), [n, 1, 8, 8]) }
generate tokens(n) { return full([n, 3], 7, dtype = "i32") }
"""


def test_dlc_sample_end_to_end(dl_file, tmp_path, capsys):
    from PIL import Image

    from runtime.cli import main
    from runtime.sample import Sampler
    p = dl_file(TINY_GAN)
    ck = tmp_path / "g.safetensors"
    assert main(["run", str(p), "--save", str(ck), "--quiet"]) == 0
    png, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert main(["sample", str(p), "--load", str(ck), "-n", "10", "--seed", "3", "--out", str(png),
                 "--npz", str(npz)]) == 0
    img = np.asarray(Image.open(png))
    assert img.shape == (4 * (3 * 9 + 1), 4 * (4 * 9 + 1))        # 3 rows of 4, 8x8 each, 1 pixel apart
    samples = np.load(npz)["samples"]
    s = Sampler(p)
    s.load(ck)
    np.testing.assert_array_equal(samples, s(10, 3))
    from runtime import checkpoint
    params = checkpoint.load(ck)[0]
    z = normal_ref(3, 1, 40).reshape(10, 4)
    ref = 1 / (1 + np.exp(-(z @ params["G/dense_1/W"] + params["G/dense_1/b"])))
    np.testing.assert_allclose(samples.reshape(10, 64), ref, rtol=1e-5, atol=1e-6)
    # the first grid cell is the first sample, enlarged 4 times
    np.testing.assert_allclose(img[4:36:4, 4:36:4] / 255, np.clip(samples[0, 0], 0, 1), atol=0.5 / 255 + 1e-6)
    capsys.readouterr()
    assert main(["sample", str(p), "--load", str(ck), "-n", "2", "--program", "tokens"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["7 7 7", "7 7 7"]


@pytest.mark.parametrize("src, msg", [
    ("model M(x: f32[B, 64]) -> f32[B, 64] { return x }", "declares no sampling program"),
    ("model M(x: f32[B, 64]) -> f32[B, 64] { return x }\ngenerate s(n) { return normal([4, 2]) }",
     "must return a tensor of the n samples"),
])
def test_sample_mistakes(dl_file, tmp_path, capsys, src, msg):
    from runtime.cli import main
    ck = tmp_path / "none.safetensors"
    assert main(["sample", str(dl_file(src)), "--load", str(ck)]) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_vae_example_trains_and_samples_digits(tmp_path):
    """examples/vae.dl: the test ELBO beats a model of independent pixels, and a classifier of
    real digits reads most of its samples as confident digits of every class."""
    from sklearn.linear_model import LogisticRegression

    from runtime.sample import Sampler
    from runtime.session import Options, Session
    s = Session(ROOT / "examples" / "vae.dl", Options(threads=1))
    rep = s.fit(progress=False)
    train = s.dataset.train["x"] / 16
    p = np.clip(train.mean(0), 1e-3, 1 - 1e-3)           # the best independent-pixel Bernoulli model
    independent = -(train * np.log(p) + (1 - train) * np.log(1 - p)).sum(1).mean()
    # (pixels are gray levels, not binary: even a perfect model pays their entropy, ~13.7 nats)
    assert rep["test"]["loss"] < independent - 2, (rep["test"]["loss"], independent)
    s.save(tmp_path / "vae.safetensors")
    sampler = Sampler(ROOT / "examples" / "vae.dl")
    sampler.load(tmp_path / "vae.safetensors")
    x = sampler(500, 0).reshape(500, 64)
    clf = LogisticRegression(max_iter=3000).fit(train, s.dataset.train["y"])
    probs = clf.predict_proba(x)
    # (this linear classifier is sure of 73 % of real test digits and of 6 % of uniform noise)
    assert (probs.max(1) >= 0.9).mean() > 0.3
    assert (np.bincount(probs.argmax(1), minlength=10) / 500 >= 0.05).all()


def test_dlc_check_lowers_sampling_programs(dl_file, capsys):
    from runtime.cli import main
    ok = "model M(x: f32[B, 64]) -> f32[B, 64] { return x }\ngenerate s(n) { return M(normal([n, 64])) }\n"
    assert main(["check", str(dl_file(ok))]) == 0
    assert "generate s: f32[n, 64]" in capsys.readouterr().out
    bad = "model M(x: f32[B, 64]) -> f32[B, 64] { return x }\ngenerate s(n) {\n    return M(normal([n, 63]))\n}\n"
    assert main(["check", str(dl_file(bad))]) == 2
    captured = capsys.readouterr()
    assert ":3:12: error: argument `x` of `M` must be f32[B, 64], got f32[n, 63]" in captured.err
    assert "ok" not in captured.out
