"""The packages' layering: imports flow dsl -> compiler -> runtime, and the runtime reaches the
compiler only through its front door (`compiler.driver`, `compiler.api`)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(package: str):
    """(file, line, module imported) for every import in a package, relative ones resolved."""
    for f in sorted((ROOT / package).rglob("*.py")):
        mod = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                for a in node.names:
                    yield f.relative_to(ROOT), node.lineno, a.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: -node.level]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module
                targets = [name] if node.module or not node.level else [f"{name}.{a.name}" for a in node.names]
                for t in targets:
                    yield f.relative_to(ROOT), node.lineno, t


def test_nothing_imports_upward():
    upward = {"dsl": ("compiler", "runtime"), "compiler": ("runtime",)}
    bad = [f"{f}:{line}: {name}" for pkg, above in upward.items() for f, line, name in imports(pkg)
           if name.split(".")[0] in above]
    assert not bad, "\n".join(bad)


def test_the_runtime_reaches_the_compiler_through_its_front_door():
    bad = [f"{f}:{line}: {name}" for f, line, name in imports("runtime")
           if name.split(".")[0] == "compiler" and name not in ("compiler.driver", "compiler.api")]
    assert not bad, "\n".join(bad)
