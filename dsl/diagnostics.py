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
    """Line `line` (1-based) as the lexer counts lines: only "\\n" ends one (`str.splitlines`
    also splits at form feeds, \\v, \\x1c-\\x1e and U+2028, which would quote the wrong line)."""
    text = _SOURCES.get(filename)
    if text is None:
        try:
            text = Path(filename).read_bytes().decode("utf-8", errors="replace")
        except OSError:
            return None
        _SOURCES[filename] = text
    lines = text.split("\n")
    if 1 <= line <= len(lines):
        return lines[line - 1].rstrip("\r")
    return None


def _printable(line: str) -> str:
    """The line as shown above a caret: tabs and other unprintable characters become one
    space each, so the caret's column still counts characters."""
    return "".join(c if c.isprintable() else " " for c in line)


WIDTH = 100       # a longer source line is quoted as a window around the caret


def _window(line: str, col: int) -> tuple[str, int]:
    """At most WIDTH characters of `line` around column `col`, and the column within them."""
    if len(line) <= WIDTH:
        return line, col
    start = max(0, min(col - 1 - WIDTH // 2, len(line) - WIDTH))
    shown = line[start:start + WIDTH]
    if start > 0:
        shown = "..." + shown[3:]
    if start + WIDTH < len(line):
        shown = shown[:-3] + "..."
    return shown, col - start


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
                shown, col = _window(_printable(src), self.loc.col)
                out.append("    " + shown)
                width = 1
                if self.loc.end_line == self.loc.line and self.loc.end_col:
                    width = max(1, min(self.loc.end_col - self.loc.col, len(shown) - col + 1))
                out.append("    " + " " * (col - 1) + "^" + "~" * (width - 1))
        for n in self.notes:
            out.append(f"  note: {n}")
        return "\n".join(out)
