"""Data-parallel training under mpiexec (runtime/distributed.py): two ranks on this machine
take the same steps as one process with the same global batch, up to float reduction order.

Skipped when mpi4py or an mpiexec (the `mpich` wheel's, beside this Python) is missing.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import checkpoint, distributed

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "examples" / "mlp.dl"


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="mpi4py and mpiexec (pip install 'dlc[mpi]') are not installed")


def run(args, ranks: int | None, env: dict | None = None, timeout: int = 240):
    """`dlc run` as a subprocess, under mpiexec with `ranks` ranks (None: a plain process)."""
    cmd = [sys.executable, "-m", "runtime.cli", "run", *map(str, args)]
    if ranks is not None:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_"))}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**e, **(env or {})})


def assert_same_checkpoints(one: Path, many: Path, rtol=1e-5, atol=1e-6):
    p1, s1, m1 = checkpoint.load(one)
    p2, s2, m2 = checkpoint.load(many)
    assert p1.keys() == p2.keys() and s1.keys() == s2.keys()
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=rtol, atol=atol, err_msg=k)
    for k in s1:                                    # Adam's moments: the same gradients went in
        np.testing.assert_allclose(s2[k], s1[k], rtol=rtol, atol=atol, err_msg=k)
    assert (m2["step"], m2["epoch"]) == (m1["step"], m1["epoch"])
    moved = max(float(np.abs(p2[k] - p1[k]).max()) for k in p1)
    return moved


def test_shards_cover_a_batch_in_order():
    """Contiguous blocks, sizes differing by at most one, empty ones when rows run out."""
    for n, size in [(64, 2), (29, 2), (1, 2), (10, 3), (7, 4)]:
        parts = []
        for rank in range(size):
            w = distributed.World.__new__(distributed.World)
            w.rank, w.size = rank, size
            part = w.shard(np.arange(100, 100 + n))
            assert w.row0 == sum(len(p) for p in parts)
            parts.append(part)
        assert np.array_equal(np.concatenate(parts), np.arange(100, 100 + n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_single_process_does_not_start_mpi(monkeypatch):
    for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert not distributed.launched() and distributed.world() is None
    monkeypatch.setenv("PMI_SIZE", "1")             # `mpiexec -n 1`: an ordinary run
    assert distributed.world() is None
    assert "mpi4py" not in sys.modules


@needs_mpi
@pytest.mark.slow
def test_two_ranks_train_the_mlp_as_one_process(tmp_path):
    """`mpiexec -n 2 dlc run examples/mlp.dl`: the final parameters and Adam state equal one
    process's with the same global batch of 64 (each rank 32 rows; the epoch's last batch of
    29 split 15/14), the gradients travelling in several buckets."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    r1 = run([MLP, "--epochs", "1", "--quiet", "--json", "--save", one], None)
    assert r1.returncode == 0, r1.stderr
    r2 = run([MLP, "--epochs", "1", "--json", "--save", two], 2, env={"DLC_BUCKET_MB": "0.02"})
    assert r2.returncode == 0, r2.stderr
    moved = assert_same_checkpoints(one, two)
    assert moved > 0                                # two reductions, not one copied run
    rep1, rep2 = json.loads(r1.stdout.splitlines()[-1]), json.loads(r2.stdout.splitlines()[-1])
    assert r2.stdout.count("\n") == 1 and r2.stderr.count("epoch   1/1") == 1     # rank 0 reports
    assert rep2["distributed"]["ranks"] == 2 and rep2["distributed"]["buckets"] == 4
    assert rep2["steps"] == rep1["steps"] == 23
    assert rep2["train"]["loss"] == pytest.approx(rep1["train"]["loss"], rel=1e-5)
    assert rep2["train"]["accuracy"] == rep1["train"]["accuracy"]      # every rank's examples
    assert rep2["test"]["accuracy"] == rep1["test"]["accuracy"]


DROPOUT = """
model net(x: f32[B, 64]) -> f32[B, 10] {
    h = dropout(relu(dense(x, 32)), 0.3)
    return dense(h + 0.1 * normal([B, 32]), 10)
}

train net on digits(test = 0.6) {
    loss      = cross_entropy(net(x), y)
    optimizer = sgd(lr = 0.1, momentum = 0.9)
    batch     = 717
    epochs    = 2
    seed      = 3
}
"""


@needs_mpi
@pytest.mark.slow
def test_random_draws_follow_the_global_examples(dl_file, tmp_path):
    """Dropout masks and normal noise are drawn per global example, not per rank: two ranks
    match one process. The 718 training digits in batches of 717 leave a last batch of one
    row, so rank 1 has none there (it contributes nothing and waits for the average). The
    1,079 test digits are 3 evaluation batches of 512 shared round robin (the noise, drawn
    in evaluation too, is the same per batch)."""
    f = dl_file(DROPOUT)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    r1 = run([f, "--quiet", "--json", "--save", one], None)
    assert r1.returncode == 0, r1.stderr
    r2 = run([f, "--quiet", "--json", "--save", two], 2)
    assert r2.returncode == 0, r2.stderr
    assert_same_checkpoints(one, two)
    t1, t2 = (json.loads(r.stdout.splitlines()[-1])["test"] for r in (r1, r2))
    assert t2["loss"] == pytest.approx(t1["loss"], rel=1e-5) and t2["accuracy"] == t1["accuracy"]


@needs_mpi
def test_an_error_is_reported_once_and_ends_every_rank(dl_file):
    f = dl_file("model m(x: f32[B, 64]) -> f32[B, 10] {\n    return dense(x, 12)\n}\n"
                "train m on digits() {\n    loss = cross_entropy(m(x), y)\n}\n")
    r = run([f], 2, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("error: the result of `m` must be f32[B, 10]") == 1, r.stderr
    assert "Abort" not in r.stderr                  # every rank failed alike: a clean exit


LONE_ERROR = """
import sys
from runtime import distributed
w = distributed.world()
if w.rank == 1:                                     # rank 0 goes on to an allreduce, alone
    sys.exit(distributed.fail(2, "error: only rank 1 saw this"))
import numpy as np
w.comm.Allreduce(w.mpi.IN_PLACE, np.ones(3))
print("rank 0 was not stopped")
"""


@needs_mpi
def test_an_error_on_one_rank_ends_the_others(tmp_path):
    script = tmp_path / "lone.py"
    script.write_text(LONE_ERROR)
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert "rank 1: error: only rank 1 saw this" in r.stderr and "not stopped" not in r.stdout


DRAWS = """
model draws(x: f32[B, 6]) -> f32[B, 6] {
    noise = reshape(rand_like(reshape(x, [B, 3, 2])), [B, 6])
    return dropout(x, 0.5) + normal([B, 6]) + noise + normal([6])
}
"""


@pytest.mark.parametrize("reference", [pytest.param(False, marks=pytest.mark.slow), True], ids=["kernels", "numpy"])
def test_a_shard_draws_its_global_rows_numbers(reference):
    """Lowered for data parallelism, rows lo.. of a batch, run with `rng_row = lo`, draw what
    the same rows draw in the whole batch (uniform, normal, dropout; a draw without the batch
    axis is the same for every shard); with `rng_row = 0` the numbers are one process's. (The
    kernels are also checked end to end by the two-rank dropout run above.)"""
    from compiler.driver import build, optimize
    from compiler.lower import Lowerer
    from compiler.ops import evaluate
    from compiler.passes import Context
    from dsl.parser import parse

    def program(row_offsets):
        lw = Lowerer(parse(DRAWS, "<draws>.dl"), "f64", training=True, row_offsets=row_offsets)
        g = optimize(lw.lower_model("draws").graph, "eval", Context(), fuse=True)
        ex = None if reference else build(g)

        def run(x, row=0, seed=2 ** 62 + 12345):     # a seed near the top: the shift wraps
            feeds = {"x": x, "rng": np.int64(seed), "rng_row": np.int64(row)}
            if reference:
                return evaluate(g, {n: np.asarray(feeds[g[n]["name"]]) for n in g.inputs})[g.outputs["output"]]
            return dict(zip(ex.outputs, ex(*[feeds[g[n]["name"]] for n in g.inputs])))["output"]
        return run

    shard, one = program(True), program(False)
    x = np.arange(1.0, 1.0 + 7 * 6).reshape(7, 6)
    whole = one(x)
    np.testing.assert_array_equal(shard(x, 0), whole)
    for lo, hi in [(0, 3), (3, 7), (5, 6)]:
        np.testing.assert_array_equal(shard(np.ascontiguousarray(x[lo:hi]), lo), whole[lo:hi])
    assert not np.array_equal(shard(np.ascontiguousarray(x[3:7]), 0), whole[3:7])   # the shift matters


def test_a_draw_that_cannot_follow_the_global_rows_is_refused():
    """Under mpiexec a draw whose batch axis is not its first would give ranks other numbers
    than one process: a located error, while one process lowers it as before."""
    from compiler.lower import Lowerer
    from dsl.diagnostics import DlcError
    from dsl.parser import parse
    src = "model m(x: f32[B, 6]) -> f32[B, 6] {\n    return x + transpose(normal([6, B]))\n}\n"
    with pytest.raises(DlcError, match="data-parallel training") as e:
        Lowerer(parse(src, "<t>.dl"), "f64", row_offsets=True).lower_model("m")
    assert (e.value.loc.line, e.value.loc.col) == (2, 26) and "[6, B]" in e.value.render()
    Lowerer(parse(src, "<t>.dl"), "f64").lower_model("m")
