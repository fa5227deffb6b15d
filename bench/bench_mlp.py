"""Median time per training step of `examples/mlp.dl` with dlc, beside the same model in PyTorch.

    python bench/bench_mlp.py                 # table: dlc vs PyTorch at 1 and all threads
    python bench/bench_mlp.py --json          # one JSON object instead
    python bench/bench_mlp.py --threads 1 --steps 1000 --repeats 7

Model: 64-128-64-10 MLP with ReLU, batch 64, float32, softmax cross-entropy with integer
labels, Adam with the `.dl` file's settings (lr 1e-3; its L2 weight decay on the weights, as
dlc applies it, which torch.optim.Adam does with a parameter group). The batches are the
`.dl` file's own training data (the scikit-learn digits), identical for both frameworks.

Every measurement runs in its own subprocess, so each one's thread settings (OpenBLAS,
OpenMP, MKL: set through the environment before numpy is imported, and again with
threadpoolctl where it is installed; `torch.set_num_threads` for PyTorch) are its own, and
no framework's spinning worker threads slow another. A step is timed as `repeats` runs of
`steps` consecutive steps (garbage collector off), after `warmup` steps; the figure is the
median over the repeats of the mean time per step.

The dlc workers also split a step into Python argument assembly, Numba dispatch, and the
compiled step (by calling it in a loop from compiled code), and time each generated kernel
alone the same way (`--no-profile` skips this). The machinery is in bench/common.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DIMS = [(64, 128), (128, 64), (64, 10)]


def torch_model(prob, a):
    from torch import nn
    layers = []
    for i, (n_in, n_out) in enumerate(DIMS):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(DIMS) - 1 else [])
    return nn.Sequential(*layers)


def weight_pairs(model):
    from torch import nn
    lin = [m for m in model if isinstance(m, nn.Linear)]
    pairs = []
    for i, m in enumerate(lin):
        pairs.append((f"mlp/dense_{i + 1}/W", m.weight, lambda w: w.T))      # dlc: [in, out]
        pairs.append((f"mlp/dense_{i + 1}/b", m.bias, lambda b: b))
    return pairs


def jax_model(prob, a):
    import jax
    import jax.numpy as jnp
    keys = jax.random.split(jax.random.PRNGKey(0), len(DIMS))
    params = {}
    for i, ((n_in, n_out), k) in enumerate(zip(DIMS, keys)):
        params[f"W{i}"] = jax.random.normal(k, (n_in, n_out), jnp.float32) * (1 / n_in) ** 0.5
        params[f"b{i}"] = jnp.zeros(n_out, jnp.float32)

    def apply(p, x):
        for i in range(len(DIMS)):
            x = x @ p[f"W{i}"] + p[f"b{i}"]
            x = jax.nn.relu(x) if i < len(DIMS) - 1 else x
        return x
    return params, apply


BENCH = common.Bench(
    script=Path(__file__).resolve(),
    default_model=common.ROOT / "examples" / "mlp.dl",
    shapes="64-128-64-10 MLP, ReLU, batch 64, f32, softmax cross-entropy (int labels), Adam",
    torch_model=torch_model, weight_pairs=weight_pairs, jax_model=jax_model,
    steps=500, repeats=5, warmup=100,
    description=__doc__,
)


def main(argv=None):
    return common.main(BENCH, argv)


if __name__ == "__main__":
    sys.exit(main())
