"""Parse `.dl` source into the AST. Lark's errors become located `DlcError`s."""
from __future__ import annotations

import ast as pyast
import math
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ast as A
from .diagnostics import DlcError, Loc, register_source

_GRAMMAR = Path(__file__).with_name("grammar.lark")

# After these tokens a newline cannot end a statement, so it is dropped: expressions and
# argument lists may continue on the next line.
_CONTINUES = {"PLUS", "MINUS", "STAR", "SLASH", "AT", "__ANON_0", "COMMA", "EQUAL", "COMPARE",
              "LPAR", "LSQB", "LBRACE", "COLON"}
_CONTINUES_WORDS = {"**", "//", "and", "or", "not"}
_OPEN = {"LPAR": "RPAR", "LSQB": "RSQB"}


class _NewlineFilter:
    """Postlexer: drop newlines inside () and [] and after an operator or comma."""

    always_accept = ("_NL",)

    def __init__(self):
        self.open: list = []        # brackets still open where the lexer has got to

    def process(self, stream):
        self.open = []
        prev = None
        for tok in stream:
            if tok.type in _OPEN:
                self.open.append(tok)
            elif tok.type in ("RPAR", "RSQB") and self.open:
                self.open.pop()
            depth = len(self.open)
            if tok.type == "_NL":
                if depth > 0 or (prev is not None and (prev.type in _CONTINUES or prev.value in _CONTINUES_WORDS)):
                    continue
            prev = tok
            yield tok


_FILTER = _NewlineFilter()


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(_GRAMMAR.read_text(), parser="lalr", propagate_positions=True,
                postlex=_FILTER, maybe_placeholders=True)


_TOKEN_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a string",
    "_NL": "a new line", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','", "EQUAL": "'='", "COLON": "':'",
    "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "AT": "'@'", "$END": "end of file",
    "COMPARE": "a comparison", "ELLIPSIS": "'...'", "SEMICOLON": "';'", "RETURN": "'return'",
    "PARAM": "'param'", "STATE": "'state'", "IF": "'if'", "DEF": "'def'", "MODEL": "'model'", "TRAIN": "'train'", "IMPORT": "'import'",
    "AND": "'and'", "OR": "'or'", "NOT": "'not'", "PHASE": "'phase'",
}


def _describe_expected(expected) -> str:
    names = sorted({_TOKEN_NAMES.get(e, e.lower().strip("_") if e.isupper() else e) for e in expected})
    if len(names) > 6:
        names = names[:6] + ["..."]
    return ", ".join(names)


class _ToAst(Transformer):
    def __init__(self, filename: str):
        super().__init__()
        self.file = filename

    def _loc(self, meta) -> Loc:
        return Loc(self.file, getattr(meta, "line", 1), getattr(meta, "column", 1),
                   getattr(meta, "end_line", None), getattr(meta, "end_column", None))

    def _tloc(self, tok: Token) -> Loc:
        return Loc(self.file, tok.line, tok.column, tok.end_line, tok.end_column)

    # items
    @v_args(meta=True)
    def start(self, meta, items):
        # the module is the whole file: its errors point at line 1, column 1 (the start rule's
        # own position is wherever its first token is, often the end of a leading comment)
        return A.Module(Loc(self.file, 1, 1), tuple(i for i in items if i is not None))

    @v_args(meta=True)
    def import_stmt(self, meta, c):
        return A.Import(self._loc(meta), _unquote(c[0], self._tloc(c[0])))

    @v_args(meta=True)
    def funcdef(self, meta, c):
        name, params, ret, body = c
        return A.FuncDef(self._loc(meta), "def", str(name), params or (), ret, body)

    @v_args(meta=True)
    def modeldef(self, meta, c):
        name, params, ret, body = c
        return A.FuncDef(self._loc(meta), "model", str(name), params or (), ret, body)

    @v_args(meta=True)
    def traindef(self, meta, c):
        name, data, body = c
        return A.TrainDef(self._loc(meta), str(name), data, body, self._tloc(name))

    @v_args(meta=True)
    def gendef(self, meta, c):
        name, count, *params, body = c
        return A.FuncDef(self._loc(meta), "generate", str(name),
                         (A.Param(self._tloc(count), str(count), None, None), *params), None, body)

    def params(self, c):
        return tuple(c)

    @v_args(meta=True)
    def param(self, meta, c):
        name, typ, default = c
        return A.Param(self._tloc(name), str(name), typ, default)

    # types
    @v_args(meta=True)
    def tensor_type(self, meta, c):
        dtype, dims = c
        return A.TensorType(self._loc(meta), str(dtype), dims or ())

    @v_args(meta=True)
    def tensor_type_any(self, meta, c):
        return A.TensorType(self._loc(meta), None, c[0] or ())

    @v_args(meta=True)
    def scalar_type(self, meta, c):
        return A.ScalarType(self._loc(meta), str(c[0]))

    def dims(self, c):
        return tuple(c)

    def dim_ellipsis(self, c):
        return A.DimEllipsis(self._tloc(c[0]))

    def dim_name(self, c):
        return A.DimName(self._tloc(c[0]), str(c[0]))

    def dim_int(self, c):
        return A.DimInt(self._tloc(c[0]), _number(c[0], self._tloc(c[0])))

    def _dim_bin(op):
        @v_args(meta=True)
        def f(self, meta, c):
            return A.DimBin(self._loc(meta), op, c[0], c[1])
        return f

    dim_add, dim_sub, dim_mul, dim_div = _dim_bin("+"), _dim_bin("-"), _dim_bin("*"), _dim_bin("/")

    # statements
    @v_args(meta=True)
    def block(self, meta, c):
        return tuple(c)

    @v_args(meta=True)
    def assign(self, meta, c):
        return A.Assign(self._loc(meta), _not_keyword(c[0], self._tloc(c[0])), c[1])

    @v_args(meta=True)
    def param_decl(self, meta, c):
        name, typ, init = c
        return A.ParamDecl(self._loc(meta), str(name), typ, init)

    @v_args(meta=True)
    def state_decl(self, meta, c):
        name, typ, init = c
        return A.StateDecl(self._loc(meta), str(name), typ, init)

    @v_args(meta=True)
    def update_stmt(self, meta, c):
        return A.Update(self._loc(meta), str(c[0]), c[1])

    @v_args(meta=True)
    def if_stmt(self, meta, c):
        cond, then, orelse = c
        if isinstance(orelse, A.If):
            orelse = (orelse,)
        return A.If(self._loc(meta), cond, then, orelse or ())

    @v_args(meta=True)
    def phase_stmt(self, meta, c):
        return A.Phase(self._loc(meta), str(c[0]), c[1])

    @v_args(meta=True)
    def multi_assign(self, meta, c):
        return A.MultiAssign(self._loc(meta), tuple(str(x) for x in c[:-1]), c[-1])

    @v_args(meta=True)
    def scan_stmt(self, meta, c):
        *targets, scan = c
        return A.Scan(self._loc(meta), tuple(str(t) for t in targets if t is not None), *scan)

    def scan(self, c):
        *items, body = c
        ins = tuple((n, e) for kind, n, e in items if kind == "in")
        carries = tuple((n, e) for kind, n, e in items if kind == "carry")
        return ins, carries, body

    def scan_in(self, c):
        return ("in", str(c[0]), c[1])

    def scan_carry(self, c):
        return ("carry", str(c[0]), c[1])

    @v_args(meta=True)
    def yield_stmt(self, meta, c):
        return A.Yield(self._loc(meta), tuple(c))

    @v_args(meta=True)
    def return_stmt(self, meta, c):
        return A.Return(self._loc(meta), tuple(c))

    # expressions
    def _bin(op):
        @v_args(meta=True)
        def f(self, meta, c):
            return A.BinOp(self._loc(meta), op, c[0], c[1])
        return f

    add, sub, mul, div, matmul, pow = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("@"), _bin("**")
    floordiv, and_, or_ = _bin("//"), _bin("and"), _bin("or")

    @v_args(meta=True)
    def not_(self, meta, c):
        return A.Not(self._loc(meta), c[0])

    @v_args(meta=True)
    def index(self, meta, c):
        return A.Index(self._loc(meta), c[0], c[1])

    def subscripts(self, c):
        return tuple(c)

    @v_args(meta=True)
    def slice_item(self, meta, c):
        return A.SliceItem(self._loc(meta), c[0], c[1])

    def ellipsis_item(self, c):
        return A.EllipsisItem(self._tloc(c[0]))

    @v_args(meta=True)
    def compare(self, meta, c):
        return A.BinOp(self._loc(meta), str(c[1]), c[0], c[2])

    @v_args(meta=True)
    def neg(self, meta, c):
        return A.Neg(self._loc(meta), c[0])

    @v_args(meta=True)
    def call(self, meta, c):
        name, args = c
        pos, kw = [], []
        for a in args or ():
            if isinstance(a, tuple):
                kw.append(a)
            else:
                if kw:
                    raise DlcError("a positional argument cannot follow a keyword argument", a.loc)
                pos.append(a)
        seen = set()
        for k, v in kw:
            if k in seen:
                raise DlcError(f"keyword argument `{k}` given twice", v.loc)
            seen.add(k)
        return A.Call(self._loc(meta), _not_keyword(name, self._tloc(name)), self._tloc(name), tuple(pos), tuple(kw))

    def args(self, c):
        return tuple(c)

    def kwarg(self, c):
        return (str(c[0]), c[1])

    def name(self, c):
        return A.Name(self._tloc(c[0]), _not_keyword(c[0], self._tloc(c[0])))

    def number(self, c):
        t = c[0]
        return A.Number(self._tloc(t), _number(t, self._tloc(t)), str(t))

    def string(self, c):
        return A.String(self._tloc(c[0]), _unquote(c[0], self._tloc(c[0])))

    @v_args(meta=True)
    def true(self, meta, c):
        return A.Bool(self._loc(meta), True)

    @v_args(meta=True)
    def false(self, meta, c):
        return A.Bool(self._loc(meta), False)

    @v_args(meta=True)
    def list(self, meta, c):
        return A.List(self._loc(meta), tuple(x for x in c if x is not None))


_KEYWORDS = {"and", "or", "not"}


def _not_keyword(tok, loc: Loc) -> str:
    """Where the grammar takes no operator, the lexer reads `and` as a name: refuse it."""
    if str(tok) in _KEYWORDS:
        raise DlcError(f"`{tok}` is a keyword and cannot be used as a name", loc)
    return str(tok)


def _unquote(tok, loc: Loc) -> str:
    """A string literal's value; its escapes are Python's."""
    try:
        return pyast.literal_eval(str(tok))
    except (SyntaxError, ValueError) as e:
        why = str(e.msg if isinstance(e, SyntaxError) else e).removeprefix("(unicode error) ")
        raise DlcError(f"bad escape in string literal: {why}", loc,
                       ["escapes are Python's: \\\\, \\\", \\n, \\t, \\xHH, \\uHHHH, \\N{NAME}"]) from None


INT_LIMIT = 2 ** 63 - 1          # integer literals are sizes, axes and seeds: 64-bit


def _number(tok, loc: Loc) -> int | float:
    """A number literal's value: integers up to 2**63 - 1, finite floats."""
    text = str(tok)
    if text.isdigit():
        if len(text) > 19 or int(text) > INT_LIMIT:
            shown = text if len(text) <= 30 else f"{text[:12]}...{text[-6:]} ({len(text)} digits)"
            raise DlcError(f"integer literal {shown} is too large (the largest is 2**63 - 1)", loc)
        return int(text)
    value = float(text)
    if not math.isfinite(value):
        raise DlcError(f"number literal {text} is too large for a float", loc)
    return value


def parse(text: str, filename: str = "<string>") -> A.Module:
    """Parse `.dl` source text. Raises `DlcError` with a location on bad syntax."""
    register_source(filename, text)
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, filename) from None
    _check_depth(tree, filename)
    try:
        return _ToAst(filename).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, DlcError):
            raise e.orig_exc from None
        raise


MAX_DEPTH = 200       # nesting of the syntax tree; the compiler's passes recurse over it
_LISTS = {"args", "kwarg", "subscripts", "params", "dims", "block"}     # no level of their own


def _check_depth(tree, filename: str) -> None:
    """Refuse a tree nested deeper than MAX_DEPTH (200 nested calls, 500 chained `+`) with a
    located message, before anything recurses over it."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            meta = node.meta
            loc = Loc(filename, getattr(meta, "line", 1), getattr(meta, "column", 1))
            raise DlcError(f"expression nested too deeply (more than {MAX_DEPTH} levels)", loc,
                           ["name intermediate results (`h = ...`) to split it up"])
        stack.extend((c, depth + (c.data not in _LISTS)) for c in node.children if isinstance(c, Tree))


def parse_file(path: str | Path) -> A.Module:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DlcError(f"no such file: {p}") from None
    except IsADirectoryError:
        raise DlcError(f"{p} is a directory, not a .dl file") from None
    except OSError as e:
        raise DlcError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        register_source(str(p), raw.decode("utf-8", errors="replace"))
        line = raw.count(b"\n", 0, e.start) + 1
        col = len(raw[raw.rfind(b"\n", 0, e.start) + 1:e.start].decode("utf-8", errors="replace")) + 1
        raise DlcError(f"this file is not UTF-8 text: byte 0x{raw[e.start]:02x} cannot be decoded",
                       Loc(str(p), line, col), ["save the file as UTF-8"]) from None
    return parse(text, str(p))


def _syntax_error(e: UnexpectedInput, filename: str) -> DlcError:
    line, col = getattr(e, "line", 1), getattr(e, "column", 1)
    if isinstance(e, UnexpectedCharacters):
        ch = e.char if e.char.isprintable() else repr(e.char)
        msg = f"unexpected character `{ch}`"
    elif isinstance(e, UnexpectedEOF):
        msg = f"unexpected end of file; expected {_describe_expected(e.expected)}"
    elif isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            what = "end of file"
        elif tok.type == "_NL":
            what = "end of line"
        else:
            what = f"`{tok.value}`"
        msg = f"unexpected {what}; expected {_describe_expected(e.expected)}"
        if tok.type == "$END" or line in (None, -1):
            line, col = tok.line if tok.line not in (None, -1) else 1, tok.column if tok.column not in (None, -1) else 1
    else:  # pragma: no cover - lark has no other kinds today
        msg = str(e)
    if line in (None, -1):
        line, col = 1, 1
    notes = []
    unclosed = [t for t in _FILTER.open if t.line < line]
    if unclosed:
        t = unclosed[-1]
        notes.append(f"the `{t.value}` at line {t.line}, column {t.column} is never closed")
    return DlcError(f"syntax error: {msg}", Loc(filename, line, col), notes)
