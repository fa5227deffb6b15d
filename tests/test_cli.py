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


# ---- the files a command writes are checked before it compiles anything ---------------------------------
@pytest.fixture
def no_compiling(monkeypatch):
    import runtime.cli as cli
    import runtime.sample as sample
    import runtime.session as session

    def refuse(*a, **k):
        pytest.fail("compiled before checking the output paths")
    monkeypatch.setattr(session.Session, "__init__", refuse)
    monkeypatch.setattr(sample.Sampler, "__init__", refuse)
    monkeypatch.setattr(cli, "_load_for_inspection", refuse)


@pytest.mark.parametrize("flags, words", [
    (["--plot", "p.txt"], "--plot p.txt: the curves are drawn to a .png, .pdf, .svg, .jpg or .jpeg file"),
    (["--plot", "{missing}/p.png"], "--plot {missing}/p.png: the directory {missing} does not exist"),
    (["--log", "{missing}/x.jsonl"], "--log {missing}/x.jsonl: the directory {missing} does not exist"),
    (["--log", "{tmp}"], "--log {tmp}: {tmp} is a directory"),
    (["--save-best", "{missing}/b.safetensors"],
     "--save-best {missing}/b.safetensors: the directory {missing} does not exist"),     # was `--save`, after training
    (["--save-best", "b.txt"], "--save-best b.txt: a checkpoint is a .safetensors or .npz file"),
    (["--save", "{missing}/c.npz"], "--save {missing}/c.npz: the directory {missing} does not exist"),
])
def test_run_output_paths_are_checked_first(capsys, tmp_path, monkeypatch, no_compiling, flags, words):
    monkeypatch.chdir(tmp_path)
    fill = dict(missing=str(tmp_path / "nonexist"), tmp=str(tmp_path))
    assert main(["run", str(MLP), *(f.format(**fill) for f in flags)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {words.format(**fill)}") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags, words", [
    (["--out", "v.txt"], "--out v.txt: image samples are drawn to a .png, .jpg, .jpeg, .bmp, .gif, .tif or .tiff file"),
    (["--out", "{missing}/v.png"], "--out {missing}/v.png: the directory {missing} does not exist"),
    (["--npz", "{tmp}"], "--npz {tmp}: raw samples are written to a .npz file"),
    (["--attention", "a.txt"], "--attention a.txt: attention is drawn to a .png, .pdf, .svg, .jpg or .jpeg file"),
])
def test_sample_output_paths_are_checked_first(capsys, tmp_path, monkeypatch, no_compiling, flags, words):
    monkeypatch.chdir(tmp_path)
    fill = dict(missing=str(tmp_path / "nonexist"), tmp=str(tmp_path))
    vae = ROOT / "examples" / "vae.dl"
    assert main(["sample", str(vae), "--load", "vae.safetensors", *(f.format(**fill) for f in flags)]) == 2
    assert capsys.readouterr().err == f"error: {words.format(**fill)}\n"


def test_ir_output_path_is_checked_first(capsys, tmp_path, no_compiling):
    assert main(["ir", str(MLP), "-o", str(tmp_path / "nonexist" / "ir.txt")]) == 2
    assert capsys.readouterr().err == f"error: -o {tmp_path}/nonexist/ir.txt: the directory {tmp_path}/nonexist does not exist\n"
    assert main(["ir", str(MLP), "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: -o {tmp_path}: {tmp_path} is a directory; refusing to replace it\n"
