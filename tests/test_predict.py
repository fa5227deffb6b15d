"""`dlc predict`: a trained checkpoint decodes given inputs, greedily or by sampling."""
import json

import pytest

from runtime.cli import main

SRC = """
model rev(x: i32[B, 4], y_in: i32[B, 5]) -> f32[B, 5, 13] {
    hs, h, c = lstm(embedding(x, 13, 16), 64, returns = "state")
    logits, tokens = scan yt in y_in, h = h, c = c, tok = full([B], 1, dtype = "i32") {
        if training {
            e = embedding(yt, 13, 16)
        } else {
            e = embedding(tok, 13, 16)
        }
        h, c = lstm_cell(e, h, c)
        out = dense(h, 13)
        tok = decode(out)
        yield out, tok
    }
    return logits, tokens
}

train rev on reverse(n = 3000, min_len = 2, max_len = 4) {
    logits, tokens = rev(x, y_in)
    loss      = cross_entropy(logits, y)
    optimizer = adam(lr = 1e-2)
    batch     = 64
    epochs    = 12
    metrics   = [accuracy, exact, loss]
}
"""


@pytest.mark.slow
def test_predict_greedy_and_sampled(tmp_path, capsys):
    p = tmp_path / "rev.dl"
    p.write_text(SRC)
    ck = tmp_path / "rev.safetensors"
    assert main(["run", str(p), "--save", str(ck), "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert rep["test"]["exact"] > 0.9, rep
    assert main(["predict", str(p), "--load", str(ck), "--input", "3 1 4", "--input", "2 7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["predictions"]
    assert [r["prediction"] for r in out] == ["4 1 3", "7 2"]
    assert main(["predict", str(p), "--load", str(ck), "--index", "0", "--index", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("->" in ln and "expected" in ln for ln in lines)
    # sampling at a very high temperature is (almost) uniform: the reversal breaks down
    runs = []
    for seed in range(3):
        assert main(["predict", str(p), "--load", str(ck), "--input", "3 1 4 1", "--temperature", "50",
                     "--seed", str(seed), "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out)["predictions"][0]["prediction"])
    assert len(set(runs)) > 1
    assert main(["predict", str(p), "--load", str(ck), "--input", "3 x"]) == 2
    assert "unknown token 'x'" in capsys.readouterr().err
