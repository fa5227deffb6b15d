"""The kernel cache: generated modules on disk, keyed by a content hash.

It also holds the pass pipeline's results (`objects/`, pickled optimized graphs keyed by the
lowered graph, the options and the compiler's own source), so a warm run skips the passes.

Numba's `cache=True` cannot cache code built with `exec`, so each generated module is written
to `<cache>/dlc_<hash>.py` (atomically) and imported from there, registered in `sys.modules`
under its name *before* it is executed (otherwise Numba records the module as `<dynamic>` and
later processes fail to load the cache). The hash covers the source, the Numba and Python
versions and the target, so a stale cache is never used. Modules and graphs no run has used for
DLC_CACHE_DAYS days (default 30) are removed (`prune`).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.util
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numba


def cache_dir() -> Path:
    d = os.environ.get("DLC_CACHE_DIR")
    base = Path(d) if d else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dlc"
    path = base / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:            # a file, /proc, a read-only directory: cache in a temporary one
        global _FALLBACK
        if _FALLBACK is None:
            _FALLBACK = Path(tempfile.mkdtemp(prefix="dlc-kernels-"))
            atexit.register(shutil.rmtree, _FALLBACK, ignore_errors=True)
            print(f"dlc: warning: cannot use the kernel cache {path} ({e.strerror or e}); "
                  f"kernels go to {_FALLBACK} for this run", file=sys.stderr)
        return _FALLBACK
    return path


_FALLBACK: Path | None = None


def module_key(source: str, target: str) -> str:
    h = hashlib.sha256()
    for part in (source, numba.__version__, sys.version, target):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def compiled_index() -> set[str]:
    """The functions Numba has cached here, as `module.function-line`: the names of the index
    files in `__pycache__` (`<module>.<function>-<line>.py<version>.nbi`), listed once (a
    long-used cache holds thousands of files: a glob per kernel took seconds)."""
    try:
        with os.scandir(cache_dir() / "__pycache__") as it:
            return {e.name.rsplit(".", 2)[0] for e in it if e.name.endswith(".nbi")}
    except FileNotFoundError:
        return set()


def compiled(fn, index: set[str] | None = None) -> bool:
    """Has Numba cached the jitted function `fn` of a module here? (`index`: from
    `compiled_index()`, to ask about many functions.)"""
    f = fn.py_func
    if not f.__module__.startswith("dlc_"):       # a function of dlc's own (fpmode): cached beside its source
        try:
            return os.path.exists(fn._cache._cache_file._index_path)
        except AttributeError:
            return False
    key = f"{f.__module__}.{f.__qualname__}-{f.__code__.co_firstlineno}"
    return key in (compiled_index() if index is None else index)


# ---- locks: one process compiles a module that others wait for ----------------------------------
LOCKS = ".locks"


def lock(name: str, block: bool = True) -> int | None:
    """Take the exclusive lock `<cache>/.locks/<name>` (fcntl.flock; blocks while another
    process holds it, or with `block` false gives up at once); the open descriptor that holds
    it: closing it (in every process that inherited it) releases the lock. None where there are
    no such locks, or where it was not taken."""
    try:
        import fcntl
        d = cache_dir() / LOCKS
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / name, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def locked(name: str):
    """Hold `lock(name)` for the block."""
    fd = lock(name)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def load(source: str, target: str, name: str | None = None, wait: bool = False):
    """Import the module for `source` (named `name`, by default by its hash), writing it to the
    cache the first time. `wait`: under its lock (`locked(name)`), for a module whose import
    compiles (a helper that `driver.prepare` may be compiling in another process)."""
    name = name or f"dlc_{module_key(source, target)}"
    jit = not numba.config.DISABLE_JIT          # a module run as Python (NUMBA_DISABLE_JIT) is not reused jitted
    if name in sys.modules and getattr(sys.modules[name], "__dlc_jit__", jit) == jit:
        return sys.modules[name]
    if wait and jit:
        with locked(name):
            return load(source, target, name)
    prune()
    for attempt in (1, 2):
        path = _write(cache_dir() / f"{name}.py", source)
        _used(cache_dir() / USED / name)
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        mod.__dlc_jit__ = jit
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
            return mod
        except (RuntimeError, FileNotFoundError) as e:
            del sys.modules[name]
            # the file vanished between writing and reading it (the cache directory was cleared
            # meanwhile): the import finds no file, or Numba "no locator available"; write it
            # again, once
            lost = isinstance(e, FileNotFoundError) or "no locator available" in str(e)
            if attempt == 2 or not lost:
                raise
        except BaseException:
            del sys.modules[name]
            raise


@functools.cache
def compiler_digest() -> str:
    """A hash of the compiler's own source: a stored result of its passes is valid only for the
    compiler that made it."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def object_key(*parts) -> str:
    """The key of a stored result computed from `parts` (pickled: graphs, options) by this
    compiler, under this Python."""
    h = hashlib.sha256(pickle.dumps(parts, protocol=5))
    for part in (compiler_digest(), sys.version):
        h.update(part.encode())
    return h.hexdigest()[:32]


def load_object(key: str):
    """A stored result, or None (absent, or unreadable: then it is computed again)."""
    path = cache_dir() / "objects" / f"{key}.pkl"
    try:
        with open(path, "rb") as f:
            value = pickle.load(f)
        _used(path)
        return value
    except FileNotFoundError:
        return None
    except Exception:               # truncated or damaged: drop it
        path.unlink(missing_ok=True)
        return None


def store_object(key: str, value) -> None:
    """Store a result atomically (a reader sees the old file or the whole new one)."""
    d = cache_dir() / "objects"
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(value, f, protocol=5)
    os.replace(tmp, d / f"{key}.pkl")


def callees(fn) -> list:
    """The Numba functions `fn`'s code calls, through any it inlines or calls (a compiled step's
    inlined kernels, a scan loop's body, a kernel's helpers): what Numba compiles or loads from
    its cache first, and links into `fn`."""
    out, stack, seen = [], [fn], {id(fn)}
    while stack:
        py = getattr(stack.pop(), "py_func", None)
        if py is None:
            continue
        for name in py.__code__.co_names:
            g = py.__globals__.get(name)
            if isinstance(g, numba.core.dispatcher.Dispatcher) and id(g) not in seen:
                seen.add(id(g))
                out.append(g)
                stack.append(g)
    return out


def compile_repairing(fn, sig) -> None:
    """Compile Numba dispatcher `fn` for `sig`, or load it from Numba's disk cache. A damaged
    cache entry (a truncated or garbled .nbi/.nbc: UnpicklingError, EOFError, ...), of `fn` or
    of a function it calls (an imported helper: `_gemm`, `_exp_f32`; a compiled step's inlined
    kernel's), is dropped and `fn` compiled again, once, with a one-line warning; an error that
    recurs is the compiler's own."""
    if not hasattr(getattr(fn, "_cache", None), "flush"):
        fn.compile(sig)
        return

    def flush():
        module = fn.py_func.__globals__            # (imported helpers, called or not)
        for f in [fn, *module.values(), *callees(fn)]:
            if hasattr(getattr(f, "_cache", None), "flush"):
                f._cache.flush()
    repairing(lambda: fn.compile(sig), flush, fn.__name__)


def repairing(build, flush, name: str):
    """`build()`; where it fails (a damaged cache entry), `flush()` the entries it read and
    `build()` again, once, with a one-line warning; an error that recurs is the first one."""
    try:
        return build()
    except Exception as first:
        flush()
        try:
            out = build()
        except Exception:
            raise first from None
        print(f"dlc: warning: the kernel cache entry for {name} was damaged ({type(first).__name__}); "
              "recompiled it", file=sys.stderr)
        return out


# ---- pruning: what no run has used for DLC_CACHE_DAYS days goes ----------------------------------
# A module's last use is the time of its marker `<cache>/.used/<name>` (not of the module file:
# Numba's cache checks the source file's time stamp, so touching it would recompile every kernel);
# a stored graph's is the time of its file. At most once a day (the time of `.pruned`), the first
# load of a process removes modules (with Numba's files for them) and graphs unused for longer.
USED = ".used"
PRUNE_EVERY = 24 * 3600


def _used(path: Path) -> None:
    try:
        os.utime(path)
    except FileNotFoundError:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError:
            pass
    except OSError:
        pass


def cache_days() -> float:
    """DLC_CACHE_DAYS (default 30; 0 keeps everything)."""
    try:
        return float(os.environ.get("DLC_CACHE_DAYS", "30"))
    except ValueError:
        return 30.0


@functools.cache
def prune(now: float | None = None) -> int:
    """Remove what no run has used for `cache_days()` days (once a day, and once a process);
    the number of files removed."""
    import time
    days, d = cache_days(), cache_dir()
    now = now or time.time()
    stamp = d / ".pruned"
    try:
        if days <= 0 or now - stamp.stat().st_mtime < PRUNE_EVERY:
            return 0
    except FileNotFoundError:
        pass
    try:
        stamp.touch()
        os.utime(stamp, (now, now))
    except OSError:
        return 0
    old, removed = now - days * 86400, 0

    def last_use(p: Path, marker: Path | None = None) -> float:
        for q in ((marker, p) if marker else (p,)):
            try:
                return q.stat().st_mtime
            except (FileNotFoundError, TypeError, AttributeError):
                continue
        return now

    for mod in d.glob("dlc_*.py"):
        name = mod.stem
        marker = d / USED / name
        if last_use(mod, marker) < old:
            for f in [mod, marker, *(d / "__pycache__").glob(f"{name}.*")]:
                try:
                    f.unlink()
                    removed += 1
                except OSError:
                    pass
    for obj in (d / "objects").glob("*.pkl"):
        if last_use(obj) < old:
            try:
                obj.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def _write(path: Path, source: str) -> Path:
    """The module file, written atomically unless it already holds `source`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != source:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    return path
