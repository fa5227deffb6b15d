"""A grammar-aware `.dl` fuzzer: mutate the examples token by token, and derive random
programs from the grammar itself (lark's rules for the parser in `dsl/parser.py`).

The promise checked (`check_case`): `dlc check` on any text either accepts it (exit 0) or
prints one error and exits 2, located at `file:line:col` (with the source line and a caret
under it); never a traceback, an internal error (exit 3) or a hang.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.dl")) + sorted((ROOT / "dsl" / "stdlib").glob("*.dl"))

NAMES = ["x", "y", "h", "B", "T", "W", "b", "mlp", "dense", "relu", "softmax", "sum", "mean", "conv2d", "lstm",
         "reshape", "transpose", "cross_entropy", "adam", "sgd", "digits", "tagging", "npz", "csv", "glorot",
         "zeros", "f32", "f64", "i32", "training", "axis", "lr", "units", "batch", "epochs", "seed", "loss",
         "optimizer", "metrics", "accuracy", "and", "or", "not", "embedding", "take", "slice", "concat", "scan"]
ODD = ["0", "-1", "1e400", "1e-400", "99999999999999999999999", "0.0", ".5", "3.", '"\\x"', '"\\N{nope}"', '""',
       '"a.npz"', "...", "\x0c", "\u2028", "\t", "\x00", "\r", "\\\n", "é", "[", "]", "(", ")", "{", "}", ",",
       "=", "->", ":", "@", "**", "//", "<-", ";", "\n", "#", "if", "else", "phase", "param", "state", "return",
       "yield", "model", "def", "train", "on", "import", "true", "false", "B * 2", "[B, 10]", "[]"]
_TOKEN = re.compile(r"\s+|[A-Za-z_][A-Za-z_0-9]*|[0-9.]+(?:[eE][-+]?[0-9]+)?|\"(?:[^\"\\\n]|\\.)*\"|.", re.S)


def mutant(seed: int) -> str:
    """An example with 1-4 token mutations: delete, duplicate, swap, replace, insert, truncate."""
    r = np.random.default_rng(seed)
    text = EXAMPLES[int(r.integers(len(EXAMPLES)))].read_text()
    toks = _TOKEN.findall(text)
    for _ in range(int(r.integers(1, 5))):
        i = int(r.integers(len(toks)))
        op = int(r.integers(6))
        if op == 0:
            del toks[i]
        elif op == 1:
            toks.insert(i, toks[i])
        elif op == 2:
            j = int(r.integers(len(toks)))
            toks[i], toks[j] = toks[j], toks[i]
        elif op == 3:
            pool = ODD if r.random() < 0.5 else NAMES
            toks[i] = pool[int(r.integers(len(pool)))]
        elif op == 4:
            pool = ODD if r.random() < 0.5 else NAMES
            toks.insert(i, " " + pool[int(r.integers(len(pool)))] + " ")
        else:
            toks = toks[:max(i, 1)]
        if not toks:
            toks = ["\n"]
    return "".join(toks)


class Grammar:
    """Random derivations from the parser's own grammar, depth-bounded (past the bound, each
    nonterminal takes its shallowest expansion)."""

    def __init__(self):
        from dsl.parser import _lark
        lk = _lark()
        self.rules: dict[str, list] = {}
        for rule in lk.rules:
            self.rules.setdefault(rule.origin.name, []).append([s.name for s in rule.expansion])
        self.terms = {t.name: t for t in lk.terminals}
        # the height of each nonterminal's shallowest derivation (a fixpoint)
        self.height = {k: float("inf") for k in self.rules}
        changed = True
        while changed:
            changed = False
            for k, exps in self.rules.items():
                h = min(1 + max([self.height.get(s, 0) for s in e], default=0) for e in exps)
                if h < self.height[k]:
                    self.height[k], changed = h, True

    def terminal(self, name: str, r) -> str:
        t = self.terms.get(name)
        if t is not None and t.pattern.type == "str":
            return t.pattern.value
        if name == "NAME":
            return NAMES[int(r.integers(len(NAMES)))]
        if name in ("INT", "NUMBER"):
            return str(r.choice(["0", "1", "2", "3", "8", "10", "64", "0.5", "1e-3", "1e9", "123456789012"]))
        if name == "STRING":
            return str(r.choice(['"nn"', '"d.npz"', '"sequence"', '"last"', '"\\t"', '"D/*"']))
        if name == "_NL":
            return "\n"
        if name == "COMPARE":
            return str(r.choice(["==", "!=", "<", ">=", "<=", ">"]))
        if name == "ELLIPSIS":
            return "..."
        return " "

    def derive(self, sym: str, r, depth: int, budget: int = 12) -> str:
        if sym not in self.rules:
            return self.terminal(sym, r)
        exps = self.rules[sym]
        if depth >= budget:
            best = min(max([self.height.get(s, 0) for s in e], default=0) for e in exps)
            exps = [e for e in exps if max([self.height.get(s, 0) for s in e], default=0) == best]
        e = exps[int(r.integers(len(exps)))]
        return " ".join(self.derive(s, r, depth + 1, budget) for s in e)


_GRAMMAR: Grammar | None = None


def generated(seed: int) -> str:
    global _GRAMMAR
    _GRAMMAR = _GRAMMAR or Grammar()
    r = np.random.default_rng(seed)
    items = [_GRAMMAR.derive("item", r, 0, budget=int(r.integers(5, 14))) for _ in range(int(r.integers(1, 4)))]
    return "\n".join(items) + "\n"


def case(seed: int) -> str:
    """Case `seed`: even seeds mutate an example, odd ones derive from the grammar."""
    return mutant(seed) if seed % 2 == 0 else generated(seed)


_LOCATED = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): error: ")


def check_case(text: str, path: Path) -> str:
    """Run `dlc check` on `text`; return "ok" or "error"; raise AssertionError otherwise."""
    from runtime.cli import main
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(["check", str(path)])
        except SystemExit as e:           # argparse only
            code = e.code
    msg = err.getvalue()
    assert code in (0, 2), f"exit status {code}:\n{msg}\n--- input ---\n{text}"
    assert "Traceback" not in msg, msg
    if code == 0:
        return "ok"
    first = msg.splitlines()[0] if msg else ""
    m = _LOCATED.match(first)
    assert m, f"not one located error message:\n{msg}\n--- input ---\n{text}"
    lines = msg.splitlines()
    if m["file"] == str(path) and len(lines) > 2 and lines[1].startswith("    "):
        assert "^" in lines[2], f"no caret under the source line:\n{msg}"
    return "error"
