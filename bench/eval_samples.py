"""How good are a generative model's samples? Label them with the digit classifier that
`examples/cnn.dl` trains and report, for N samples (default 1000):

* the share the classifier labels with confidence >= 0.9;
* the entropy (nats) of the predicted-class histogram: ln 10 = 2.30 is perfectly balanced, mode
  collapse shows as a low value;
* the Fréchet distance between the classifier's penultimate features (64 ReLU units) of the
  samples and of the real test digits (the FID idea, with a feature extractor suited to 8x8
  digits); the same distance for the real training digits (the floor) and for uniform noise
  (the scale) is printed first;
* how far the samples are from the training set: the median distance (L2 over the 64 pixels,
  in 0..16 units) from a sample to its nearest training digit. Real test digits are about 17
  from theirs; a model that memorizes its training digits comes closer (a copy is 0).

    python bench/eval_samples.py --classifier cnn.safetensors \\
        examples/vae.dl=vae.safetensors examples/gan.dl=gan.safetensors ...

Samples are images with pixels in [0, 1] (what the examples' `generate` blocks return); they
are mapped to the classifier's input units (0..16, standardized as its training split was).
Without --classifier, examples/cnn.dl is trained first (a few minutes).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from scipy import linalg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler.api import compile_function  # noqa: E402
from dsl.parser import parse  # noqa: E402
from runtime import checkpoint, data  # noqa: E402
from runtime.sample import Sampler, as_images, write_grid  # noqa: E402


def digits_split():
    """The raw (unscaled) train and test digits of examples/cnn.dl's split (seed 0)."""
    call = parse("train cnn on digits(test = 0.2, shape = [1, 8, 8], scale = false) {}", "<eval>.dl").items[0].data
    return data.load(call, ROOT, 0)


class Classifier:
    def __init__(self, ck, train_x):
        self.fn = compile_function(str(ROOT / "bench" / "cnn_features.dl"), "cnn", dtype="f32", training=False)
        params, state, _ = checkpoint.load(ck)
        self.values = {**params, **state}
        self.mu, self.sd = train_x.mean(axis=0), train_x.std(axis=0)
        self.sd[self.sd == 0] = 1.0

    def __call__(self, pixels16):
        """Class probabilities and penultimate features of images in 0..16 units [N, 1, 8, 8]."""
        x = ((pixels16 - self.mu) / self.sd).astype(np.float32)
        names = [n for n, kind, _, _ in self.fn.ex.inputs if kind != "data"]
        out = self.fn(x=x, **{n: self.values[n] for n in names})
        z = out["output"] - out["output"].max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return p, out["output2"].astype(np.float64)


def frechet(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature samples. (Dead ReLU
    units make the covariances singular; the square root of their product still exists.)"""
    ma, mb = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(sa @ sb).real
    return float(((ma - mb) ** 2).sum() + np.trace(sa + sb - 2 * root))


def nearest(pixels16, train16):
    """The median L2 distance (0..16 pixel units) from each image to its nearest training image."""
    a = pixels16.reshape(len(pixels16), -1).astype(np.float64)
    b = train16.reshape(len(train16), -1).astype(np.float64)
    d2 = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
    return float(np.median(np.sqrt(np.maximum(d2.min(1), 0))))


def judge(clf, pixels16, test_feats, train16):
    p, f = clf(pixels16)
    hist = np.bincount(p.argmax(1), minlength=10) / len(p)
    nz = hist[hist > 0]
    return {"confident": float((p.max(1) >= 0.9).mean()), "entropy": float(-(nz * np.log(nz)).sum()),
            "fd": frechet(f, test_feats), "nearest": nearest(pixels16, train16),
            "classes": [round(float(h), 3) for h in hist]}


def reconstructions(file, ck, x16, path):
    """Rows of test digits, each followed by the row of its reconstructions by the file's
    `reconstruct` model."""
    fn = compile_function(file, "reconstruct", dtype="f32", training=False)
    params, state, _ = checkpoint.load(ck)
    values = {**params, **state}
    x = (x16.reshape(len(x16), 64) / 16).astype(np.float32)
    r = fn(x=x, **{n: values[n] for n, kind, _, _ in fn.ex.inputs if kind != "data"})["output"]
    rows = [a for i in range(0, len(x), 8) for a in (x[i:i + 8], r[i:i + 8])]
    write_grid(np.concatenate(rows).reshape(-1, 8, 8), path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", metavar="FILE.dl=CK",
                    help="a .dl file with a `generate` block, and its checkpoint")
    ap.add_argument("--classifier", metavar="CK", help="a checkpoint of examples/cnn.dl (default: train one)")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out-dir", default=".", help="where to write each model's sample grid (NAME_samples.png)")
    args = ap.parse_args(argv)
    ds = digits_split()
    ck = args.classifier
    if ck is None:
        ck = str(Path(tempfile.mkdtemp()) / "cnn.safetensors")
        subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(ROOT / "examples" / "cnn.dl"), "--save", ck,
                        "--quiet"], check=True, cwd=ROOT)
    clf = Classifier(ck, ds.train["x"])
    p_test, test_feats = clf(ds.test["x"])
    train16 = ds.train["x"]
    rows = {"test accuracy": float((p_test.argmax(1) == ds.test["y"]).mean()),
            "test nearest": nearest(ds.test["x"], train16)}
    rng = np.random.default_rng(args.seed)
    rows["real train digits"] = judge(clf, train16[rng.permutation(len(train16))[:args.n]], test_feats, train16)
    rows["uniform noise"] = judge(clf, rng.uniform(0, 16, (args.n, 1, 8, 8)), test_feats, train16)
    for spec in args.models:
        file, _, model_ck = spec.partition("=")
        s = Sampler(file)
        s.load(model_ck)
        images = as_images(s(args.n, args.seed))
        write_grid(images[:64], Path(args.out_dir) / f"{Path(file).stem}_samples.png")
        if "reconstruct" in s.lowerer.models:
            out = Path(args.out_dir) / f"{Path(file).stem}_reconstructions.png"
            reconstructions(file, model_ck, ds.test["x"][:32], out)
        rows[Path(file).stem] = judge(clf, 16 * np.clip(images, 0, 1).reshape(-1, 1, 8, 8), test_feats, train16)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"classifier: {rows.pop('test accuracy'):.1%} on the real test digits; N = {args.n} samples each; "
          f"real test digits lie {rows.pop('test nearest'):.1f} from their nearest training digit (median)")
    print(f"{'samples':<20}{'conf>=0.9':>10}{'entropy':>9}{'Fréchet':>10}{'nearest':>9}   class shares 0..9")
    for name, r in rows.items():
        print(f"{name:<20}{r['confident']:>10.1%}{r['entropy']:>9.3f}{r['fd']:>10.2f}{r['nearest']:>9.1f}   {r['classes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
