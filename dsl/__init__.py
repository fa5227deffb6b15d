"""dlc's language front end: grammar, AST, parser, diagnostics and the `.dl` standard library."""
from .diagnostics import DlcError, Loc
from .parser import parse, parse_file

__all__ = ["DlcError", "Loc", "parse", "parse_file"]
