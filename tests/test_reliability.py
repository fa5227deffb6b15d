"""Issue 11: no traceback reaches a user. Each hostile input ends in one located message
(exit 2), a correct result, or a clear refusal."""
import re

import numpy as np
import pytest

from runtime.cli import main

MODEL = "model m(x: f32[B, 64]) -> f32[B, 10] {{\n    return {body}\n}}\n"


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.err


def located(err: str, path, line: int) -> re.Match:
    m = re.match(rf"{re.escape(str(path))}:{line}:(\d+): error: ", err)
    assert m, err
    return m


# ---- lexing and parsing -----------------------------------------------------------------------
@pytest.mark.parametrize("text, line, words", [
    ('import "\\x"\n', 1, ["bad escape", "truncated"]),
    ('import "\\N{nope}"\n', 1, ["bad escape", "unknown Unicode character name"]),
    ('import "\\u12"\n', 1, ["bad escape"]),
    (MODEL.format(body="x * " + "9" * 5000), 2, ["integer literal", "5000 digits", "too large"]),
    (MODEL.format(body="x * 9223372036854775808"), 2, ["too large"]),
    (MODEL.format(body="x * 1e999"), 2, ["too large for a float"]),
    ("model m(x: f32[B, " + "9" * 30 + "]) -> f32[B, 4] {\n    return x\n}\n", 1, ["too large"]),
])
def test_bad_literals_are_located(capsys, dl_file, text, line, words):
    p = dl_file(text)
    code, err = run_cli(capsys, "check", p)
    assert code == 2
    located(err, p, line)
    for w in words:
        assert w in err
    assert err.splitlines()[2].strip().startswith("^")


@pytest.mark.parametrize("body", [
    "relu(" * 300 + "x" + ")" * 300,
    "x" + " + x" * 600,
    "-" * 600 + "x",
])
def test_deep_nesting_is_refused_not_a_recursion_error(capsys, dl_file, body):
    p = dl_file(MODEL.format(body=body))
    code, err = run_cli(capsys, "check", p)
    assert code == 2
    located(err, p, 2)
    assert "nested too deeply" in err


def test_nesting_below_the_limit_checks(capsys, dl_file):
    p = dl_file(MODEL.format(body="dense(" + "relu(" * 150 + "x" + ")" * 150 + ", 10)"))
    code, err = run_cli(capsys, "check", p)
    assert code == 0, err


def test_non_utf8_file_is_located(capsys, tmp_path):
    p = tmp_path / "latin.dl"
    p.write_bytes(b"model m(x: f32[B, 4]) -> f32[B, 4] {\n  # caf\xe9 au lait\n    return x\n}\n")
    code, err = run_cli(capsys, "check", p)
    assert code == 2
    assert located(err, p, 2).group(1) == "8"
    assert "not UTF-8" in err and "0xe9" in err


@pytest.mark.parametrize("sep", ["\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\u2028", "\x85"])
def test_odd_line_separators_quote_the_reported_line(capsys, dl_file, sep):
    # the lexer ends lines only at \n: the quoted line and caret must be that line
    p = dl_file(f"# one{sep} still one\nmodel m(x: f32[B, 4]) -> f32[B, 4] {{\n    return nope\n}}\n")
    code, err = run_cli(capsys, "check", p)
    assert code == 2
    located(err, p, 3)
    lines = err.splitlines()
    assert lines[1].strip() == "return nope"
    assert lines[2].index("^") == lines[1].index("nope")


def test_directory_instead_of_a_file(capsys, tmp_path):
    d = tmp_path / "dir.dl"
    d.mkdir()
    code, err = run_cli(capsys, "check", d)
    assert code == 2 and "is a directory" in err


def test_internal_errors_exit_3_with_a_hint(capsys, dl_file, monkeypatch):
    import runtime.cli as cli

    def boom(args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(cli, "_check", boom)
    code, err = run_cli(capsys, "check", dl_file(MODEL.format(body="dense(x, 10)")))
    assert code == 3
    assert "internal error, please report" in err and "--debug" in err and "ZeroDivisionError" in err
