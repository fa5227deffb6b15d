"""Definitions: the `def`s, `model`s, `generate` programs and the train block of a file, its
imports (each file once) and the standard library (`dsl/stdlib/*.dl`, which user definitions
override)."""
from __future__ import annotations

import functools
from pathlib import Path

from dsl import ast as A
from dsl.diagnostics import DlcError
from dsl.parser import parse_file

STDLIB_DIR = Path(__file__).resolve().parent.parent / "dsl" / "stdlib"


@functools.cache
def stdlib() -> tuple[A.Module, ...]:
    """The standard library's modules, parsed once per process (ASTs are immutable; a Session
    lowers its file twice, for training and for evaluation)."""
    return tuple(parse_file(f) for f in sorted(STDLIB_DIR.glob("*.dl")))


class Definitions:
    """Everything a file can call, by name; `user_files` are the file and the files it imports
    (locations inside them are the user's own; the standard library's point at the call)."""

    def __init__(self, module: A.Module):
        self.user_files = {module.loc.file}
        self.funcs: dict[str, A.FuncDef] = {}
        self.models: dict[str, A.FuncDef] = {}
        self.trains: list[A.TrainDef] = []
        self.generators: dict[str, A.FuncDef] = {}     # sampling programs (`generate`)
        for lib in stdlib():
            self._collect(lib, stdlib=True)
        self._load(module, seen={str(Path(module.loc.file).resolve())})     # a file importing itself: once

    def _load(self, module: A.Module, seen: set, top: bool = True):
        for item in module.items:
            if isinstance(item, A.Import):
                path = (Path(item.loc.file).parent / item.path).resolve()
                if str(path) in seen:
                    continue
                seen.add(str(path))
                if not path.exists():
                    raise DlcError(f"cannot import \"{item.path}\": no such file {path}", item.loc)
                sub = parse_file(path)
                self.user_files.add(sub.loc.file)
                self._load(sub, seen, top=False)
        self._collect(module, stdlib=False, trains=top)

    def _collect(self, module: A.Module, stdlib: bool, trains: bool = False):
        """Gather definitions; train blocks only from the file being run (an imported file's
        train block is not run, so a file may import another example's models)."""
        for item in module.items:
            if isinstance(item, A.FuncDef):
                table = {"model": self.models, "generate": self.generators}.get(item.kind, self.funcs)
                prev = table.get(item.name)
                if prev is not None and not stdlib and prev.loc.file in self.user_files and prev.loc.file == item.loc.file:
                    raise DlcError(f"`{item.name}` is defined twice (first at {prev.loc})", item.loc)
                table[item.name] = item
            elif isinstance(item, A.TrainDef) and trains:
                if self.trains:
                    first = self.trains[0]
                    raise DlcError(f"a second `train` block (the first, for `{first.model}`, is at "
                                   f"{Path(first.loc.file).name}:{first.loc.line})", item.loc,
                                   ["a file has one train block; to train with several losses, declare "
                                    "`phase`s inside it"])
                self.trains.append(item)
