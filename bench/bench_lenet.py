"""Median time per training step of LeNet-5 (`examples/lenet28.dl`) with dlc, beside PyTorch.

    python bench/bench_lenet.py               # table: dlc vs PyTorch at 1 and all threads
    python bench/bench_lenet.py --json        # one JSON object instead
    python bench/bench_lenet.py --threads 1 --forward

The reference LeNet workload: 28x28x1 input, conv 5x5 1->6, ReLU, max-pool 2, conv 5x5 6->16,
ReLU, max-pool 2, flatten (16*4*4 = 256), dense 256->120 ReLU -> 84 ReLU -> 10; batch 64,
float32, softmax cross-entropy with integer labels, Adam lr 1e-3 (no weight decay). The
batches are the `.dl` file's own training data (scikit-learn's digits upsampled to 28x28 by
`digits(resize = 28, ...)`), identical for both frameworks. PyTorch runs the same network
with nn.Conv2d / nn.MaxPool2d / nn.Linear (its own default initialization; the cross-check
copies dlc's weights into it).

dlc's conv2d is im2col + one BLAS call per sample (compiler/ops_nn.py); bench_conv.py times
that against a direct loop nest on these layer shapes. Measurement machinery (fresh process
per thread setting, `others` load column, cross-check, profile): bench/common.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def torch_model(prob, a):
    from torch import nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def weight_pairs(model):
    from torch import nn
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    lins = [m for m in model if isinstance(m, nn.Linear)]
    pairs = []
    for i, m in enumerate(convs):                        # same [out, in, kh, kw] layout
        pairs += [(f"lenet/conv2d_{i + 1}/W", m.weight, lambda w: w),
                  (f"lenet/conv2d_{i + 1}/b", m.bias, lambda b: b)]
    for i, m in enumerate(lins):                         # dlc's dense weights are [in, out]
        pairs += [(f"lenet/dense_{i + 1}/W", m.weight, lambda w: w.T),
                  (f"lenet/dense_{i + 1}/b", m.bias, lambda b: b)]
    return pairs


def jax_model(prob, a):
    import jax
    import jax.numpy as jnp
    from jax import lax
    shapes = {"c1": (6, 1, 5, 5), "c2": (16, 6, 5, 5), "d1": (256, 120), "d2": (120, 84), "d3": (84, 10)}
    keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
    params = {}
    for (n, shp), k in zip(shapes.items(), keys):
        fan_in = shp[0] if n.startswith("d") else shp[1] * shp[2] * shp[3]
        params[n] = jax.random.normal(k, shp, jnp.float32) * (1 / fan_in) ** 0.5
        params[n + "b"] = jnp.zeros(shp[1] if n.startswith("d") else shp[0], jnp.float32)

    def conv_pool(x, w, b):
        y = lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        y = jax.nn.relu(y + b[None, :, None, None])
        return lax.reduce_window(y, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    def apply(p, x):
        x = conv_pool(conv_pool(x, p["c1"], p["c1b"]), p["c2"], p["c2b"]).reshape(x.shape[0], -1)
        x = jax.nn.relu(x @ p["d1"] + p["d1b"])
        x = jax.nn.relu(x @ p["d2"] + p["d2b"])
        return x @ p["d3"] + p["d3b"]
    return params, apply


BENCH = common.Bench(
    script=Path(__file__).resolve(),
    default_model=common.ROOT / "examples" / "lenet28.dl",
    shapes="LeNet-5 on 1x28x28: conv5 1->6, pool2, conv5 6->16, pool2, 256-120-84-10, ReLU, batch 64, f32, "
           "softmax cross-entropy, Adam lr 1e-3",
    torch_model=torch_model, weight_pairs=weight_pairs, jax_model=jax_model,
    steps=100, repeats=5, warmup=20, max_seconds=10.0,
    description=__doc__,
)


def main(argv=None):
    return common.main(BENCH, argv)


if __name__ == "__main__":
    sys.exit(main())
