"""Median time per training step of an LSTM classifier with dlc, beside PyTorch's nn.LSTM.

    python bench/bench_lstm.py                # table: dlc vs PyTorch at 1 and all threads
    python bench/bench_lstm.py --json         # one JSON object instead
    python bench/bench_lstm.py --threads 1 --no-profile

Workload (`bench/lstm_bench.dl`): batch 32, sequences of 32 steps of 32 features, one LSTM
layer of 128 units (`lstm(x, 128, returns = "last")`), its last hidden state -> dense 10;
float32, softmax cross-entropy with integer labels, Adam lr 1e-3. The data are random
(standard normal x [N, 32, 32], labels 0-9): the driver writes them as lstm_bench.npz beside
a copy of the .dl file in a temporary directory (the file reads them with the `npz(...)`
source), so both frameworks train on the same batches. PyTorch: nn.LSTM(32, 128,
batch_first=True) and nn.Linear(128, 10) on h_n; its LSTM has two bias vectors where dlc's
has one (the cross-check zeroes and freezes PyTorch's second).

Also measured by default: the forward pass alone, dlc's evaluation program
(`Session.run_eval`: the scan without saving carries, the loss) vs PyTorch's model and loss
under torch.no_grad() -- dlc's backward pass is a reverse scan that recomputes each step's
gates from the saved carries (compiler/ops_scan.py), so forward-only shows how much of the
step is the backward. Machinery: bench/common.py.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve().parent
T, FEATURES, HIDDEN, CLASSES = 32, 32, 128, 10


def torch_model(prob, a):
    from torch import nn

    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(FEATURES, HIDDEN, batch_first=True)
            self.fc = nn.Linear(HIDDEN, CLASSES)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return self.fc(h[-1])

    return Reader()


def weight_pairs(model):
    # dlc: Wx [I, 4H], Wh [H, 4H], b [4H], gates (i, f, g, o) as torch; torch: W_ih [4H, I]
    return [("reader/lstm_1/Wx", model.lstm.weight_ih_l0, lambda w: w.T),
            ("reader/lstm_1/Wh", model.lstm.weight_hh_l0, lambda w: w.T),
            ("reader/lstm_1/b", model.lstm.bias_ih_l0, lambda b: b),
            ("reader/dense_1/W", model.fc.weight, lambda w: w.T),
            ("reader/dense_1/b", model.fc.bias, lambda b: b)]


def prepare(a, tmp: Path) -> Path:
    """Copy the .dl file into tmp and write the random data it reads there."""
    import numpy as np
    rng = np.random.default_rng(a.data_seed)
    x = rng.standard_normal((a.examples, T, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, a.examples).astype(np.int32)
    np.savez(tmp / "lstm_bench.npz", x=x, y=y)
    dst = tmp / a.model.name
    shutil.copyfile(a.model, dst)
    return dst


def add_args(ap):
    ap.add_argument("--examples", type=int, default=1024, help="random examples written (default 1024)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the random data (default 0)")


def jax_model(prob, a):
    import jax
    import jax.numpy as jnp
    from jax import lax
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    s = (1 / HIDDEN) ** 0.5
    params = {"Wx": jax.random.uniform(k[0], (FEATURES, 4 * HIDDEN), jnp.float32, -s, s),
              "Wh": jax.random.uniform(k[1], (HIDDEN, 4 * HIDDEN), jnp.float32, -s, s),
              "b": jnp.zeros(4 * HIDDEN, jnp.float32),
              "W": jax.random.uniform(k[2], (HIDDEN, CLASSES), jnp.float32, -s, s),
              "bo": jnp.zeros(CLASSES, jnp.float32)}

    def apply(p, x):
        xs = jnp.swapaxes(x @ p["Wx"] + p["b"], 0, 1)          # [T, B, 4H]: the input GEMM once

        def cell(carry, xt):
            h, c = carry
            i, f, g, o = jnp.split(xt + h @ p["Wh"], 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), None
        zero = jnp.zeros((x.shape[0], HIDDEN), jnp.float32)
        (h, _), _ = lax.scan(cell, (zero, zero), xs)
        return h @ p["W"] + p["bo"]
    return params, apply


BENCH = common.Bench(
    script=Path(__file__).resolve(),
    default_model=HERE / "lstm_bench.dl",
    shapes=f"LSTM: batch 32, T {T}, input {FEATURES}, hidden {HIDDEN}, last state -> dense {CLASSES}, f32, "
           "softmax cross-entropy, Adam lr 1e-3 (random data)",
    torch_model=torch_model, weight_pairs=weight_pairs, jax_model=jax_model,
    steps=40, repeats=5, warmup=5, batches=8, forward=True, max_seconds=10.0,
    prepare=prepare, add_args=add_args,
    description=__doc__,
)


def main(argv=None):
    return common.main(BENCH, argv)


if __name__ == "__main__":
    sys.exit(main())
