"""Files the commands write (`--save`, `--save-best`, `--log`, `--plot`, `predict --output`,
`sample --out`, ...): each path is checked before anything is compiled or trained, so a typo in
it costs nothing, and the message names the flag that gave it."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from dsl.diagnostics import DlcError

PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")         # what matplotlib's savefig writes
IMAGE_FORMATS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")   # what Pillow writes


def _alternatives(suffixes) -> str:
    return suffixes[0] if len(suffixes) == 1 else f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"


def check_output(path, flag: str, suffixes: tuple | None = None, what: str = "it is",
                 fold_case: bool = False, regular: bool = False) -> Path:
    """Refuse a path `flag` cannot write to: a suffix not among `suffixes` (compared ignoring
    case with `fold_case`; `what` begins the message: "a checkpoint is", "plots are drawn to"), a directory that does not
    exist or cannot be written, a directory where the file should go, and, with `regular`
    (a file replaced by renaming a new one over it), anything but a regular file."""
    p = Path(path)
    if suffixes is not None and (p.suffix.lower() if fold_case else p.suffix) not in suffixes:
        raise DlcError(f"{flag} {path}: {what} a {_alternatives(suffixes)} file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise DlcError(f"{flag} {path}: the directory {parent} does not exist")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise DlcError(f"{flag} {path}: {e.strerror or e}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise DlcError(f"{flag} {path}: {path} is a directory; refusing to replace it")
    if st is not None and regular and not stat.S_ISREG(st.st_mode):
        raise DlcError(f"{flag} {path}: {path} is not a regular file; refusing to replace it")
    if st is None or regular:           # a new file (or a renamed one) needs the directory writable
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DlcError(f"{flag} {path}: the directory {parent} is not writable")
    elif not os.access(p, os.W_OK):
        raise DlcError(f"{flag} {path}: {path} is not writable")
    return p
