"""Located diagnostics: every user-facing error points at `.dl` source.

An error prints as

    model.dl:3:17: error: shape mismatch in `dense`: ...
        h = relu(dense(x, 128))
                    ^

and the command line exits with status 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

_SOURCES: dict[str, str] = {}


def register_source(filename: str, text: str) -> None:
    """Remember a file's text so that errors can quote its lines."""
    _SOURCES[filename] = text


def source_line(filename: str, line: int) -> str | None:
    text = _SOURCES.get(filename)
    if text is None:
        try:
            text = Path(filename).read_text()
        except OSError:
            return None
        _SOURCES[filename] = text
    lines = text.splitlines()
    if 1 <= line <= len(lines):
        return lines[line - 1]
    return None


@dataclass(frozen=True)
class Loc:
    """A position in a `.dl` file (1-based line and column)."""

    file: str
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def short(self) -> str:
        return f"{Path(self.file).name}:{self.line}"


@dataclass
class DlcError(Exception):
    """A user's mistake: printed as one located message, exit status 2."""

    message: str
    loc: Loc | None = None
    notes: list[str] = field(default_factory=list)
    origin: Loc | None = None       # the innermost source position (maybe in the stdlib)

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        head = f"{self.loc}: error: {self.message}" if self.loc else f"error: {self.message}"
        out = [head]
        if self.loc is not None:
            src = source_line(self.loc.file, self.loc.line)
            if src is not None:
                shown = src.expandtabs(1)
                out.append("    " + shown)
                width = 1
                if self.loc.end_line == self.loc.line and self.loc.end_col:
                    width = max(1, self.loc.end_col - self.loc.col)
                out.append("    " + " " * (self.loc.col - 1) + "^" + "~" * (width - 1))
        for n in self.notes:
            out.append(f"  note: {n}")
        return "\n".join(out)
