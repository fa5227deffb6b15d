"""The `dlc` command end to end: run, check, ir, checkpoints, the kernel cache, user data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "examples" / "mlp.dl"


def dlc(*args, cache=None, timeout=300):
    env = dict(os.environ)
    if cache is not None:
        env["DLC_CACHE_DIR"] = str(cache)
    r = subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=timeout)
    return r


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_mlp_example_reaches_96_percent_and_reuses_kernels(tmp_path):
    cold = dlc("run", MLP, "--json", "--quiet", cache=tmp_path)
    assert cold.returncode == 0, cold.stderr
    rep = last_json(cold.stdout)
    assert rep["test"]["accuracy"] >= 0.96
    assert rep["epochs"] == 20 and rep["steps"] == 20 * 23
    assert rep["kernel_cache_hit"] is False
    warm = dlc("run", MLP, "--json", "--quiet", cache=tmp_path)
    rep2 = last_json(warm.stdout)
    assert rep2["kernel_cache_hit"] is True
    assert rep2["compile_seconds"] < rep["compile_seconds"]
    # same seed, same result
    assert rep2["test"]["accuracy"] == rep["test"]["accuracy"]
    assert list(tmp_path.glob("kernels/dlc_*.py")), "generated modules are kept in the cache"


def test_checkpoint_round_trip(tmp_path, capsys):
    ck = tmp_path / "mlp.safetensors"
    assert main(["run", str(MLP), "--epochs", "2", "--save", str(ck), "--json", "--quiet"]) == 0
    first = last_json(capsys.readouterr().out)
    assert ck.exists()
    assert main(["run", str(MLP), "--epochs", "0", "--load", str(ck), "--json", "--quiet"]) == 0
    again = last_json(capsys.readouterr().out)
    assert again["test"]["accuracy"] == pytest.approx(first["test"]["accuracy"])
    assert again["test"]["loss"] == pytest.approx(first["test"]["loss"], rel=1e-6)
    from runtime import checkpoint
    params, state, meta = checkpoint.load(ck)
    assert set(params) == {f"mlp/dense_{i}/{w}" for i in (1, 2, 3) for w in "Wb"}
    assert any(k.startswith("adam.m/") for k in state) and meta["step"] == 2 * 23
    npz = tmp_path / "mlp.npz"
    assert main(["run", str(MLP), "--epochs", "1", "--save", str(npz), "--quiet"]) == 0
    p2, s2, m2 = checkpoint.load(npz)
    assert set(p2) == set(params) and m2["model"] == "mlp"


def test_ir_stages(capsys):
    assert main(["ir", str(MLP), "--stage", "grad"]) == 0
    out = capsys.readouterr().out
    assert "graph mlp  (after autodiff)" in out
    assert "d loss / d mlp/dense_1/W = %" in out
    assert "[grad]" in out and "matmul(" in out
    assert main(["ir", str(MLP), "--stage", "fused"]) == 0
    out = capsys.readouterr().out
    assert "kernel k0 (matmul" in out and "anchor" in out
    assert main(["ir", str(MLP), "--stage", "source"]) == 0
    src = capsys.readouterr().out
    assert "@njit(cache=True" in src and "def step(" in src and "mlp.dl:5" in src
    assert main(["ir", str(MLP), "--stage", "lowered", "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith('digraph "mlp"') and "->" in dot
    assert main(["ir", str(MLP), "--stage", "ast"]) == 0
    assert "TrainDef(model='mlp')" in capsys.readouterr().out
    assert main(["check", str(MLP)]) == 0
    out = capsys.readouterr().out
    assert "mlp/dense_1/W" in out and "17,226 values" in out


def test_identifiers_never_reach_generated_code(dl_file, capsys):
    p = dl_file("""
def layer__import__(x, units: int) {
    param W__import__: [4, units] = glorot
    return x @ W__import__
}
model m(x: f32[B, 4]) -> f32[B, 2] {
    h__import__ = layer__import__(x, 2)   # '''; import os; os.system("echo pwned")
    return h__import__
}
""")
    assert main(["ir", str(p), "--stage", "source"]) == 0
    src = capsys.readouterr().out
    for line in src.splitlines():
        if "__import__" in line or "os.system" in line:
            assert line.lstrip().startswith("#"), line
    compile(src, "generated", "exec")      # still valid Python


def test_user_data_npz_and_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", features=x, labels=y)
    with open(tmp_path / "d.csv", "w") as f:
        f.write("a,b,c,cls\n")
        for row, lab in zip(x, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{lab}\n")
    model = """
model clf(x: f32[B, 3]) -> f32[B, 2] {
    return dense(relu(dense(x, 16)), 2)
}
"""
    for source in ['npz("d.npz", x = "features", y = "labels", test = 0.25)', 'csv("d.csv", label = "cls")']:
        p = tmp_path / "clf.dl"
        p.write_text(model + f"train clf on {source} {{\n loss = cross_entropy(clf(x), y)\n"
                             " optimizer = sgd(lr = 0.1, momentum = 0.9)\n epochs = 30\n batch = 16\n}\n")
        assert main(["run", str(p), "--json", "--quiet"]) == 0
        rep = last_json(capsys.readouterr().out)
        assert rep["test"]["accuracy"] > 0.9, source
